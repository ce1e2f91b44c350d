"""The run report: runs/<name>/report.html (one self-contained file, the loss curves inline as
PNG) and report.md, from the run's config.json, metrics.jsonl and eval.json; and the
comparison of two runs (config differences, scores, curves on one chart)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Callable

from edgeft import evaluate, runs, scores
from edgeft.files import atomic_write_text

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.35em .6em;
vertical-align:top;text-align:left}th{background:#f0f3f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.samples td{white-space:pre-wrap;width:25%;font-size:.92em}.loop{background:#fde8e8}
.tag{font-size:.8em;color:#a33;font-weight:bold}.meta{color:#555}img{max-width:100%}
"""


def _load(run_dir: Path) -> tuple[dict, list[dict], dict | None]:
    cfg = runs.read_run_config(run_dir).to_dict()
    ev_path = run_dir / runs.EVAL
    ev = json.loads(ev_path.read_text(encoding="utf-8")) if ev_path.exists() else None
    return cfg, evaluate.read_metrics(run_dir), ev


def curves_png(series: list[tuple[str, list[dict]]]) -> bytes:
    """Train and validation loss against step for each (label, metrics) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, (label, metrics) in enumerate(series):
        color = f"C{2 * i}", f"C{2 * i + 1}"
        train = [(r["step"], r["loss"]) for r in metrics if r.get("kind") == "train"]
        valid = [(r["step"], r["val_loss"]) for r in metrics if r.get("kind") == "valid"]
        prefix = f"{label}: " if len(series) > 1 else ""
        if train:
            ax.plot(*zip(*train), color=color[0], linewidth=1.5, label=f"{prefix}train")
        if valid:
            ax.plot(*zip(*valid), "o-", color=color[1], linewidth=2, label=f"{prefix}validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _row_fmt(name: str, v) -> str:
    """Shares (rows about answers and habits) as percentages, measures as numbers."""
    if v is None:
        return "\u2013"
    if isinstance(v, (int, bool)) or not isinstance(v, float):
        return str(v)
    if "loss" in name or "ROUGE" in name:
        return f"{v:.3f}"
    if "perplexity" in name or "words" in name:
        return f"{v:.1f}"
    return f"{v:.0%}"


def _table_html(header: list[str], rows: list[list[str]], cls: str = "", ident: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{ident}"' if ident else "")
    return f"<table{attrs}><tr>{head}</tr>{body}</table>"


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _score_cells(rows) -> list[list[str]]:
    return [[name, *(_row_fmt(name, v) for v in vals)] for name, *vals in rows]


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")


def _answer_cell(ans: dict, for_html: bool) -> str:
    reason = scores.loop_reason(ans["text"])
    tags = [f"loop: {reason}" for _ in [0] if reason] + (["hit the token limit"] if ans.get("hit_limit") else [])
    if not for_html:
        return ans["text"] + (f" [{'; '.join(tags)}]" if tags else "")
    tag = f'\n<span class="tag">{html.escape("; ".join(tags))}</span>' if tags else ""
    return f'<td class="{"loop" if reason else ""}">{html.escape(ans["text"])}{tag}</td>'


def _sections(name: str, cfg: dict, metrics: list[dict], ev: dict | None, fmt: str) -> list[str]:
    """The report's parts, as HTML or Markdown."""
    h = (lambda t: f"<h2>{html.escape(t)}</h2>") if fmt == "html" else (lambda t: f"## {t}")
    p = (lambda t: f'<p class="meta">{html.escape(t)}</p>') if fmt == "html" else (lambda t: t)
    table = _table_html if fmt == "html" else _table_md
    train = [r for r in metrics if r.get("kind") == "train"]
    out = [h("Run"), p(f"model {cfg['model']['name']}; data {cfg['data']['train']}; {len(train)} steps "
                        f"of {cfg['train']['steps']}; LoRA rank {cfg['lora']['rank']}; "
                        f"learning rate {cfg['train']['learning_rate']:g}")]
    out.append(h("Scores"))
    if ev:
        s = ev["settings"]
        out.append(p(f"{len(ev['prompts'])} prompts from {ev['prompts_from']}; answers by {ev['engine']}; "
                     f"greedy, seed {s['seed']}, up to {s['max_tokens']} tokens, repeat penalty "
                     f"{s['repeat_penalty']:g} over the last {s['repeat_last_n']} tokens. Openings and sign-offs "
                     f"mined from {ev['training_answers']} training answers; a share is of the answers that say it."))
    else:
        out.append(p("no eval.json: run `edgeft eval RUN` for the answers and their scores"))
    rows = _score_cells(evaluate.score_rows(ev, metrics))
    out.append(table(["score", "base", "tuned", "reference"], rows, **({"ident": "scores"} if fmt == "html" else {})))
    out.append(h("Loss curves"))
    if fmt == "html":
        png = base64.b64encode(curves_png([(name, metrics)])).decode()
        out.append(f'<img id="curves" alt="training and validation loss by step" src="data:image/png;base64,{png}">')
    else:
        out.append(p("(the chart is in report.html)"))
    if not ev:
        return out
    if ev["knowledge"]:
        k = evaluate.knowledge_of(ev)
        out.append(h("Knowledge kept"))
        lost = "; ".join(k.lost) or "none"
        out.append(p(f"the base answers {len(k.known)} of {len(ev['knowledge'])} built-in questions right; "
                     f"the tuned model still answers {len(k.kept)} of those. Lost: {lost}"))
        by_q = {q["question"]: q for q in ev["knowledge"]}
        if k.lost:
            out.append(table(["question lost", "base", "tuned"],
                             [[q, by_q[q]["base"], by_q[q]["tuned"]] for q in k.lost]))
    out.append(h("Answers side by side"))
    rows = []
    for item in ev["prompts"]:
        ref = item["reference"] if item["reference"] is not None else "\u2013"
        rows.append([f"{item['source']}\n{_prompt_text(item['messages'])}", ref,
                     _answer_cell(item["base"], fmt == "html"), _answer_cell(item["tuned"], fmt == "html")])
    out.append(table(["prompt", "reference", "base", "tuned"], rows, **({"cls": "samples"} if fmt == "html" else {})))
    return out


