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
//   lora_linear(x, w, a, b, scale): a LoRA layer's products, forward and backward.
//   attention(q, k, v, scale, causal, start): softmax(scale q k^T) v as a flash attention, which
//       holds a tile of the scores at a time where the composed attention (the softmax above
//       between two MLX products) writes all T x S of them, forward and backward. With
//       segments, a packed row's samples each attend within themselves, in one call.
//
// exp is Cephes' polynomial (as cpu_kernels.py's _exp: ~2e-7 relative), in loops the compiler
// vectorizes for AVX-512, AVX2 or SSE2 (target_clones picks one when the module loads). The
// module is built against the installed MLX's headers and mlx.core's nanobind (setup.py), and
// cpu_kernels.py uses it only for the MLX version it was built for, after a self-test against
// MLX's own ops. Each primitive runs on the stream it was created on (MLX's default stream at
// the call, which edgeft's stream groups set), one thread per call.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <optional>
#include <string>
#include <vector>

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

// The outputs allocated, and every array registered with the stream's command encoder.
mx::cpu::CommandEncoder& encode(mx::Stream stream, const std::vector<mx::array>& inputs,
                                std::vector<mx::array>& outputs) {
  for (auto& a : outputs) a.set_data(mx::allocator::malloc(a.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) enc.set_input_array(a);
  for (auto& a : outputs) enc.set_output_array(a);
  return enc;
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
    encode(stream(), inputs, outputs)
        .dispatch([x = x.data<float>(), t = t.data<int32_t>(), l = outputs[0].data<float>(),
                   s = outputs[1].data<float>(), rows = x.shape(0), cols = x.shape(1)]() {
          cross_entropy_rows(x, t, l, s, rows, cols);
        });
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

// Attention as one primitive (flash attention: Dao et al., 2022, and its second version's
// backward). Queries in tiles of TILE_Q positions, with the query heads that share a KV head
// stacked as rows of one product; keys in tiles of TILE_K. A query tile's scores exist one key
// tile at a time, in the core's cache, with a running row max and sum (the online softmax),
// where the composed attention writes every score of the T x S square to memory and reads it
// back in each of its passes. The forward keeps the output and each row's logsumexp; the
// backward recomputes the scores tile by tile. The products go to the process's cblas_sgemm
// (MLX's: the BLAS edgeft/_blas.py loaded, through edgeft/_sgemm.c's bf16 when a run has it on);
// where none resolves, a plain loop.
constexpr int64_t TILE_Q = 64, TILE_K = 128;

using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

sgemm_fn blas_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

// The tile products are small: the BLAS's own threads (MKL's, when edgeft runs one stream on two
// cores) only add a wake-up to each. MKL takes a per-thread count for the call's duration.
class OneBlasThread {
 public:
  OneBlasThread() : set_(local_threads()) {
    if (set_) previous_ = set_(1);
  }
  ~OneBlasThread() {
    if (set_) set_(previous_);
  }

 private:
  static int (*local_threads())(int) {  // looked up at the first call, as blas_sgemm()
    static const auto fn = reinterpret_cast<int (*)(int)>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return fn;
  }
  int (*const set_)(int);
  int previous_ = 0;
};

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, row-major; op transposes when asked.
void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc, float alpha = 1.0f) {
  if (m <= 0 || n <= 0) return;
  if (auto fn = blas_sgemm()) {
    fn(101, ta ? 112 : 111, tb ? 112 : 111, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
    return;
  }
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) {
      float s = 0.0f;
      for (int64_t p = 0; p < k; p++) s += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == 0.0f ? 0.0f : beta * c[i * ldc + j]);
    }
}

// While a run's products go in bfloat16 (edgeft/_sgemm.c: train.matmul bf16), the tiles' go too,
// straight to MKL's bf16 GEMM with operands rounded once each (a head's keys and values, a query
// tile, a tile's probabilities), where cblas_sgemm would round both operands in every product.
using bf16_gemm_fn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                              float*, int);
using to_bf16_fn = void (*)(const float*, int, int, int, uint16_t*);

