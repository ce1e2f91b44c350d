"""`edgeft eval`: the base and the tuned model answer the same held-out prompts, then scores.

The prompts are the validation split's (the very lines tune held out: the split is a pure
function of the seed), or a JSONL of prompts or chats. The answers come from llama.cpp on the
exported GGUF when there is one (what ships: base GGUF vs tuned GGUF, or base GGUF + adapter
GGUF), else from MLX; greedy, with the run's generation settings (config section
``generate``). Everything is written to runs/<name>/eval.json; edgeft.report turns it, the
metrics and the config into report.html and report.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeft import batches, data_files, generate, hub, knowledge, runs, scores
from edgeft import chat_formats as F
from edgeft.config import ConfigError, RunConfig, apply_overrides
from edgeft.errors import UserError
from edgeft.files import atomic_write_text
from edgeft.records import LineProblem, parse, read_lines

KNOWLEDGE_TOKENS = 48  # a short sentence; the knowledge check needs no more


class EvalError(UserError, ValueError):
    """A prompts file or GGUF that cannot be evaluated; the message says which and why."""


@dataclass
class Prompt:
    messages: list[dict]
    reference: str | None
    source: str  # file:line


# --- prompts ---------------------------------------------------------------------------------
def _records(path) -> list[tuple[int, dict]]:
    """(line, object) of a JSONL file, read by the data pipeline's own reader (records)."""
    out = []
    try:
        for n, raw in read_lines(path):
            try:
                obj = parse(raw, n)
            except LineProblem as e:
                raise EvalError(f"{path}:{n}: {e}") from None
            if obj is not None:
                out.append((n, obj))
    except OSError as e:
        raise EvalError(f"{path}: cannot be read ({e.strerror or e})") from None
    return out


def _messages(obj: dict, where: str) -> list[dict] | None:
    """The line's turns, in any chat format edgeft trains on (chat_formats); None for text."""
    try:
        fmt = F.format_of(obj)
        if fmt == F.TEXT:
            return None  # plain documents have no prompt to answer
        return F.turns(obj, fmt, None).messages
    except LineProblem as e:
        raise EvalError(f"{where}: {e}") from None


def _prompt_of(obj: dict, where: str, system: str | None) -> Prompt | None:
    """The conversation up to its last assistant turn, and that turn as the reference."""
    msgs = _messages(obj, where)
    if msgs is None:
        return None
    msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in msgs]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    reference = msgs[last]["content"] if last is not None else None
    msgs = msgs[:last] if last is not None else msgs
    if not any(m["role"] == "user" for m in msgs):
        raise EvalError(f"{where}: no user turn before the last assistant turn: nothing to answer")
    if system and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}, *msgs]
    return Prompt(msgs, reference, where)


def _answers_of(obj: dict, where: str) -> list[str]:
    """The trained answers of a line: assistant turns with content and weight 1."""
    msgs = _messages(obj, where) or []
    return [m["content"] for m in msgs if m["role"] == "assistant" and m.get("content") and m.get("weight", 1)]


def heldout(cfg: RunConfig, tokenizer) -> tuple[list[Prompt], list[str]]:
    """(the validation prompts, the training answers): the lines tune held out and trained on."""
    path, valid_path = data_files.training_files(cfg.data.train, cfg.data.valid)
    if valid_path:
        valid = _records(valid_path)
        train = _records(path)
        vpath = valid_path
    else:
        samples, _ = data_files.load_samples(path, tokenizer, cfg.data, cfg.model.max_seq_len)
        train_set, valid_set = batches.split(samples, cfg.data.valid_fraction, cfg.train.seed)
        by_line = dict(_records(path))
        train = [(s.line, by_line[s.line]) for s in train_set]
        valid = [(s.line, by_line[s.line]) for s in valid_set]
        vpath = path
    name = Path(vpath).name
    prompts = [p for n, obj in valid if (p := _prompt_of(obj, f"{name}:{n}", cfg.data.system_prompt))]
    return prompts, [a for n, obj in train for a in _answers_of(obj, f"{Path(path).name}:{n}")]


def prompts_file(path, system: str | None) -> list[Prompt]:
    prompts = [p for n, obj in _records(path) if (p := _prompt_of(obj, f"{Path(path).name}:{n}", system))]
    if not prompts:
        raise EvalError(f"{path}: no prompts in it")
    return prompts


# --- engines ---------------------------------------------------------------------------------
class MLXEngine:
    def __init__(self, loaded, gen):
        self.loaded, self.gen = loaded, gen

    def answer(self, messages, max_tokens):
        tok = self.loaded.tokenizer
        ids = list(generate.generate_ids(
            self.loaded.model, generate.prompt_ids(tok, messages), max_tokens=max_tokens,
            stop_ids=tok.stop_ids, repeat_penalty=self.gen.repeat_penalty, repeat_last_n=self.gen.repeat_last_n))
        return {"text": tok.decode(ids), "tokens": len(ids), "hit_limit": len(ids) >= max_tokens}

    def close(self):
        pass


