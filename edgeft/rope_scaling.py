"""RoPE scaling that llama.cpp holds as tensors, not metadata, and mlx-lm's side of it.

llama 3.1+ (rope_type llama3): one `rope_freqs.weight` tensor of per-frequency divisors,
written from the config's factors (convert_hf_to_gguf's LlamaModel) and read back into them.
phi3 LongRoPE ("longrope"/"su", Phi-3.5-mini's 128k): the `rope_factors_long/short.weight`
pair plus an attention factor (Phi3MiniModel); llama.cpp applies the short factors at a
context of at most the original length, the long ones beyond. `rope_tensors` is what an
export carries, `model_args` what mlx-lm's class is built from. Pure functions over config
dicts and NumPy arrays; edgeft.families puts them into metadata <-> config.
"""

from __future__ import annotations

import math

import numpy as np

from edgeft.gguf_reader import ModelLoadError

DEFAULT_ROPE_THETA = 10000.0
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # llama 3.1+ RoPE scaling, stored as a tensor
ROPE_FACTORS_LONG = "rope_factors_long.weight"  # phi3 LongRoPE, beyond the original context
ROPE_FACTORS_SHORT = "rope_factors_short.weight"  # phi3 LongRoPE, within it
# Tensors that are hyper-parameters, not weights: the loader folds them into the config.
ROPE_TENSORS = (ROPE_FREQS_TENSOR, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)
PHI3_LONGROPE_TYPES = ("longrope", "su")


def rope_tensors(cfg: dict) -> dict[str, np.ndarray]:
    """The RoPE tensors an export of `cfg` carries (llama.cpp holds these scalings as
    tensors, not metadata): `rope_freqs.weight` for llama3, the LongRoPE pair for phi3."""
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return {ROPE_FREQS_TENSOR: llama3_rope_freqs(cfg)}
    if cfg.get("model_type") == "phi3" and kind in PHI3_LONGROPE_TYPES:
        return {ROPE_FACTORS_LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
                ROPE_FACTORS_SHORT: np.asarray(scaling["short_factor"], dtype=np.float32)}
    return {}


def model_args(cfg: dict) -> dict:
    """The dict mlx-lm's ModelArgs is built from, for a model of config `cfg`.

    Only phi3 LongRoPE differs from `cfg`: mlx-lm's SuScaledRoPE applies the long factors at
    every length, where Hugging Face and llama.cpp apply the short ones up to
    original_max_position_embeddings (llama.cpp: a context of at most that many tokens),
    which is where edgeft trains and checks. So mlx-lm is given the short factors as its
    only ones, and the model it builds computes what llama.cpp runs.
    """
    scaling = cfg.get("rope_scaling") or {}
    if cfg.get("model_type") == "phi3" and scaling.get("type", scaling.get("rope_type")) in PHI3_LONGROPE_TYPES:
        return {**cfg, "rope_scaling": {**scaling, "long_factor": scaling["short_factor"]}}
    return cfg


def phi3_attn_factor(max_positions: int, original: int) -> float:
    """LongRoPE's attention scale (convert_hf_to_gguf's attn_factor, mlx-lm's SuScaledRoPE)."""
    scale = max_positions / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


# --- llama 3 RoPE frequencies ------------------------------------------------------------
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0


def llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """The `rope_freqs.weight` tensor llama.cpp's converter writes for llama3 RoPE scaling."""
    s = cfg["rope_scaling"]
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR))
    high = float(s.get("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR))
    old_ctx = float(s.get("original_max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT))
    base = float(cfg.get("rope_theta") or DEFAULT_ROPE_THETA)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(
        wavelen < old_ctx / high, 1.0,
        np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return out.astype(np.float32)


def llama3_scaling_from_rope_freqs(
    rope_freqs: np.ndarray, rope_theta: float, head_dim: int,
    original_context: int = LLAMA3_ORIGINAL_CONTEXT,
) -> dict:
    """Recover the llama3 `rope_scaling` dict from a `rope_freqs.weight` tensor.

    Meta's released models all use low/high frequency factors 1 and 4; the result is
    checked against the tensor so a file made with other factors is refused, not misread.
    """
    rope_freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": float(rope_freqs.max()),
        "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": int(original_context),
    }
    cfg = {"rope_scaling": scaling, "rope_theta": rope_theta, "head_dim": head_dim}
    if rope_freqs.shape != (head_dim // 2,) or not np.allclose(
        llama3_rope_freqs(cfg), rope_freqs, rtol=1e-4
    ):
        raise ModelLoadError(
            "rope_freqs.weight does not match llama3 RoPE scaling with the standard factors"
        )
    return scaling