// An operand: fp32 values, and their bf16 copy when the products go in bf16.
struct Operand {
  const float* f;
  const uint16_t* h;
  Operand at(int64_t offset) const { return {f + offset, h ? h + offset : nullptr}; }
};

class Products {
 public:
  // The bf16 GEMM as of now (the dispatch of a primitive's evaluation), for products whose
  // sides (the smallest of them: `side`) are all as large as it takes; else fp32 products.
  explicit Products(int64_t side) {
    static const auto current =
        reinterpret_cast<bf16_gemm_fn (*)(int*)>(dlsym(RTLD_DEFAULT, "edgeft_sgemm_bf16_current"));
    static const auto round = reinterpret_cast<to_bf16_fn>(dlsym(RTLD_DEFAULT, "edgeft_to_bf16"));
    int from = 0;
    if (current && round && (bf16_ = current(&from)) && side >= from)
      round_ = round;
    else
      bf16_ = nullptr;
  }
  bool bf16() const { return bf16_ != nullptr; }
  // x (n values) as an operand: rounded into `copy` when the products go in bf16.
  Operand operand(const float* x, int64_t n, std::vector<uint16_t>& copy) const {
    if (!bf16_) return {x, nullptr};
    if (int64_t(copy.size()) < n) copy.resize(n);
    round_(x, 1, int(n), int(n), copy.data());
    return {x, copy.data()};
  }
  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, Operand a, int64_t lda, Operand b, int64_t ldb,
            float beta, float* c, int64_t ldc) const {
    if (m <= 0 || n <= 0) return;
    if (bf16_ && a.h && b.h)
      bf16_(101, ta ? 112 : 111, tb ? 112 : 111, int(m), int(n), int(k), 1.0f, a.h, int(lda), b.h, int(ldb), beta, c,
            int(ldc));
    else
      sgemm(ta, tb, m, n, k, a.f, lda, b.f, ldb, beta, c, ldc);
  }

 private:
  bf16_gemm_fn bf16_ = nullptr;
  to_bf16_fn round_ = nullptr;
};

// The shapes of one attention call: q [B, H, T, D], k and v [B, Hkv, S, D]; query t sits at key
// position start + t and, when causal, sees the keys up to it: with a sliding window, only the
// last `window` of those (its own included). A segment of a packed row (segment()) is the same
// within rows [q0, q0 + T) of q's Tq and [k0, k0 + S) of the keys' Sk.
struct Attn {
  int64_t B, H, Hkv, T, S, D, start;
  bool causal;
  int64_t window;  // 0: none
  int64_t Tq = T, Sk = S, q0 = 0, k0 = 0;
  bool operator==(const Attn&) const = default;
  // Causal attention within rows [a, a + n) of a packed row (its own queries and keys).
  Attn segment(int64_t a, int64_t n) const {
    Attn s = *this;
    s.T = s.S = n;
    s.start = 0;
    s.q0 = s.k0 = a;
    return s;
  }
  int64_t rep() const { return H / Hkv; }
  // The smallest side of the tile products but the edge tiles': the width, the stacked query
  // rows, the keys.
  int64_t sides() const { return std::min({D, rep() * std::min(T, TILE_Q), std::min(S, TILE_K)}); }
  // The keys query t sees: [first(t), seen(t)).
  int64_t seen(int64_t t) const { return causal ? std::min(S, start + t + 1) : S; }
  int64_t first(int64_t t) const { return window > 0 ? std::max<int64_t>(0, start + t - window + 1) : 0; }
  // The first key tile any query of [a, ...) sees.
  int64_t first_tile(int64_t a) const { return first(a) / TILE_K * TILE_K; }
  // The keys any query sees: [0, keys()).
  int64_t keys() const { return causal ? std::min(S, start + T) : S; }
  // The query tile at a: its queries, its stacked rows, the keys its last query sees.
  struct Tile {
    int64_t n, rows, keys;
  };
  Tile tile(int64_t a) const {
    const int64_t n = std::min(TILE_Q, T - a);
    return {n, rep() * n, seen(a + n - 1)};
  }
  // Query t of KV head g's query head h (batch b): its row among q's (and the output's) B H T.
  int64_t row(int64_t b, int64_t g, int64_t h, int64_t t) const { return ((b * H) + g * rep() + h) * Tq + q0 + t; }
};

