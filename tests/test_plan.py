"""edgeft.plan: parameter and byte counts are exact, the peak-memory estimate is within 15% of
a real `edgeft tune` process's measured peak on a tiny model, and the preflight refuses (or,
with train.auto_fit, shrinks) a run that will not fit, with the numbers.

The SmolLM2 figures (measured by hand, see the README's Reliability section):
    edgeft plan --data examples/brand_voice.jsonl
"""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from tiny import make_tiny

from edgeft import backend, data_files, data_stats, lora, plan, system, timing
from edgeft.cli import main
from edgeft.config import DataConfig, LoRAConfig, RunConfig
from edgeft.loader import load

TOLERANCE = 0.15


def uniform_chats(path, n=24, words=12):
    """Chats whose token counts are all equal, so every batch of a run has the same shape."""
    rows = []
    for i in range(10, 10 + n):
        q = " ".join(["tea"] * words)
        rows.append({"messages": [{"role": "user", "content": f"question {i}: {q}"},
                                  {"role": "assistant", "content": f"answer {i}: {q} {q}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    (d / "model").mkdir()
    return d, make_tiny("llama", d / "model", "q8_0")[0]


@pytest.mark.parametrize("targets, layers", [(LoRAConfig().targets, None), (["q_proj", "v_proj"], 1),
                                             (["down_proj", "o_proj"], None)])
def test_lora_parameter_count_is_exact(tiny, targets, layers):
    _, path = tiny
    loaded = load(path)
    cfg = LoRAConfig(rank=4, targets=targets, layers=layers)
    lora.apply_lora(loaded.model, cfg)
    assert plan.lora_parameters(loaded.config, cfg) == lora.count_parameters(loaded.model)[0]


@pytest.mark.parametrize("quant", [None, "f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tie", [True, False])
def test_weight_bytes_from_the_file_equal_the_loaded_model(tmp_path, quant, tie):
    path, _, cfg = make_tiny("llama", tmp_path, quant, tie=tie)
    loaded = load(path)
    backend.prepare(loaded.model, cpu=True)
    from_model = plan.quant_info_from_model(loaded.model, "cpu")
    from_file = plan.quant_info_from_gguf(path, device="cpu")
    assert from_file.weight_bytes == from_model.weight_bytes
    assert (from_file.linear_quantized, from_file.head_quantized) == (from_model.linear_quantized, from_model.head_quantized)
    if quant is None:
        n = sum(v.size for _, v in tree_flatten(loaded.model.parameters()))
        assert plan.base_parameters(loaded.config) == n


def measured_peaks(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    return max(r["mlx_peak_gb"] for r in train) * 1e9, max(r["peak_mem_gb"] for r in train) * 1e9


@pytest.mark.parametrize("batch", [4, 8])
def test_estimate_is_within_15_percent_of_a_real_runs_peak(tiny, batch):
    """A fresh `edgeft tune` process (a clean peak) on equal-length chats: every batch has the
    shape the estimate assumes. The estimate tune made for itself before training (which
    measures what the process holds besides MLX) against the process's measured peak, and
    MLX's part, recomputed here, against MLX's own peak."""
    d, path = tiny
    data = uniform_chats(d / "uniform.jsonl")
    runs = d / f"runs{batch}"
    env = {**os.environ, "EDGEFT_HOME": str(d / "home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "edgeft.cli", "tune", "--data", str(data), "--model", str(path),
                        "--steps", "4", "--batch-size", str(batch), "--eval-every", "0", "--no-export",
                        "--name", "p", "--runs-dir", str(runs)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    mlx_peak, process_peak = measured_peaks(runs / "p")
    tune_estimate = json.loads((runs / "p" / "memory_plan.json").read_text())

    loaded = load(path, tokenizer_only=True)
    samples, _ = data_files.load_samples(data, loaded.tokenizer, DataConfig(), 512)
    assert len({len(s.tokens) for s in samples}) == 1
    width, loss_tokens, lengths = plan.batch_shape(samples, batch, 512)
    est = plan.estimate_peak_bytes(loaded.config, LoRAConfig(), batch, width, plan.quant_info_from_gguf(path),
                                   loss_tokens=loss_tokens, lengths=lengths if plan.packs(config=loaded.config)(lengths) else None,
                                   runtime_bytes=0)
    total = tune_estimate["total"]
    print(f"\ntiny, batch {batch} x {width}: MLX peak measured {mlx_peak / 1e6:.2f} MB, estimated "
          f"{est.mlx / 1e6:.2f} MB ({est.mlx / mlx_peak - 1:+.1%}); process peak {process_peak / 1e6:.1f} MB, "
          f"tune's estimate {total / 1e6:.1f} MB ({total / process_peak - 1:+.1%}; runtime part "
          f"{tune_estimate['runtime'] / 1e6:.1f} MB, unexplained {(process_peak - total) / 1e6:+.1f} MB)")
    assert tune_estimate["mlx"] == est.mlx  # tune planned the very batch shape computed here
    assert abs(est.mlx / mlx_peak - 1) < TOLERANCE
    assert abs(total / process_peak - 1) < TOLERANCE


def test_auto_fit_lowers_the_batch_keeping_samples_per_step():
    def estimate(b, gc):
        return plan.Breakdown(0, 0, 0, 50, 100 * b, 0, 0, 0, batch_size=b, seq_len=64)

    fit = plan.fit_memory(estimate, 8, 1, False, available=10_000, auto_fit=True)
    assert (fit.batch_size, fit.grad_accum, fit.grad_checkpoint, fit.changes) == (8, 1, False, [])
    fit = plan.fit_memory(estimate, 8, 1, False, available=460, auto_fit=True)
    assert (fit.batch_size, fit.grad_accum, fit.grad_checkpoint) == (4, 2, False)
    assert fit.changes == ["batch size 8 -> 4 with grad_accum 2 (the same samples per optimizer step)"]
    fit = plan.fit_memory(estimate, 6, 2, False, available=300, auto_fit=True)
    assert (fit.batch_size, fit.grad_accum) == (2, 6)
    with pytest.raises(plan.PlanError, match=r"needs about .* even at batch size 1 .* try --grad-checkpoint"):
        plan.fit_memory(estimate, 8, 1, False, available=100, auto_fit=True)
    with pytest.raises(plan.PlanError, match=r"needs about .*but .* is available; lower --batch-size"):
        plan.fit_memory(estimate, 8, 1, False, available=460, auto_fit=False)


def test_bf16_products_hold_the_kept_weights_as_copies_outside_mlx(tiny):
    """train.matmul bf16: each kept dequantized weight has a 2-byte copy in edgeft/_sgemm.c (not an
    MLX array) and its fp32 memory is given back, which MLX still counts; the logits' gradient
    is rounded for the head's backward product (2 bytes a logit); with checkpointing no weight
    is kept, so none is copied or given back."""
    _, path = tiny
    config, quant = load(path, tokenizer_only=True).config, plan.quant_info_from_gguf(path)
    fp32 = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0)
    bf16 = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0, bf16=True)
    assert fp32.dequantized > 0 and fp32.bf16_copies == fp32.released == 0
    rounded_logits = 2 * fp32.loss_tokens * config["vocab_size"]
    assert fp32.loss_tokens > 0 and bf16.bf16_copies == fp32.dequantized // 2 + rounded_logits
    assert bf16.released == fp32.dequantized
    assert bf16.mlx == fp32.mlx
    assert bf16.total == fp32.total - fp32.dequantized + bf16.bf16_copies
    names = {line.split()[0]: line.split()[1] for line in bf16.lines()}
    assert "bf16_copies" in names and names["released"].startswith("-")
    assert not {"bf16_copies", "released"} & {line.split()[0] for line in fp32.lines()}
    checkpointed = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0, bf16=True,
                                            grad_checkpoint=True)
    assert checkpointed.bf16_copies == rounded_logits and checkpointed.released == 0


def test_packed_batches_under_the_flash_kernel_plan_no_attention_scores(tiny, monkeypatch):
    """The flash attention holds a tile of scores at a time: a packed CPU batch plans none; the
    composed attention (no compiled module) and a padded batch still plan them."""
    from edgeft import cpu_kernels

    _, path = tiny
    config, quant = load(path, tokenizer_only=True).config, plan.quant_info_from_gguf(path)
    assert cpu_kernels.flash_attention() and quant.device == "cpu"
    packed = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0, lengths=[64, 40, 30, 20])
    padded = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0)
    assert packed.attention == 0 < padded.attention
    monkeypatch.setattr(cpu_kernels, "flash_attention", lambda: False)
    composed = plan.estimate_peak_bytes(config, LoRAConfig(), 4, 64, quant, runtime_bytes=0, lengths=[64, 40, 30, 20])
    assert composed.attention > 0 and composed.mlx == packed.mlx + composed.attention


def test_disk_estimate_counts_checkpoints_adapters_and_export(tiny):
    _, path = tiny
    config = load(path, tokenizer_only=True).config
    cfg = LoRAConfig()
    p = plan.lora_parameters(config, cfg)
    d = plan.estimate_disk_bytes(config, cfg, keep_checkpoints=2, export_quant="q8_0", steps=10)
    assert d.checkpoints >= 3 * 12 * p and d.adapters >= 4 * p
    assert d.export == int(plan.base_parameters(config) * 8.5 / 8)
    k = plan.estimate_disk_bytes(config, cfg, 2, "q4_k_m")
    assert k.export > d.export * 0.9 and k.notes  # the f16 intermediate is counted
    assert plan.estimate_disk_bytes(config, cfg, 2, None).export == 0


# --- through the CLI --------------------------------------------------------------------------
@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # In-process runs: the pytest process holds far more than a fresh `edgeft tune` would, so
    # the runtime part is what such a process measures (see the subprocess test above).
    monkeypatch.setattr(plan, "measure_runtime_bytes", lambda: 145_000_000)
    return tmp_path


def tune_args(tiny, home, *extra):
    d, path = tiny
    data = uniform_chats(home / "chats.jsonl")
    return ["tune", "--data", str(data), "--model", str(path), "--steps", "2", "--batch-size", "8",
            "--eval-every", "0", "--no-export", "--name", "m", "--runs-dir", str(home / "runs"), *extra]


def test_a_run_that_does_not_fit_in_memory_is_refused_with_numbers(tiny, home, monkeypatch):
    monkeypatch.setattr(system, "available_memory", lambda: (130_000_000, "test"))
    monkeypatch.setattr(system, "current_rss", lambda: 0)
    r = CliRunner().invoke(main, tune_args(tiny, home))
    assert r.exit_code == 1
    error = r.output.strip().splitlines()[-1]
    assert error.startswith("Error: this run needs about") and "but 0.13 GB is available" in error, r.output
    assert "--batch-size" in error and "auto_fit" in error
    assert not (home / "runs" / "m" / "config.json").exists()



def test_ranks_on_one_machine_each_plan_against_their_share_of_memory(tiny, home, monkeypatch):
    d, path = tiny
    cfg = RunConfig()
    cfg.model.name = str(path)
    loaded = load(path)
    backend.prepare(loaded.model)
    samples, _ = data_files.load_samples(uniform_chats(home / "chats.jsonl"), loaded.tokenizer, DataConfig(), 512)
    monkeypatch.setattr(system, "current_rss", lambda: 0)
    need = plan.preflight(cfg, loaded, samples, home / "runs", log=print).total
    monkeypatch.setattr(system, "available_memory", lambda: (int(need * 1.5), "test"))
    assert plan.preflight(cfg, loaded, samples, home / "runs", log=print, share=1).total == need
    with pytest.raises(plan.PlanError, match="available"):
        plan.preflight(cfg, loaded, samples, home / "runs", log=print, share=2)

def test_auto_fit_lowers_the_batch_and_records_it(tiny, home, monkeypatch):
    d, path = tiny
    loaded = load(path, tokenizer_only=True)
    samples, _ = data_files.load_samples(uniform_chats(home / "chats.jsonl"), loaded.tokenizer, DataConfig(), 512)
    q = plan.quant_info_from_gguf(path)

    def est(b):
        w, k, lengths = plan.batch_shape(samples, b, 512)
        return plan.estimate_peak_bytes(loaded.config, LoRAConfig(), b, w, q, loss_tokens=k,
                                        lengths=lengths if plan.packs(config=loaded.config)(lengths) else None)

    budget = (est(2).total + est(4).total) // 2  # fits 2 per micro-batch, not 4
    monkeypatch.setattr(system, "available_memory", lambda: (budget, "test"))
    monkeypatch.setattr(system, "current_rss", lambda: 0)
    r = CliRunner().invoke(main, tune_args(tiny, home, "--auto-fit"))
    assert r.exit_code == 0, r.output
    assert "batch size 8 -> 2 with grad_accum 4 (the same samples per optimizer step)" in r.output
    saved = json.loads((home / "runs" / "m" / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"], saved["grad_checkpoint"]) == (2, 4, False)


def test_a_run_that_does_not_fit_on_disk_is_refused_with_numbers(tiny, home, monkeypatch):
    monkeypatch.setattr(system, "free_disk", lambda path: 1000)
    r = CliRunner().invoke(main, tune_args(tiny, home))
    assert r.exit_code == 1
    error = r.output.strip().splitlines()[-1]
    assert error.startswith("Error: this run needs about") and "of disk in" in error
    assert "but only 0.0 MB is free; free some space" in error, error


def test_plan_command_prints_the_breakdown(tiny, home, monkeypatch):
    d, path = tiny
    data = uniform_chats(home / "chats.jsonl")
    r = CliRunner().invoke(main, ["plan", "--data", str(data), "--model", str(path), "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    for word in ("runtime", "weights", "lora", "dequantized", "activations", "attention", "logits", "total",
                 "memory available", "disk: about"):
        assert word in r.output
    monkeypatch.setattr(system, "available_memory", lambda: (1000, "test"))
    r = CliRunner().invoke(main, ["plan", "--data", str(data), "--model", str(path)])
    assert r.exit_code == 1 and "does not fit" in r.output


def test_plan_checks_free_disk_where_the_runs_go(tiny, home, monkeypatch):
    d, path = tiny
    cfg = RunConfig()
    cfg.model.name, cfg.data.train = str(path), str(uniform_chats(home / "chats.jsonl"))
    asked = []
    monkeypatch.setattr(system, "free_disk", lambda where: asked.append(where) or 10**12)
    lines, ok = plan.plan_run(cfg, runs_dir=home / "elsewhere")
    assert ok and asked == [home / "elsewhere"]
    assert f"1000.00 GB free in {home / 'elsewhere'}: fits" in "\n".join(lines)



def test_plan_command_takes_the_runs_dir_and_a_data_folder(tiny, home, monkeypatch):
    d, path = tiny
    folder = home / "data"
    folder.mkdir()
    uniform_chats(folder / "train.jsonl")
    asked = []
    monkeypatch.setattr(system, "free_disk", lambda where: asked.append(where) or 10**12)
    r = CliRunner().invoke(main, ["plan", "--data", str(folder), "--model", str(path),
                                  "--runs-dir", str(home / "elsewhere")])
    assert r.exit_code == 0, r.output
    assert asked == [home / "elsewhere"]
    assert f"the batches this run draws from {folder / 'train.jsonl'}" in r.output

# --- edgeft data check: lengths, duplicates, time ------------------------------------------------
def test_length_histogram_bins_and_flags_overlong_and_context():
    lines = data_stats.length_histogram([10, 40, 70, 70, 130, 300, 500, 900], 384, 512)
    assert lines[0] == "  token lengths (max_seq_len 384, model context 512):"
    counts = {l.split("#")[0].strip(): int(l.split()[-1]) for l in lines if "#" in l}
    assert counts == {"0-31": 1, "32-63": 1, "64-127": 2, "128-255": 1, "256-383": 1, "over 384": 2}
    assert "2 samples over max_seq_len will be truncated or dropped" in "\n".join(lines)
    assert "1 sample over the model's context of 512 tokens" in "\n".join(lines)


def test_duplicates_exact_and_near():
    base = "the green tea ships to canada in five days and the black tea in three days with tracking"
    texts = [(1, base), (2, base.upper() + "!"), (3, base + " always"), (4, "a completely different question about refunds"),
             (5, base.replace("five", "six"))]
    exact, near = data_stats.find_duplicates(texts)
    assert exact == [(2, 1)]  # case and punctuation aside, the same words
    assert [(a, b) for a, b, _ in near] == [(3, 1)] and near[0][2] == pytest.approx(16 / 17)
    # one word changed in 17 moves 3 of the 3-grams: 68% similar, below the 90% bar


def write_run(runs, name, model, speeds):
    (runs / name).mkdir(parents=True)
    (runs / name / "config.json").write_text(json.dumps({"model": {"name": model}}))
    lines = [json.dumps({"kind": "train", "step": i + 1, "tokens_per_s": s}) for i, s in enumerate(speeds)]
    (runs / name / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"tra")  # a cut-short line


def test_training_time_uses_the_median_speed_of_recent_runs_of_the_model(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", "m1", [5.0, 100.0, 120.0])  # the first step (warm-up) is left out
    write_run(runs, "b", "m1", [5.0, 110.0])
    write_run(runs, "c", "other", [9999.0, 9999.0])
    tps, source = timing.measured_speed(runs, "m1")
    assert tps == 110.0 and source == f"median of 2 recent runs in {runs}"
    assert timing.measured_speed(runs, "nope") is None
    tps, source = timing.default_speed(270_000_000, "cpu")
    assert tps == pytest.approx(50.0) and "default" in source


def test_data_check_prints_histogram_duplicates_and_time(tiny, home):
    d, path = tiny
    data = uniform_chats(home / "chats.jsonl", n=6)
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows + [rows[0], rows[1].replace("answer", "Answer")]) + "\n")
    write_run(home / "runs", "past", str(path), [1.0, 250.0, 250.0])
    r = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(path), "--runs-dir", str(home / "runs")])
    assert r.exit_code == 0, r.output
    assert "token lengths (max_seq_len 384, model context 512):" in r.output
    assert "duplicates (same words, ignoring case and punctuation): 2 lines repeat an earlier one (7 = 1, 8 = 2)" in r.output
    assert "at 250 tokens/s (median of 1 recent run in" in r.output and "training time: about" in r.output


def skewed_chats(path, n=24, long_every=6):
    """Mostly short chats and a few long ones: the largest batch the data could form (all the
    long ones together) is far larger than the batches a short run draws."""
    rows = []
    for i in range(n):
        words = 120 if i % long_every == 0 else 6
        q = " ".join(["tea"] * words)
        rows.append({"messages": [{"role": "user", "content": f"question {i}: {q}"},
                                  {"role": "assistant", "content": f"answer {i}: {q}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_plan_weighs_the_batches_the_run_draws_and_refuses_only_on_those(tiny, home, monkeypatch):
    from edgeft import batches

    d, path = tiny
    cfg = RunConfig()
    cfg.model.name = str(path)
    cfg.train.steps, cfg.train.batch_size = 3, 4
    loaded = load(path)
    backend.prepare(loaded.model)
    samples, _ = data_files.load_samples(skewed_chats(home / "chats.jsonl"), loaded.tokenizer, DataConfig(), 512)
    q = plan.quant_info_from_model(loaded.model)
    packed = plan.packs(loaded.model)
    estimate = plan.step_estimator(loaded.config, cfg.lora, samples, 512, q, packed, seed=cfg.train.seed,
                                   samples_drawn=12)
    mem = estimate(4, False)
    worst = plan.step_estimator(loaded.config, cfg.lora, samples, 512, q, packed)(4, False)
    assert mem.worst_case == worst.total > mem.total
    # the planned batch is the largest of the three the run draws, as iterate_batches makes them
    drawn = []
    for _, (inputs, targets, mask) in zip(range(3), batches.iterate_batches(samples, 4, cfg.train.seed)):
        _, _, _, lengths = batches.pack(inputs, targets, mask)
        drawn.append(plan.estimate_peak_bytes(loaded.config, cfg.lora, 4, inputs.shape[1], q,
                                              loss_tokens=int(mask.sum()), lengths=list(lengths),
                                              runtime_bytes=mem.runtime).total)
    assert mem.total == max(drawn)
    assert "this run's seed never draws that batch" in "\n".join(mem.lines())

    monkeypatch.setattr(system, "current_rss", lambda: 0)
    monkeypatch.setattr(system, "available_memory", lambda: ((mem.total + worst.total) // 2, "test"))
    got = plan.preflight(cfg, loaded, samples, home / "runs", log=print)
    assert got.mlx == mem.mlx and got.worst_case > got.total and cfg.train.batch_size == 4