def _page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")


def build(run_dir, *, log: Callable[[str], None]) -> Path:
    """Write report.html and report.md into the run folder; returns the HTML's path."""
    run_dir = Path(run_dir)
    cfg, metrics, ev = _load(run_dir)
    name = run_dir.resolve().name
    title = f"edgeft run {name}"
    atomic_write_text(run_dir / runs.REPORT_HTML, _page(title, _sections(name, cfg, metrics, ev, "html")))
    atomic_write_text(run_dir / runs.REPORT_MD, f"# {title}\n\n" + "\n\n".join(_sections(name, cfg, metrics, ev, "md")) + "\n")
    log(f"report: {run_dir / runs.REPORT_HTML}")
    return run_dir / runs.REPORT_HTML


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(run_a, run_b, out=None, *, log: Callable[[str], None]) -> Path:
    """Two runs side by side: the config keys that differ, both score tables, both curves;
    written to `out` (default runs/<a>/compare-<b>.html, and .md beside it)."""
    run_a, run_b = Path(run_a), Path(run_b)
    (ca, ma, ea), (cb, mb, eb) = _load(run_a), _load(run_b)
    na, nb = run_a.resolve().name, run_b.resolve().name
    if na == nb:
        na, nb = str(run_a), str(run_b)
    fa, fb = _flat(ca), _flat(cb)
    diff = [[k, json.dumps(fa.get(k)), json.dumps(fb.get(k))] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    ra, rb = evaluate.score_rows(ea, ma), evaluate.score_rows(eb, mb)
    names = list(dict.fromkeys([r[0] for r in ra] + [r[0] for r in rb]))
    da, db = {r[0]: r for r in ra}, {r[0]: r for r in rb}

    def cells(d, n):
        r = d.get(n)
        return [_row_fmt(n, r[1]), _row_fmt(n, r[2])] if r else ["\u2013", "\u2013"]

    score_rows = [[n, *cells(da, n), *cells(db, n)] for n in names]
    header = ["score", f"{na} base", f"{na} tuned", f"{nb} base", f"{nb} tuned"]
    out = Path(out) if out else run_a / f"compare-{run_b.resolve().name}.html"
    title = f"edgeft runs {na} and {nb}"
    png = base64.b64encode(curves_png([(na, ma), (nb, mb)])).decode()
    diff_rows = diff or [["(none)", "", ""]]
    parts = ["<h2>Config differences</h2>", _table_html(["key", na, nb], diff_rows),
             "<h2>Scores</h2>", _table_html(header, score_rows, ident="scores"),
             "<h2>Loss curves</h2>", f'<img id="curves" alt="loss by step, both runs" src="data:image/png;base64,{png}">']
    atomic_write_text(out, _page(title, parts))
    md = [f"# {title}", "## Config differences", _table_md(["key", na, nb], diff_rows),
          "## Scores", _table_md(header, score_rows), "## Loss curves", "(the chart is in the HTML file)"]
    atomic_write_text(out.with_suffix(".md"), "\n\n".join(md) + "\n")
    log(f"comparison: {out}")
    return out