// The rows of query tile [a, a + n) of KV head g's query heads, stacked head by head, times scale.
void gather_rows(const float* x, const Attn& s, int64_t b, int64_t g, int64_t a, int64_t n, float scale, float* out) {
  for (int64_t h = 0; h < s.rep(); h++) {
    const float* src = x + s.row(b, g, h, a) * s.D;
    float* dst = out + h * n * s.D;
    for (int64_t i = 0; i < n * s.D; i++) dst[i] = scale * src[i];
  }
}

void scatter_rows(const float* rows, const Attn& s, int64_t b, int64_t g, int64_t a, int64_t n, float* x) {
  for (int64_t h = 0; h < s.rep(); h++)
    std::memcpy(x + s.row(b, g, h, a) * s.D, rows + h * n * s.D, n * s.D * sizeof(float));
}

// The columns [lo, hi) of a tile's row that its query sees.
struct Seen {
  int64_t lo, hi;
};

// One key tile's scores (rows x cols) of a query tile: exp(score - shift[r]) for the keys row r
// sees (0 for the rest), in place of the scores.
EDGEFT_CLONES
void tile_exp(float* p, int64_t rows, int64_t cols, const Seen* sees, const float* shift) {
  for (int64_t r = 0; r < rows; r++) {
    float* pr = p + r * cols;
    const int64_t lo = sees[r].lo, hi = sees[r].hi;
    const float m = shift[r];
    for (int64_t j = 0; j < lo; j++) pr[j] = 0.0f;
    for (int64_t j = lo; j < hi; j++) pr[j] = exp_(pr[j] - m);
    for (int64_t j = hi; j < cols; j++) pr[j] = 0.0f;
  }
}

// The online softmax's step over one key tile: new row maxes, the tile's exp, rescaled sums and
// output rows.
EDGEFT_CLONES
void tile_online(float* p, int64_t rows, int64_t cols, const Seen* sees, float* m, float* l, float* o, int64_t d,
                 float* shift) {
  for (int64_t r = 0; r < rows; r++) {
    const float mt = row_max(p + r * cols + sees[r].lo, sees[r].hi - sees[r].lo);
    shift[r] = mt > m[r] ? mt : m[r];
  }
  tile_exp(p, rows, cols, sees, shift);
  for (int64_t r = 0; r < rows; r++) {
    const float* pr = p + r * cols;
    float sv[LANES];
    for (int k = 0; k < LANES; k++) sv[k] = 0.0f;
    int64_t j = 0;
    for (; j + LANES <= cols; j += LANES)
      for (int k = 0; k < LANES; k++) sv[k] += pr[j + k];
    float sum = 0.0f;
    for (int k = 0; k < LANES; k++) sum += sv[k];
    for (; j < cols; j++) sum += pr[j];
    // 0 for a row's first keys (m = -inf); 1 while it has seen none (a window's earlier tiles)
    const float alpha = shift[r] == -INFINITY ? 1.0f : exp_(m[r] - shift[r]);
    l[r] = l[r] * alpha + sum;
    m[r] = shift[r];
    if (alpha != 1.0f)
      for (int64_t i = 0; i < d; i++) o[r * d + i] *= alpha;
  }
}

// dS = P * (dP - delta[r]), in place of dP.
EDGEFT_CLONES
void tile_ds(const float* p, float* dp, int64_t rows, int64_t cols, const float* delta) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = 0; j < cols; j++) dp[r * cols + j] = p[r * cols + j] * (dp[r * cols + j] - delta[r]);
}

