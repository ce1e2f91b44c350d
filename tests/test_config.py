"""edgeft.config: one source of defaults, every value checked when the config is built."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from edgeft import config as C
from edgeft.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = ROOT / "recipes" / f"{C.DEFAULT_RECIPE}.yaml"


def test_the_default_recipe_restates_no_default():
    """Editing a dataclass default changes what a default run does: the recipe overrides none."""
    assert yaml.safe_load(DEFAULT_RECIPE.read_text()) in (None, {})
    assert C.load_recipe() == RunConfig()


def test_the_dataclass_defaults_are_the_brand_voice_run():
    cfg = RunConfig()
    assert (cfg.model.name, cfg.model.max_seq_len) == ("smollm2-135m-instruct", 384)
    t = cfg.train
    assert (t.steps, t.learning_rate, t.warmup_steps, t.eval_every, t.save_every) == (60, 2e-4, 5, 20, 20)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.export.quant) == (8, 16.0, C.ALL_LINEAR, "q8_0")


def test_the_recipe_example_is_a_valid_recipe():
    """The commented example in the default recipe, uncommented, builds (and differs)."""
    text = DEFAULT_RECIPE.read_text().split("For example:", 1)[1]
    body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.strip().splitlines())
    example = RunConfig.from_dict(yaml.safe_load(body), where="example")
    assert example.train.steps != RunConfig().train.steps and example.export.quant == "q4_k_m"


def test_the_recipes_ship_without_a_symlink():
    assert not (ROOT / "edgeft" / "recipes").is_symlink()
    assert C.recipe_path(C.DEFAULT_RECIPE).resolve() == DEFAULT_RECIPE.resolve()


def test_export_quants_are_one_list():
    from edgeft import export

    assert export.QUANTS is C.QUANTS and export.LLAMA_CPP_QUANTS is C.LLAMA_CPP_QUANTS
    assert all(export.check_quant(q) == q for q in C.QUANTS)


def test_coerce_takes_only_what_it_uses():
    import inspect

    assert list(inspect.signature(C._coerce).parameters) == ["value", "typ", "where"]


BAD_VALUES = [
    ("model", "name", " "),
    ("model", "quantize_bits", 3),
    ("model", "max_seq_len", 4),
    ("lora", "rank", 0),
    ("lora", "alpha", 0),
    ("lora", "alpha", math.inf),
    ("lora", "dropout", 1.0),
    ("lora", "targets", []),
    ("lora", "targets", ["q_proj", ""]),
    ("lora", "layers", 0),
    ("data", "train", ""),
    ("data", "valid", " "),
    ("data", "valid_fraction", 1.0),
    ("data", "overlong", "cut"),
    ("train", "steps", 0),
    ("train", "batch_size", 0),
    ("train", "grad_accum", 0),
    ("train", "matmul", "fp16"),
    ("train", "learning_rate", math.nan),
    ("train", "learning_rate", -1e-4),
    ("train", "warmup_steps", -1),
    ("train", "min_lr_ratio", 1.5),
    ("train", "weight_decay", -0.1),
    ("train", "max_grad_norm", 0.0),
    ("train", "seed", -1),
    ("train", "eval_every", -5),
    ("train", "eval_batches", 0),
    ("train", "save_every", -1),
    ("train", "keep_checkpoints", 0),
    ("train", "keep_best_margin", -0.1),
    ("train", "log_every", 0),
    ("train", "peer_timeout_s", 0.0),
    ("export", "quant", "q3_xyz"),
    ("generate", "max_tokens", 0),
    ("generate", "temperature", -0.5),
    ("generate", "repeat_penalty", 0.0),
    ("generate", "repeat_last_n", -1),
    ("eval", "max_prompts", 0),
]


@pytest.mark.parametrize("section, key, value", BAD_VALUES)
def test_every_field_is_checked_when_the_config_is_built(section, key, value):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({section: {key: value}}, where="recipe r.yaml")
    message = str(e.value)
    assert message.startswith("recipe r.yaml: ") and f"{section}.{key}" in message and "\n" not in message


def test_every_field_of_every_section_has_a_bad_value_case():
    """The list above covers every numeric and free-text field (bools take any value)."""
    cases = {(s, k) for s, k, _ in BAD_VALUES}
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            if str(f.type) in ("bool", "str | None") and (section.name, f.name) not in (("data", "train"), ("data", "valid")):
                continue  # flags, and free text such as the system prompt
            assert (section.name, f.name) in cases, f"no bad-value case for {section.name}.{f.name}"


def test_an_unknown_quant_names_the_known_ones():
    with pytest.raises(ConfigError, match="q3_xyz.*choose one of f16, bf16, q8_0"):
        RunConfig.from_dict({"export": {"quant": "q3_xyz"}})
    assert RunConfig.from_dict({"export": {"quant": "Q4_K_M"}}).export.quant == "Q4_K_M"  # export lower-cases
