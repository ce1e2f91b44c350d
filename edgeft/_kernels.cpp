// The exp-heavy ops of edgeft's CPU training step as MLX primitives, each one pass over its
// data with a vectorized exp, where MLX's ops (or edgeft's fused ones, cpu_kernels.py) make
// several passes, each walking the whole array on one core per stream:
//
//   softmax(x, period): softmax over the last axis (the attention's). With period > 0 it is
//       causal: row r (along the second-to-last axis) sees the columns up to
//       r % period + cols - period, the rest come out 0. Its backward p * (g - sum(p * g)) per
//       row, over the visible columns only.
//   swiglu(gate, up), gelu_mul(gate, up): silu(gate) * up and gelu_approx(gate) * up, the gated
//       MLPs; the backward recomputes the sigmoid and writes both gradients in one pass.
//   cross_entropy(logits, targets): logsumexp(row) - row[target] per row, the loss; the
//       backward g * (softmax(row) - onehot(target)) in one pass.
//
// exp is Cephes' polynomial (as cpu_kernels.py's _exp: ~2e-7 relative), in loops the compiler
// vectorizes for AVX-512, AVX2 or SSE2 (target_clones picks one when the module loads). The
// module is built against the installed MLX's headers and mlx.core's nanobind (setup.py), and
// cpu_kernels.py uses it only for the MLX version it was built for, after a self-test against
// MLX's own ops. Each primitive runs on the stream it was created on (MLX's default stream at
// the call, which edgeft's stream groups set), one thread per call.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/version.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

// The row loops compiled for AVX-512, AVX2 and baseline x86-64, one picked when the module
// loads; elsewhere (Apple Silicon, aarch64 Linux) for the build's own target.
#if defined(__x86_64__) && defined(__GNUC__)
#define EDGEFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EDGEFT_CLONES
#endif

constexpr int LANES = 16;  // one AVX-512 register of floats; two AVX2 ones

inline float exp_(float x) {
  // exp(x) as 2**n * p(r): 0 below -87, exp(88) above 88 (as edgeft/cpu_kernels.py's _exp)
  const float xc = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
  const float t = xc * 1.4426950408889634f + 12582912.0f;  // rounds x / ln 2 to an integer n
  const float n = t - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // Cody-Waite
  const float r2 = r * r;
  const float p = (1.0f + r + r2 * (5.0000001201e-1f + 1.6666665459e-1f * r)) +
      (r2 * r2) * ((4.1665795894e-2f + 8.3334519073e-3f * r) + r2 * (1.3981999507e-3f + 1.9875691500e-4f * r));
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  bits = (bits - (0x4B400000 - 127)) << 23;  // bits(t) = 0x4B400000 + n
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return x < -87.0f ? 0.0f : p * two_n;
}

// The largest of x[0..n), in LANES accumulators (a vector reduction without -ffast-math).
inline float row_max(const float* x, int64_t n) {
  float mv[LANES];
  for (int k = 0; k < LANES; k++) mv[k] = -INFINITY;
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; k++) mv[k] = x[j + k] > mv[k] ? x[j + k] : mv[k];
  float m = -INFINITY;
  for (int k = 0; k < LANES; k++) m = mv[k] > m ? mv[k] : m;
  for (; j < n; j++) m = x[j] > m ? x[j] : m;
  return m;
}

// Row r of a [.., rows_per_matrix, cols] array sees this many leading columns (period: above).
inline int64_t visible(int64_t row, int64_t rows_per_matrix, int64_t cols, int64_t period) {
  return period > 0 ? row % rows_per_matrix % period + cols - period + 1 : cols;
}

EDGEFT_CLONES
void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols, int64_t period, int64_t rows_per_matrix) {
  for (int64_t i = 0; i < rows; i++) {
    const float* xr = x + i * cols;
    float* yr = y + i * cols;
    const int64_t n = visible(i, rows_per_matrix, cols, period);
    const float m = row_max(xr, n);
    float sv[LANES];
    for (int k = 0; k < LANES; k++) sv[k] = 0.0f;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
      for (int k = 0; k < LANES; k++) {
        const float e = exp_(xr[j + k] - m);
        yr[j + k] = e;
        sv[k] += e;
      }
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += sv[k];
    for (; j < n; j++) {
      const float e = exp_(xr[j] - m);
      yr[j] = e;
      s += e;
    }
    const float inv = 1.0f / s;
    for (j = 0; j < n; j++) yr[j] *= inv;
    for (; j < cols; j++) yr[j] = 0.0f;
  }
}