// Row r of the stacked tile is query a + r % n: the keys it sees among key tile [c, c + cols).
void tile_sees(const Attn& s, int64_t a, int64_t n, int64_t c, int64_t cols, Seen* sees) {
  for (int64_t r = 0; r < s.rep() * n; r++) {
    const int64_t t = a + r % n, hi = std::clamp<int64_t>(s.seen(t) - c, 0, cols);
    sees[r] = {std::clamp<int64_t>(s.first(t) - c, 0, hi), hi};
  }
}

// KV head (b, g): its offset in k and v, and its keys and values as operands.
struct Head {
  int64_t kv;
  Operand k, v;
};
Head head(const Products& mm, const Attn& s, const float* k, const float* v, int64_t b, int64_t g,
          std::vector<uint16_t>& k16, std::vector<uint16_t>& v16) {
  const int64_t kv = ((b * s.Hkv + g) * s.Sk + s.k0) * s.D;
  return {kv, mm.operand(k + kv, s.keys() * s.D, k16), mm.operand(v + kv, s.keys() * s.D, v16)};
}

void attention_fwd(const float* q, const float* k, const float* v, float* out, float* lse, const Attn& s,
                   float scale) {
  const OneBlasThread one;
  const Products mm(s.sides());
  const int64_t D = s.D, rows_max = s.rep() * TILE_Q;
  std::vector<float> qs(rows_max * D), o(rows_max * D), p(rows_max * TILE_K), m(rows_max), l(rows_max), shift(rows_max);
  std::vector<uint16_t> k16, v16, q16, p16;
  std::vector<Seen> sees(rows_max);
  for (int64_t b = 0; b < s.B; b++)
    for (int64_t g = 0; g < s.Hkv; g++) {
      const auto [kv, kg, vg] = head(mm, s, k, v, b, g, k16, v16);
      for (int64_t a = 0; a < s.T; a += TILE_Q) {
        const auto [n, rows, keys] = s.tile(a);
        gather_rows(q, s, b, g, a, n, scale, qs.data());
        const Operand qt = mm.operand(qs.data(), rows * D, q16);
        std::fill(m.begin(), m.begin() + rows, -INFINITY);
        std::fill(l.begin(), l.begin() + rows, 0.0f);
        std::fill(o.begin(), o.begin() + rows * D, 0.0f);
        for (int64_t c = s.first_tile(a); c < keys; c += TILE_K) {
          const int64_t cols = std::min(TILE_K, keys - c);
          mm.gemm(false, true, rows, cols, D, qt, D, kg.at(c * D), D, 0.0f, p.data(), cols);
          tile_sees(s, a, n, c, cols, sees.data());
          tile_online(p.data(), rows, cols, sees.data(), m.data(), l.data(), o.data(), D, shift.data());
          mm.gemm(false, false, rows, D, cols, mm.operand(p.data(), rows * cols, p16), cols, vg.at(c * D), D, 1.0f,
                  o.data(), D);
        }
        for (int64_t r = 0; r < rows; r++) {
          const float inv = 1.0f / l[r];
          for (int64_t i = 0; i < D; i++) o[r * D + i] *= inv;
          lse[s.row(b, g, r / n, a + r % n)] = m[r] + std::log(l[r]);
        }
        scatter_rows(o.data(), s, b, g, a, n, out);
      }
    }
}

