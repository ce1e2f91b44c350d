"""LoRA adapters on a (quantized) base: apply, count, save, load, merge.

The layers are mlx-lm's own (``mlx_lm.tuner.lora.LoRALinear``: ``y = base(x) +
scale * (x @ lora_a) @ lora_b``), and the adapter folder is laid out as mlx-lm writes it
(``adapters.safetensors`` + ``adapter_config.json``), so ``mlx_lm.generate --adapter-path``
reads what edgeft writes. How the frozen base multiplies is edgeft/backend.py's business.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from edgeft.config import LoRAConfig
from edgeft.dequant import dequantized_weight
from edgeft.errors import UserError
from edgeft.families import FUSED_PROJECTIONS
from edgeft.files import atomic_save_safetensors, atomic_write_text

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRAError(UserError, ValueError):
    pass


def layer_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths inside one transformer block whose last name is a target (e.g.
    'self_attn.q_proj' for 'q_proj'); a split projection the model fuses names its fused
    layer (phi3: q_proj -> qkv_proj, up_proj -> gate_up_proj); an unknown target is an
    error naming the known ones."""
    mods = dict(model.layers[0].named_modules())
    linears = [
        name
        for name, m in mods.items()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear))
        and not isinstance(mods.get(name.rpartition(".")[0]), LoRALinear)
    ]
    keys = []
    for t in targets:
        found = [n for n in linears if n == t or n.split(".")[-1] == t]
        if not found and t in FUSED_PROJECTIONS:
            found = [n for n in linears if n.split(".")[-1] == FUSED_PROJECTIONS[t]]
        if not found:
            short = sorted({n.split(".")[-1] for n in linears})
            raise LoRAError(f"LoRA target '{t}' is not a linear layer of this model; known: {', '.join(short)}")
        keys += found
    return sorted(set(keys))


def mlx_lm_parameters(model: nn.Module, cfg: LoRAConfig) -> dict:
    """The ``lora_parameters`` section of mlx-lm's adapter_config.json."""
    return {
        "rank": cfg.rank,
        "scale": cfg.scale,
        "dropout": cfg.dropout,
        "keys": layer_keys(model, cfg.targets),
    }


def num_lora_layers(model: nn.Module, cfg: LoRAConfig) -> int:
    n = len(model.layers)
    return n if cfg.layers is None else min(cfg.layers, n)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze the base and add trainable adapters to the targeted projections of the last
    ``cfg.layers`` blocks (all by default). Seed mx.random before calling for a fixed init."""
    model.freeze()
    linear_to_lora_layers(model, num_lora_layers(model, cfg), mlx_lm_parameters(model, cfg))
    return model


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable adapter parameters, all parameters with quantized weights unpacked)."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for v in adapter_parameters(model).values())
    return trainable, get_total_parameters(model)


def adapter_config(model: nn.Module, cfg: LoRAConfig, base: str) -> dict:
    return {
        "fine_tune_type": "lora",
        "num_layers": num_lora_layers(model, cfg),
        "lora_parameters": mlx_lm_parameters(model, cfg),
        "edgeft": {"base_model": base, "alpha": cfg.alpha, "targets": list(cfg.targets)},
    }


def save_adapters(model: nn.Module, folder: Path, config: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(folder / ADAPTER_WEIGHTS, adapter_parameters(model))
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def read_adapter_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoRAError(f"{path}: no adapter config here; is this a run's adapters folder?") from None
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_adapters(model: nn.Module, folder: Path) -> nn.Module:
    """Add the adapters saved in `folder` to `model` (as mlx-lm's load_adapters does), checking
    every tensor's name and shape."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if config.get("fine_tune_type", "lora") != "lora":
        raise LoRAError(f"{folder}: fine_tune_type {config.get('fine_tune_type')!r} is not supported")
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    weights = mx.load(str(folder / ADAPTER_WEIGHTS))
    expected = adapter_parameters(model)
    for name, w in weights.items():
        if name not in expected:
            raise LoRAError(f"{folder / ADAPTER_WEIGHTS}: tensor {name} has no place in this model")
        if w.shape != expected[name].shape:
            raise LoRAError(
                f"{folder / ADAPTER_WEIGHTS}: tensor {name} has shape {tuple(w.shape)}, "
                f"the model expects {tuple(expected[name].shape)}; was it trained on another base?"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise LoRAError(f"{folder / ADAPTER_WEIGHTS}: missing tensor {missing[0]} (and {len(missing) - 1} more)")
    model.load_weights(list(weights.items()), strict=False)
    return model


def lora_delta(layer: LoRALinear) -> mx.array:
    """The fp32 weight change a LoRA layer adds: scale * (lora_a @ lora_b).T, shape (out, in)."""
    a = layer.lora_a.astype(mx.float32)
    b = layer.lora_b.astype(mx.float32)
    return layer.scale * (a @ b).T


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by an fp32 nn.Linear holding base + delta (in place)."""
    fused = []
    for name, layer in lora_layers(model):
        base = layer.linear
        w = dequantized_weight(base).astype(mx.float32) + lora_delta(layer)
        out_dims, in_dims = w.shape
        lin = nn.Linear(in_dims, out_dims, bias="bias" in base)
        lin.weight = w
        if "bias" in base:
            lin.bias = base.bias
        fused.append((name, lin))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