class LlamaEngine:
    def __init__(self, path, tokenizer, gen, lora=None, n_ctx=2048, seed=0):
        from edgeft import verify

        llama_cpp = verify.require_llama_cpp("evaluate a GGUF")
        self.tokenizer, self.gen = tokenizer, gen
        try:
            self.llm = verify.open_llama(path, lora_path=str(lora) if lora else None, n_ctx=n_ctx, seed=seed,
                                         last_n_tokens_size=max(gen.repeat_last_n, 1), verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EvalError(f"llama.cpp cannot load {path}{f' with {lora}' if lora else ''} ({e})") from None

    def answer(self, messages, max_tokens):
        ids = generate.prompt_ids(self.tokenizer, messages)
        out = self.llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0,
                                         repeat_penalty=self.gen.repeat_penalty)
        choice = out["choices"][0]
        return {"text": choice["text"].strip(), "tokens": out["usage"]["completion_tokens"],
                "hit_limit": choice["finish_reason"] == "length"}

    def close(self):
        self.llm.close()


def _export_gguf(run_dir: Path) -> Path | None:
    found = [p for p in (run_dir / runs.EXPORT).glob("*.gguf") if "-base-" not in p.name]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def plan_engines(run_dir: Path, cfg: RunConfig, base: Path, tokenizer, gguf=None) -> tuple[str, Callable, Callable]:
    """(description, make base engine, make tuned engine): llama.cpp on the GGUF when there is
    one to compare with a base GGUF, else MLX on the run's base (the file `base`) and adapters."""
    from edgeft import gguf_reader, verify

    tuned = Path(gguf) if gguf else _export_gguf(run_dir)
    if tuned is not None and not tuned.is_file():
        raise EvalError(f"--gguf {tuned}: no such file")
    if base.suffix != ".gguf":
        beside = sorted((run_dir / runs.EXPORT).glob("*-base-*.gguf"))
        base = beside[0] if beside else None
    if tuned is not None and base is not None and verify.llama_cpp_available():
        md = gguf_reader.read_index(tuned, with_metadata=True).metadata
        adapter = gguf_reader.scalar(md.get("general.type")) == "adapter"
        gen = cfg.generate
        n_ctx = 4096
        desc = (f"llama.cpp: base {base.name} vs " + (f"{base.name} + adapter {tuned.name}" if adapter else f"tuned {tuned.name}"))
        return (desc, lambda: LlamaEngine(base, tokenizer, gen, n_ctx=n_ctx, seed=cfg.train.seed),
                lambda: LlamaEngine(base if adapter else tuned, tokenizer, gen, lora=tuned if adapter else None,
                                    n_ctx=n_ctx, seed=cfg.train.seed))
    why = ("no exported GGUF" if tuned is None else "no base GGUF to compare with" if base is None
           else "llama-cpp-python is not installed")
    return (f"MLX ({why}): base {Path(cfg.model.name).name} vs base + adapters",
            lambda: MLXEngine(runs.load_base(cfg, inference=True), cfg.generate),
            lambda: MLXEngine(runs.load_tuned(run_dir, inference=True)[0], cfg.generate))


# --- the evaluation --------------------------------------------------------------------------
def _answer_all(engine, prompts: list[Prompt], questions, max_tokens) -> tuple[list[dict], list[dict]]:
    try:
        held = [engine.answer(p.messages, max_tokens) for p in prompts]
        known = [engine.answer(q, KNOWLEDGE_TOKENS) for q in questions]
    finally:
        engine.close()
    return held, known