void attention_bwd(const float* q, const float* k, const float* v, const float* out, const float* lse,
                   const float* dout, float* dq, float* dk, float* dv, const Attn& s, float scale) {
  const OneBlasThread one;
  const Products mm(s.sides());
  const int64_t D = s.D, rows_max = s.rep() * TILE_Q;
  std::vector<float> qs(rows_max * D), dos(rows_max * D), os(rows_max * D), dqs(rows_max * D), p(rows_max * TILE_K),
      dp(rows_max * TILE_K), lses(rows_max), delta(rows_max);
  std::vector<uint16_t> k16, v16, q16, do16, p16, ds16;
  std::vector<Seen> sees(rows_max);
  for (int64_t b = 0; b < s.B; b++)
    for (int64_t g = 0; g < s.Hkv; g++) {
      const auto [kv, kg, vg] = head(mm, s, k, v, b, g, k16, v16);
      for (int64_t a = 0; a < s.T; a += TILE_Q) {
        const auto [n, rows, keys] = s.tile(a);
        gather_rows(q, s, b, g, a, n, scale, qs.data());
        gather_rows(dout, s, b, g, a, n, 1.0f, dos.data());
        gather_rows(out, s, b, g, a, n, 1.0f, os.data());
        const Operand qt = mm.operand(qs.data(), rows * D, q16), dot = mm.operand(dos.data(), rows * D, do16);
        for (int64_t r = 0; r < rows; r++) {
          lses[r] = lse[s.row(b, g, r / n, a + r % n)];
          float d = 0.0f;
          for (int64_t i = 0; i < D; i++) d += dos[r * D + i] * os[r * D + i];
          delta[r] = d;
        }
        std::fill(dqs.begin(), dqs.begin() + rows * D, 0.0f);
        for (int64_t c = s.first_tile(a); c < keys; c += TILE_K) {
          const int64_t cols = std::min(TILE_K, keys - c);
          mm.gemm(false, true, rows, cols, D, qt, D, kg.at(c * D), D, 0.0f, p.data(), cols);
          tile_sees(s, a, n, c, cols, sees.data());
          tile_exp(p.data(), rows, cols, sees.data(), lses.data());
          mm.gemm(true, false, cols, D, rows, mm.operand(p.data(), rows * cols, p16), cols, dot, D, 1.0f,
                  dv + kv + c * D, D);
          mm.gemm(false, true, rows, cols, D, dot, D, vg.at(c * D), D, 0.0f, dp.data(), cols);
          tile_ds(p.data(), dp.data(), rows, cols, delta.data());
          const Operand ds = mm.operand(dp.data(), rows * cols, ds16);
          mm.gemm(false, false, rows, D, cols, ds, cols, kg.at(c * D), D, 1.0f, dqs.data(), D);
          mm.gemm(true, false, cols, D, rows, ds, cols, qt, D, 1.0f, dk + kv + c * D, D);
        }
        for (int64_t i = 0; i < rows * D; i++) dqs[i] *= scale;
        scatter_rows(dqs.data(), s, b, g, a, n, dq);
      }
    }
}

// What the attention's forward and backward primitives share: the call's shape and scale, and
// the lengths of the samples of a packed row (none: one attention over the whole call).
class AttentionPrimitive : public mx::Primitive {
 public:
  AttentionPrimitive(mx::Stream stream, Attn shape, float scale, std::vector<int64_t> segments)
      : mx::Primitive(stream), s_(shape), scale_(scale), segments_(std::move(segments)) {}
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeft's attention kernel runs on the CPU only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AttentionPrimitive&>(other);
    return scale_ == o.scale_ && s_ == o.s_ && segments_ == o.segments_;
  }

 protected:
  // Each attention the call holds: the whole call's, or each sample's.
  std::vector<Attn> parts() const {
    if (segments_.empty()) return {s_};
    std::vector<Attn> out;
    int64_t a = 0;
    for (int64_t n : segments_) {
      out.push_back(s_.segment(a, n));
      a += n;
    }
    return out;
  }
  Attn s_;
  float scale_;
  std::vector<int64_t> segments_;
};

