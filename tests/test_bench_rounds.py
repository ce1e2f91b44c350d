"""scripts/bench.py --rounds: the table takes each contestant's median round, and every round's
ratio is taken against the reference's run of that same round. And every contestant's tokens/s
counts the same tokens: its batches' input tokens."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_table_takes_the_median_round_and_the_ratios_pair_rounds():
    bench = load_bench()
    edgeft = bench.median_round([bench.result("edgeft", steady_tokens_per_s=x) for x in (120.0, 150.0, 110.0)])
    torch = bench.median_round([bench.result("torch-fp32", steady_tokens_per_s=x) for x in (100.0, 75.0, 110.0)])
    assert edgeft["steady_tokens_per_s"] == 120.0 and torch["steady_tokens_per_s"] == 100.0
    assert [r["tokens_per_s"] for r in edgeft["rounds"]] == [120.0, 150.0, 110.0]  # in the order run
    assert bench.round_ratios([torch, edgeft], "torch-fp32") == {"edgeft": [1.2, 2.0, 1.0]}


def test_a_failed_round_is_not_the_median_and_one_round_gives_no_ratios():
    bench = load_bench()
    runs = [bench.result("edgeft", steady_tokens_per_s=x) for x in (90.0, 130.0)]
    runs.append(bench.result("edgeft", status="failed", error="stopped"))
    chosen = bench.median_round(runs)
    assert chosen["status"] == "ok" and chosen["steady_tokens_per_s"] == 90.0  # lower middle of two
    assert len(chosen["rounds"]) == 3
    only = bench.median_round([bench.result("torch-fp32", steady_tokens_per_s=80.0)])
    assert bench.round_ratios([only, chosen], "torch-fp32") == {}


def test_edgeft_is_credited_with_its_batches_input_tokens_not_its_own_count():
    bench = load_bench()
    samples = [{"ids": list(range(n))} for n in (11, 21, 31, 41)]
    schedule = [[0, 1], [2, 3]]
    rows = [{"step": 1, "tokens": 25, "loss": 1.0, "step_time_s": 1.0},
            {"step": 2, "tokens": 60, "loss": 1.0, "step_time_s": 2.0}]
    res = bench.credit_batch_tokens(bench.from_metrics(bench.result("edgeft", warmup=0), rows), rows, samples, schedule)
    assert res["tokens"] == [10 + 20, 30 + 40] and res["computed_tokens"] == [25, 60]
    assert bench.steady(res)["steady_tokens_per_s"] == 100 / 3