def evaluate_run(run_dir, prompts=None, gguf=None, max_tokens: int | None = None,
                 generate_overrides: dict | None = None, *, log: Callable[[str], None]) -> dict:
    """Answer held-out prompts with the run's base and tuned model; write and return eval.json.

    `generate_overrides` ({field: value} of the config's generate section) tries other
    generation settings than the run's."""
    tic = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = runs.read_run_config(run_dir)
    if generate_overrides:
        apply_overrides(cfg, {"generate": generate_overrides}, "command line")
    if not (run_dir / runs.ADAPTERS).is_dir():
        raise ConfigError(f"{run_dir}: no adapters yet (did the run finish? try `edgeft tune --resume`)")
    max_tokens = max_tokens or cfg.generate.max_tokens
    if max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    base = Path(hub.resolve(cfg.model.name))
    tok = runs.load_model(base, chat_template=cfg.data.chat_template, tokenizer_only=True).tokenizer
    desc, make_base, make_tuned = plan_engines(run_dir, cfg, base, tok, gguf)
    held, train_answers = heldout(cfg, tok)
    held = held[: cfg.eval.max_prompts]
    prompts_path = prompts or cfg.eval.prompts
    if prompts_path:
        held = prompts_file(prompts_path, cfg.data.system_prompt)
    questions = knowledge.QUESTIONS if cfg.eval.knowledge else []
    q_msgs = [[{"role": "user", "content": q + knowledge.ASK}] for q, _ in questions]
    if cfg.data.system_prompt:
        q_msgs = [[{"role": "system", "content": cfg.data.system_prompt}, *m] for m in q_msgs]
    log(f"eval: {len(held)} held-out prompts (up to {max_tokens} tokens) and {len(questions)} knowledge "
        f"questions, each answered by base and tuned model; {desc}")
    base_held, base_known = _answer_all(make_base(), held, q_msgs, max_tokens)
    log(f"eval: base answered in {time.perf_counter() - tic:.0f} s")
    tuned_held, tuned_known = _answer_all(make_tuned(), held, q_msgs, max_tokens)
    phrases = scores.mine_phrases(train_answers)
    result = {
        "engine": desc,
        "settings": {"max_tokens": max_tokens, "temperature": 0.0, "seed": cfg.train.seed,
                     "repeat_penalty": cfg.generate.repeat_penalty, "repeat_last_n": cfg.generate.repeat_last_n},
        "prompts_from": str(prompts_path) if prompts_path else "the validation split",
        "training_answers": len(train_answers),
        "phrases": [{"text": p.text, "where": p.where, "share": p.share, "n_words": p.n_words} for p in phrases],
        "prompts": [{"source": p.source, "messages": p.messages, "reference": p.reference, "base": b, "tuned": t}
                    for p, b, t in zip(held, base_held, tuned_held)],
        "knowledge": [{"question": q, "accepted": acc, "base": b["text"], "tuned": t["text"]}
                      for (q, acc), b, t in zip(questions, base_known, tuned_known)],
    }
    result["seconds"] = time.perf_counter() - tic
    atomic_write_text(run_dir / runs.EVAL, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    log(f"eval: done in {result['seconds']:.0f} s")
    return result


# --- scores ----------------------------------------------------------------------------------
def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / runs.METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out


def _phrase(p: dict) -> scores.Phrase:
    return scores.Phrase(p["text"], p["where"], p["share"], p["n_words"])


def score_rows(ev: dict | None, metrics: list[dict]) -> list[tuple[str, object, object, object]]:
    """The scores table: (score, base, tuned, reference); None where a column has no value."""
    rows: list[tuple[str, object, object, object]] = []
    valid = [r for r in metrics if r.get("kind") == "valid"]
    kept = [r for r in metrics if r.get("kind") == "adapters"]  # the adapters the run ended with
    if valid:
        first = valid[0]["val_loss"] if valid[0]["step"] == 0 else None
        last = (kept or valid)[-1]["val_loss"]
        rows.append(("validation loss", first, last, None))
        rows.append(("validation perplexity", math.exp(first) if first is not None else None, math.exp(last), None))
    if not ev:
        return rows
    items = ev["prompts"]
    ref = [p["reference"] for p in items if p["reference"] is not None]
    cols = {k: [p[k]["text"] for p in items] for k in ("base", "tuned")}
    for p in ev["phrases"]:
        ph = _phrase(p)
        rows.append((f"{ph.where} \u201c{ph.text}\u201d (train {ph.share:.0%})",
                     scores.share_using(cols["base"], ph), scores.share_using(cols["tuned"], ph),
                     scores.share_using(ref, ph)))
    if items:
        rows.append(("answers caught in a loop", *(scores.mean(scores.is_loop(a) for a in cols[k]) for k in cols),
                     scores.mean(scores.is_loop(a) for a in ref) if ref else None))
        rows.append((f"answers hitting the {ev['settings']['max_tokens']}-token limit",
                     *(scores.mean(p[k]["hit_limit"] for p in items) for k in cols), None))
        rows.append(("words per answer", scores.mean_words(cols["base"]), scores.mean_words(cols["tuned"]),
                     scores.mean_words(ref)))
        with_ref = [p for p in items if p["reference"] is not None]
        if with_ref:
            rows.append(("ROUGE-L F1 vs reference",
                         *(scores.mean(scores.rouge_l(p[k]["text"], p["reference"]) for p in with_ref) for k in cols),
                         None))
    if ev["knowledge"]:
        k = knowledge_of(ev)
        rows.append((f"knowledge questions answered right (of {len(ev['knowledge'])})",
                     len(k.known), sum(scores.states(q["tuned"], q["accepted"]) for q in ev["knowledge"]), None))
        rows.append(("knowledge kept (of the base's right answers)", None, k.kept_share, None))
    return rows


def knowledge_of(ev: dict) -> scores.Knowledge:
    kn = ev["knowledge"]
    return scores.knowledge_kept([q["question"] for q in kn], [q["accepted"] for q in kn],
                                 [q["base"] for q in kn], [q["tuned"] for q in kn])