class AttentionVJP : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    encode(stream(), inputs, outputs)
        .dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(),
                   o = inputs[3].data<float>(), lse = inputs[4].data<float>(), g = inputs[5].data<float>(),
                   dq = outputs[0].data<float>(), dk = outputs[1].data<float>(), dv = outputs[2].data<float>(),
                   s = s_, parts = parts(), scale = scale_]() {
          std::memset(dk, 0, s.B * s.Hkv * s.S * s.D * sizeof(float));
          std::memset(dv, 0, s.B * s.Hkv * s.S * s.D * sizeof(float));
          for (const Attn& part : parts) attention_bwd(q, k, v, o, lse, g, dq, dk, dv, part, scale);
        });
  }
  const char* name() const override { return "EdgeftAttentionVJP"; }
};

class Attention : public AttentionPrimitive {
 public:
  using AttentionPrimitive::AttentionPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    encode(stream(), inputs, outputs)
        .dispatch([q = inputs[0].data<float>(), k = inputs[1].data<float>(), v = inputs[2].data<float>(),
                   o = outputs[0].data<float>(), lse = outputs[1].data<float>(), parts = parts(), scale = scale_]() {
          for (const Attn& part : parts) attention_fwd(q, k, v, o, lse, part, scale);
        });
  }
  // The logsumexp output is the backward's: its cotangent is not used.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    auto g = mx::contiguous(cotangents[0], false, stream());
    auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                        {mx::float32, mx::float32, mx::float32},
                                        std::make_shared<AttentionVJP>(stream(), s_, scale_, segments_),
                                        {primals[0], primals[1], primals[2], outputs[0], outputs[1], g});
    std::vector<mx::array> out;
    for (int arg : argnums) out.push_back(grads[arg]);
    return out;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {q.shape(), {q.shape(0), q.shape(1), q.shape(2)}};
  }
  const char* name() const override { return "EdgeftAttention"; }
};

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    std::optional<int64_t> start, int64_t window, std::vector<int64_t> segments) {
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32 || q.ndim() != 4 ||
      k.ndim() != 4 || k.shape() != v.shape())
    throw std::invalid_argument("edgeft attention: needs float32 q [B, H, T, D] and k, v [B, Hkv, S, D]");
  if (k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("edgeft attention: k and v must match q's batch and width, with H a multiple of Hkv");
  const int64_t T = q.shape(2), S = k.shape(2), first = start.value_or(S - T);
  if (causal && (first < 0 || first + T > S))
    throw std::invalid_argument("edgeft attention: causal queries must sit among the keys (0 <= start <= S - T)");
  if (window < 0 || (window > 0 && !causal))
    throw std::invalid_argument("edgeft attention: a sliding window is a positive number of keys, of causal attention");
  if (!segments.empty()) {
    bool positive = true;
    int64_t total = 0;
    for (int64_t n : segments) {
      positive = positive && n > 0;
      total += n;
    }
    if (!positive || !causal || first != 0 || T != S || total != T)
      throw std::invalid_argument("edgeft attention: segments are positive lengths adding up to the queries, "
                                  "which are the keys, causal");
  }
  Attn shape{q.shape(0), q.shape(1), k.shape(1), T, S, q.shape(3), first, causal, window};
  auto s = mx::default_stream(mx::Device::cpu);
  auto qc = mx::contiguous(q, false, s), kc = mx::contiguous(k, false, s), vc = mx::contiguous(v, false, s);
  auto outs = mx::array::make_arrays({q.shape(), {q.shape(0), q.shape(1), T}}, {mx::float32, mx::float32},
                                     std::make_shared<Attention>(s, shape, scale, std::move(segments)), {qc, kc, vc});
  return outs[0];
}

// A LoRA layer (mlx-lm's LoRALinear without dropout): y = x W^T + scale (x A) B, with W the
// frozen base weight [out, in] (a kept one: edgeft/_sgemm.c gives its bf16 copy while a run's
// products go in bf16), A [in, r], B [r, out]. As MLX ops its forward and backward were some 28
// ops a layer (the products, their transposes and reshapes, the scale, the adds of the
// gradients), each paying MLX's per-op cost; here one primitive each way: the forward's three
// products, the backward's five (dx = G W + u A^T accumulated in one buffer). The products go to
// the process's cblas_sgemm (edgeft/_sgemm.c: split, bf16), as MLX's own would.
struct Lora {
  int64_t M, in, out, r;
  float scale;
  bool operator==(const Lora&) const = default;
};

