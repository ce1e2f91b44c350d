"""How long training takes: the speed measured by recent runs of a model (or a default when
there is none), the training-time line of `edgeft data check`, and how a duration is written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from edgeft import runs

# When no run of the model has been measured yet: tokens/s of a 135M model (SmolLM2), scaled
# by 135M / parameters. CPU: edgeft measured 99-145 tokens/s on a 2-core Zen 4 (FACTS.md);
# Metal: a guess (not measured here), an M1-class GPU at ~10x a 2-core CPU.
DEFAULT_TOKENS_PER_S = {"cpu": 100.0, "gpu": 1000.0}
REFERENCE_PARAMETERS = 135e6


def duration(seconds: float) -> str:
    """A duration as 5s, 3m07s or 2h05m."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def measured_speed(runs_dir, model_name: str | None = None, recent: int = 5) -> tuple[float, str] | None:
    """Median training tokens/s over the newest `recent` runs of `model_name` under runs_dir
    (their metrics; each run's first step, which warms up, left out), or None."""
    found = []
    for metrics in Path(runs_dir).glob(f"*/{runs.METRICS}"):
        try:
            cfg = json.loads((metrics.parent / runs.CONFIG).read_text(encoding="utf-8"))
            if model_name is not None and cfg.get("model", {}).get("name") != model_name:
                continue
            found.append((metrics.stat().st_mtime, metrics))
        except (OSError, ValueError, AttributeError):
            continue
    speeds, used = [], 0
    for _, metrics in sorted(found, reverse=True)[:recent]:
        run_speeds = []
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                if rec.get("kind") == "train" and rec.get("step", 0) > 1 and rec.get("tokens_per_s", 0) > 0:
                    run_speeds.append(float(rec["tokens_per_s"]))
            except (ValueError, TypeError, AttributeError):
                continue  # a line cut short by a crash
        speeds += run_speeds
        used += bool(run_speeds)
    if not speeds:
        return None
    return statistics.median(speeds), f"median of {used} recent run{'s' if used != 1 else ''} in {runs_dir}"


def default_speed(parameters: int, device: str = "cpu") -> tuple[float, str]:
    tps = DEFAULT_TOKENS_PER_S[device] * REFERENCE_PARAMETERS / max(parameters, 1)
    return tps, f"edgeft's default for {device.upper()}, no run of this model measured yet"


def training_time_line(report, train_cfg, tokens_per_s: float, source: str) -> str:
    """One line: how long `steps` optimizer steps over this data should take."""
    if not report.samples:
        return "training time: no usable samples"
    per_sample = report.total_tokens / report.samples
    samples = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum
    seconds = samples * per_sample / max(tokens_per_s, 1e-9)
    return (f"training time: about {duration(seconds)} for {train_cfg.steps} steps "
            f"({samples / report.samples:.1f} epochs of {report.samples} samples, {per_sample:.0f} tokens "
            f"each) at {tokens_per_s:.0f} tokens/s ({source})")