EDGEFT_CLONES
void softmax_vjp_rows(const float* p, const float* g, float* out, int64_t rows, int64_t cols, int64_t period,
                      int64_t rows_per_matrix) {
  for (int64_t i = 0; i < rows; i++) {
    const float* pr = p + i * cols;
    const float* gr = g + i * cols;
    float* o = out + i * cols;
    const int64_t n = visible(i, rows_per_matrix, cols, period);
    float dv[LANES];
    for (int k = 0; k < LANES; k++) dv[k] = 0.0f;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
      for (int k = 0; k < LANES; k++) dv[k] += pr[j + k] * gr[j + k];
    float dot = 0.0f;
    for (int k = 0; k < LANES; k++) dot += dv[k];
    for (; j < n; j++) dot += pr[j] * gr[j];
    for (j = 0; j < n; j++) o[j] = pr[j] * (gr[j] - dot);
    for (; j < cols; j++) o[j] = 0.0f;
  }
}

// The gated MLP activations, act(gate) * up: SiLU (SwiGLU; gate * sigmoid(gate)) and GELU-tanh
// (Gemma's; gate * sigmoid(2u), u = sqrt(2/pi) (gate + 0.044715 gate^3), one exp and no tanh).
// The backward recomputes the sigmoid rather than keep it, and writes both gradients in one pass.
constexpr float G1 = 1.5957691216057308f;  // 2 sqrt(2/pi): 2u = gate (G1 + G3 gate^2)
constexpr float G3 = G1 * 0.044715f;
enum Act : int { SILU = 0, GELU_TANH = 1 };

EDGEFT_CLONES
void gated_fwd(const float* g, const float* u, float* o, int64_t n, int act) {
  if (act == SILU)
    for (int64_t i = 0; i < n; i++) o[i] = g[i] * u[i] / (1.0f + exp_(-g[i]));
  else
    for (int64_t i = 0; i < n; i++) o[i] = g[i] * u[i] / (1.0f + exp_(-g[i] * (G1 + G3 * (g[i] * g[i]))));
}

EDGEFT_CLONES
void gated_bwd(const float* g, const float* u, const float* c, float* dg, float* du, int64_t n, int act) {
  if (act == SILU)
    for (int64_t i = 0; i < n; i++) {
      const float s = 1.0f / (1.0f + exp_(-g[i])), gs = g[i] * s, ci = c[i];
      dg[i] = ci * u[i] * (s + gs * (1.0f - s));  // d silu / d gate = s + gate s (1 - s)
      du[i] = ci * gs;
    }
  else
    for (int64_t i = 0; i < n; i++) {
      const float g2 = g[i] * g[i], e = exp_(-g[i] * (G1 + G3 * g2));
      const float s = 1.0f / (1.0f + e), gs = g[i] * s, ci = c[i];
      dg[i] = ci * u[i] * (s + gs * (e * s) * (G1 + 3.0f * G3 * g2));  // 1 - s as e s: s rounds to 1 first
      du[i] = ci * gs;
    }
}

// Cross-entropy of rows of logits against one target column each: logsumexp(x) - x[t], and the
// logsumexp kept for the backward pass, x's gradient g * (exp(x - lse) - onehot(t)) in one pass
// (MLX's ops write a zero array, scatter the target's -g into it and add the two).
EDGEFT_CLONES
void cross_entropy_rows(const float* x, const int32_t* t, float* loss, float* lse, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i++) {
    const float* xr = x + i * cols;
    const float m = row_max(xr, cols);
    float sv[LANES];
    for (int k = 0; k < LANES; k++) sv[k] = 0.0f;
    int64_t j = 0;
    for (; j + LANES <= cols; j += LANES)
      for (int k = 0; k < LANES; k++) sv[k] += exp_(xr[j + k] - m);
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += sv[k];
    for (; j < cols; j++) s += exp_(xr[j] - m);
    lse[i] = m + std::log(s);
    loss[i] = t[i] >= 0 && t[i] < cols ? lse[i] - xr[t[i]] : NAN;  // a target outside the vocabulary: NaN
  }
}

EDGEFT_CLONES
void cross_entropy_vjp_rows(const float* x, const int32_t* t, const float* lse, const float* g_loss,
                            const float* g_lse, float* out, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i++) {
    const float* xr = x + i * cols;
    float* o = out + i * cols;
    const float l = lse[i], g = g_loss[i] + g_lse[i];
    for (int64_t j = 0; j < cols; j++) o[j] = g * exp_(xr[j] - l);
    if (t[i] >= 0 && t[i] < cols) o[t[i]] -= g_loss[i];
  }
}