// y = x W^T + scale t B with t = x A (kept for the backward).
void lora_fwd(const float* x, const float* w, const float* a, const float* b, float* y, float* t, const Lora& s) {
  sgemm(false, false, s.M, s.r, s.in, x, s.in, a, s.r, 0.0f, t, s.r);
  sgemm(false, true, s.M, s.out, s.in, x, s.in, w, s.in, 0.0f, y, s.out);
  sgemm(false, false, s.M, s.out, s.r, t, s.r, b, s.out, 1.0f, y, s.out, s.scale);
}

// From G = dL/dy: u = scale G B^T, dB = scale t^T G, dA = x^T u, dx = G W + u A^T, and dW = G^T x
// when asked (a base weight that trains).
void lora_bwd(const float* x, const float* w, const float* a, const float* b, const float* t, const float* g,
              float* dx, float* da, float* db, float* dw, const Lora& s) {
  std::vector<float> u(s.M * s.r);
  sgemm(false, true, s.M, s.r, s.out, g, s.out, b, s.out, 0.0f, u.data(), s.r, s.scale);
  if (s.M == 0) {  // no rows: the weights' gradients are zeros
    std::memset(da, 0, s.in * s.r * sizeof(float));
    std::memset(db, 0, s.r * s.out * sizeof(float));
    if (dw) std::memset(dw, 0, s.out * s.in * sizeof(float));
    return;
  }
  sgemm(true, false, s.r, s.out, s.M, t, s.r, g, s.out, 0.0f, db, s.out, s.scale);
  sgemm(true, false, s.in, s.r, s.M, x, s.in, u.data(), s.r, 0.0f, da, s.r);
  sgemm(false, false, s.M, s.in, s.out, g, s.out, w, s.in, 0.0f, dx, s.in);
  sgemm(false, true, s.M, s.in, s.r, u.data(), s.r, a, s.r, 1.0f, dx, s.in);
  if (dw) sgemm(true, false, s.out, s.in, s.M, g, s.out, x, s.in, 0.0f, dw, s.in);
}

class LoraPrimitive : public mx::Primitive {
 public:
  LoraPrimitive(mx::Stream stream, Lora shape) : mx::Primitive(stream), s_(shape) {}
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeft's LoRA kernel runs on the CPU only");
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return s_ == static_cast<const LoraPrimitive&>(other).s_;
  }

 protected:
  Lora s_;
};

// Inputs x, W, A, B, t, G; outputs dx, dA, dB, and dW when it has a fourth.
class LoraVJP : public LoraPrimitive {
 public:
  using LoraPrimitive::LoraPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    encode(stream(), inputs, outputs)
        .dispatch([x = inputs[0].data<float>(), w = inputs[1].data<float>(), a = inputs[2].data<float>(),
                   b = inputs[3].data<float>(), t = inputs[4].data<float>(), g = inputs[5].data<float>(),
                   dx = outputs[0].data<float>(), da = outputs[1].data<float>(), db = outputs[2].data<float>(),
                   dw = outputs.size() > 3 ? outputs[3].data<float>() : nullptr,
                   s = s_]() { lora_bwd(x, w, a, b, t, g, dx, da, db, dw, s); });
  }
  const char* name() const override { return "EdgeftLoraVJP"; }
};