// The output takes the input's buffer when MLX lets it go (as its own unary ops do).
void take_or_allocate(const mx::array& in, mx::array& out) {
  if (in.is_donatable() && in.flags().row_contiguous && in.itemsize() == out.itemsize())
    out.copy_shared_buffer(in);
  else
    out.set_data(mx::allocator::malloc(out.nbytes()));
}

class SoftmaxVJP : public mx::UnaryPrimitive {
 public:
  SoftmaxVJP(mx::Stream stream, int64_t period) : mx::UnaryPrimitive(stream), period_(period) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& p = inputs[0];
    const auto& g = inputs[1];
    take_or_allocate(g, out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(p);
    enc.set_input_array(g);
    enc.set_output_array(out);
    const int64_t cols = out.shape(-1), rows = out.size() / cols, per = out.shape(-2);
    enc.dispatch([p = p.data<float>(), g = g.data<float>(), o = out.data<float>(), rows, cols, per,
                  period = period_]() { softmax_vjp_rows(p, g, o, rows, cols, period, per); });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeft's softmax kernels run on the CPU only");
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return period_ == static_cast<const SoftmaxVJP&>(other).period_;
  }
  const char* name() const override { return "EdgeftSoftmaxVJP"; }

 private:
  int64_t period_;
};

class Softmax : public mx::UnaryPrimitive {
 public:
  Softmax(mx::Stream stream, int64_t period) : mx::UnaryPrimitive(stream), period_(period) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    take_or_allocate(x, out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_output_array(out);
    const int64_t cols = out.shape(-1), rows = out.size() / cols, per = out.shape(-2);
    enc.dispatch([x = x.data<float>(), y = out.data<float>(), rows, cols, per, period = period_]() {
      softmax_rows(x, y, rows, cols, period, per);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeft's softmax kernels run on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& /*primals*/, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& /*argnums: x alone*/, const std::vector<mx::array>& outputs) override {
    const auto& p = outputs[0];
    auto g = mx::contiguous(cotangents[0], false, stream());
    return {mx::array(p.shape(), mx::float32, std::make_shared<SoftmaxVJP>(stream(), period_), {p, g})};
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return period_ == static_cast<const Softmax&>(other).period_;
  }
  const char* name() const override { return "EdgeftSoftmax"; }

 private:
  int64_t period_;
};

class GatedVJP : public mx::Primitive {
 public:
  GatedVJP(mx::Stream stream, int act) : mx::Primitive(stream), act_(act) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto &g = inputs[0], &u = inputs[1], &c = inputs[2];
    take_or_allocate(c, outputs[0]);
    outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    for (auto& a : outputs) enc.set_output_array(a);
    enc.dispatch([g = g.data<float>(), u = u.data<float>(), c = c.data<float>(), dg = outputs[0].data<float>(),
                  du = outputs[1].data<float>(), n = g.size(), act = act_]() { gated_bwd(g, u, c, dg, du, n, act); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeft's activation kernels run on the CPU only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return act_ == static_cast<const GatedVJP&>(other).act_;
  }
  const char* name() const override { return "EdgeftGatedVJP"; }

 private:
  int act_;
};

class Gated : public mx::UnaryPrimitive {
 public:
  Gated(mx::Stream stream, int act) : mx::UnaryPrimitive(stream), act_(act) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &g = inputs[0], &u = inputs[1];
    take_or_allocate(g, out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(g);
    enc.set_input_array(u);
    enc.set_output_array(out);
    enc.dispatch([g = g.data<float>(), u = u.data<float>(), o = out.data<float>(), n = out.size(), act = act_]() {
      gated_fwd(g, u, o, n, act);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeft's activation kernels run on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& /*outputs*/) override {
    auto c = mx::contiguous(cotangents[0], false, stream());
    auto grads = mx::array::make_arrays({primals[0].shape(), primals[0].shape()}, {mx::float32, mx::float32},
                                        std::make_shared<GatedVJP>(stream(), act_), {primals[0], primals[1], c});
    std::vector<mx::array> out;
    for (int arg : argnums) out.push_back(grads[arg]);
    return out;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return act_ == static_cast<const Gated&>(other).act_;
  }
  const char* name() const override { return "EdgeftGated"; }

 private:
  int act_;
};

mx::array gated(const mx::array& gate, const mx::array& up, int act) {
  if (gate.dtype() != mx::float32 || up.dtype() != mx::float32 || gate.shape() != up.shape())
    throw std::invalid_argument("edgeft gated activation: needs float32 gate and up of one shape");
  auto s = mx::default_stream(mx::Device::cpu);
  auto g = mx::contiguous(gate, false, s), u = mx::contiguous(up, false, s);
  return mx::array(g.shape(), mx::float32, std::make_shared<Gated>(s, act), {g, u});
}

class CrossEntropyVJP : public mx::UnaryPrimitive {
 public:
  explicit CrossEntropyVJP(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &x = inputs[0], &t = inputs[1], &lse = inputs[2], &g_loss = inputs[3], &g_lse = inputs[4];
    take_or_allocate(x, out);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([x = x.data<float>(), t = t.data<int32_t>(), lse = lse.data<float>(), gl = g_loss.data<float>(),
                  gs = g_lse.data<float>(), o = out.data<float>(), rows = out.shape(0), cols = out.shape(1)]() {
      cross_entropy_vjp_rows(x, t, lse, gl, gs, o, rows, cols);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeft's cross-entropy kernel runs on the CPU only");
  }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  const char* name() const override { return "EdgeftCrossEntropyVJP"; }
};

class CrossEntropy : public mx::Primitive {
 public:
  explicit CrossEntropy(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const auto &x = inputs[0], &t = inputs[1];
    auto &loss = outputs[0], &lse = outputs[1];
    loss.set_data(mx::allocator::malloc(loss.nbytes()));
    lse.set_data(mx::allocator::malloc(lse.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_input_array(t);
    enc.set_output_array(loss);
    enc.set_output_array(lse);
    enc.dispatch([x = x.data<float>(), t = t.data<int32_t>(), l = loss.data<float>(), s = lse.data<float>(),
                  rows = x.shape(0), cols = x.shape(1)]() { cross_entropy_rows(x, t, l, s, rows, cols); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeft's cross-entropy kernel runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        auto g_loss = mx::contiguous(cotangents[0], false, stream());
        auto g_lse = mx::contiguous(cotangents[1], false, stream());
        grads.push_back(mx::array(primals[0].shape(), mx::float32, std::make_shared<CrossEntropyVJP>(stream()),
                                  {primals[0], primals[1], outputs[1], g_loss, g_lse}));
      } else {
        grads.push_back(mx::zeros_like(primals[arg], stream()));
      }
    }
    return grads;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0)}, {inputs[0].shape(0)}};
  }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  const char* name() const override { return "EdgeftCrossEntropy"; }
};

mx::array cross_entropy(const mx::array& logits, const mx::array& targets) {
  if (logits.dtype() != mx::float32 || logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0))
    throw std::invalid_argument("edgeft cross_entropy: needs float32 logits [rows, vocab] and targets [rows]");
  if (!mx::issubdtype(targets.dtype(), mx::integer))
    throw std::invalid_argument("edgeft cross_entropy: targets must be integers");
  auto s = mx::default_stream(mx::Device::cpu);
  auto x = mx::contiguous(logits, false, s);
  auto t = mx::contiguous(mx::astype(targets, mx::int32, s), false, s);
  auto outs = mx::array::make_arrays({{x.shape(0)}, {x.shape(0)}}, {mx::float32, mx::float32},
                                     std::make_shared<CrossEntropy>(s), {x, t});
  return outs[0];
}

mx::array softmax(const mx::array& x, int64_t period) {
  if (x.dtype() != mx::float32 || x.ndim() < 2)
    throw std::invalid_argument("edgeft softmax: needs float32 scores with at least 2 axes");
  if (period < 0 || period > x.shape(-2) || period > x.shape(-1))
    throw std::invalid_argument("edgeft softmax: period must be in [0, min(rows, cols)]");
  if (period > 0 && x.shape(-2) % period != 0)
    throw std::invalid_argument("edgeft softmax: rows must be a multiple of the period");
  auto s = mx::default_stream(mx::Device::cpu);
  auto xc = mx::contiguous(x, false, s);
  return mx::array(xc.shape(), mx::float32, std::make_shared<Softmax>(s, period), {xc});
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "edgeft's attention softmax as MLX CPU primitives (see _kernels.cpp)";
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
      std::to_string(MLX_VERSION_PATCH);
  m.def("softmax", &softmax, "x"_a, "period"_a = 0,
        "Softmax over the last axis; with period > 0, causal: row r sees the columns up to "
        "r % period + cols - period.");
  m.def("swiglu", [](const mx::array& gate, const mx::array& up) { return gated(gate, up, SILU); }, "gate"_a, "up"_a,
        "silu(gate) * up");
  m.def("gelu_mul", [](const mx::array& gate, const mx::array& up) { return gated(gate, up, GELU_TANH); }, "gate"_a,
        "up"_a, "gelu_approx(gate) * up");
  m.def("cross_entropy", &cross_entropy, "logits"_a, "targets"_a,
        "logsumexp(logits[i]) - logits[i, targets[i]] for each row i.");
}