// Inputs x, W, A, B; outputs y and t = x A (the backward's).
class LoraLinear : public LoraPrimitive {
 public:
  using LoraPrimitive::LoraPrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    encode(stream(), inputs, outputs)
        .dispatch([x = inputs[0].data<float>(), w = inputs[1].data<float>(), a = inputs[2].data<float>(),
                   b = inputs[3].data<float>(), y = outputs[0].data<float>(), t = outputs[1].data<float>(),
                   s = s_]() { lora_fwd(x, w, a, b, y, t, s); });
  }
  // t's cotangent is not used: t is the backward's own.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override {
    const bool dw = std::find(argnums.begin(), argnums.end(), 1) != argnums.end();
    std::vector<mx::Shape> shapes{primals[0].shape(), primals[2].shape(), primals[3].shape()};
    if (dw) shapes.push_back(primals[1].shape());
    auto g = mx::contiguous(cotangents[0], false, stream());
    auto grads = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                        std::make_shared<LoraVJP>(stream(), s_),
                                        {primals[0], primals[1], primals[2], primals[3], outputs[1], g});
    std::vector<mx::array> out;
    for (int arg : argnums) out.push_back(grads[arg == 0 ? 0 : arg == 1 ? 3 : arg - 1]);
    return out;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto y = inputs[0].shape();
    y.back() = s_.out;
    return {y, {int(s_.M), int(s_.r)}};
  }
  const char* name() const override { return "EdgeftLoraLinear"; }
};

mx::array lora_linear(const mx::array& x, const mx::array& w, const mx::array& a, const mx::array& b, float scale) {
  for (const auto* m : {&x, &w, &a, &b})
    if (m->dtype() != mx::float32) throw std::invalid_argument("edgeft lora_linear: needs float32 arrays");
  if (x.ndim() < 1 || w.ndim() != 2 || a.ndim() != 2 || b.ndim() != 2 || w.shape(1) != x.shape(-1) ||
      a.shape(0) != x.shape(-1) || b.shape(0) != a.shape(1) || b.shape(1) != w.shape(0))
    throw std::invalid_argument("edgeft lora_linear: needs x [..., in], W [out, in], A [in, r], B [r, out]");
  const int64_t in = x.shape(-1), M = in ? x.size() / in : 0;
  Lora shape{M, in, w.shape(0), a.shape(1), scale};
  auto s = mx::default_stream(mx::Device::cpu);
  auto y = x.shape();
  y.back() = int(shape.out);
  auto outs = mx::array::make_arrays({y, {int(M), int(shape.r)}}, {mx::float32, mx::float32},
                                     std::make_shared<LoraLinear>(s, shape),
                                     {mx::contiguous(x, false, s), mx::contiguous(w, false, s),
                                      mx::contiguous(a, false, s), mx::contiguous(b, false, s)});
  return outs[0];
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.doc() = "edgeft's exp-heavy ops and attention as MLX CPU primitives (see _kernels.cpp)";
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) + "." +
      std::to_string(MLX_VERSION_PATCH);
  m.def("softmax", &softmax, "x"_a, "period"_a = 0,
        "Softmax over the last axis; with period > 0, causal: row r sees the columns up to "
        "r % period + cols - period.");
  m.def("swiglu", [](const mx::array& gate, const mx::array& up) { return gated(gate, up, SILU); }, "gate"_a, "up"_a,
        "silu(gate) * up");
  m.def("gelu_mul", [](const mx::array& gate, const mx::array& up) { return gated(gate, up, GELU_TANH); }, "gate"_a,
        "up"_a, "gelu_approx(gate) * up");
  m.def("lora_linear", &lora_linear, "x"_a, "w"_a, "a"_a, "b"_a, "scale"_a,
        "x W^T + scale (x A) B, a LoRA layer's product, forward and backward as one primitive each.");
  m.def("cross_entropy", &cross_entropy, "logits"_a, "targets"_a,
        "logsumexp(logits[i]) - logits[i, targets[i]] for each row i.");
  m.def("attention", &attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, "start"_a = nb::none(), "window"_a = 0,
        "segments"_a = std::vector<int64_t>(),
        "softmax(scale q k^T) v with grouped KV heads; when causal, query t sees the keys up to "
        "start + t (start: S - T unless given), with window > 0 only the last `window` of them; with "
        "segments (the lengths of a packed row's samples), causal attention within each.");
}
