"""LoRA training speed on the CPU: edgeft against mlx-lm and PyTorch + PEFT, side by side.

    python scripts/bench.py                                # all five, ~10 min on 2 cores
    python scripts/bench.py --only torch-bf16 --steps 4    # a quick look at one contestant
    python scripts/bench.py --only edgeft                  # add edgeft to an earlier full run
    python scripts/bench.py --rounds 3                     # the contestants take turns, 3 times
    python scripts/bench.py --scaling                      # more models and lengths (scaling_results.md)

Every contestant trains SmolLM2-135M-Instruct (from its Q4_1 GGUF) on the same chats (the
seed tasks in ../shared/data, one task per conversation, or generated ones), LoRA rank 8,
alpha 16 on all 7 projections of all layers, batch 4, sequences truncated to 256 tokens, loss
on the assistant turn only, AdamW lr 2e-4 constant, no weight decay, no clipping:

- edgeft      `edgeft tune` in a subprocess; its metrics.jsonl gives loss, tokens, step time.
              Its products in bf16 where the CPU runs them faster (train.matmul auto), which
              its log says.
- edgeft-fp32 the same with --matmul fp32: every product in fp32.
- mlx-lm      `python -m mlx_lm lora` as installed (the stock reference BLAS: edgeft's fix is
              not loaded), on an mlx-lm folder made once from the GGUF's own tensors. It is
              slow (~3 tokens/s), so it runs only --mlx-lm-steps steps; step times come from
              the time its per-step report lines arrive.
- torch-fp32  transformers + PEFT on the CPU (2 threads) in their own venv, fp32 weights
- torch-bf16  same, bf16 weights (PEFT keeps the adapters in fp32); skipped where torch's bf16
              matmul is 10x slower than its fp32 (a CPU without AVX512-BF16 or AMX)

All train the same batches in the same order: edgeft's own (asked of edgeft.batches),
given to the torch peers as token ids and to mlx-lm as the chat file reordered so that it
draws them; both are checked against the loss-token counts each reports. Tokens/s counts
non-padding input tokens after --warmup steps; peak RSS is the child's ru_maxrss (os.wait4).
Outputs go to --out: bench_results.md, bench_results.json, a log per contestant, and the
cached torch venv and MLX model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED_TASKS = ROOT.parent / "shared" / "data" / "seed_tasks.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLX_KEYS = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
# torch from the CPU wheel on this disk; the others pinned to what FACTS.md measured.
TORCH_REQUIREMENTS = ["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "gguf==0.19.0"]
CONTESTANTS = ["torch-fp32", "torch-bf16", "edgeft-fp32", "edgeft", "mlx-lm"]
TORCH_NAMES = ["torch-fp32", "torch-bf16"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Setup:
    """What every contestant is asked to do; the results file records it."""

    batch_size: int = 4
    max_seq_len: int = 256
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 2e-4
    seed: int = 0


@dataclass
class Ctx:
    args: argparse.Namespace
    setup: Setup
    out: Path
    gguf: Path  # the GGUF whose tokenizer (and chat template) every contestant uses
    model: Path = None  # what the contestants train: the GGUF itself, or a Hugging Face folder
    quantize_bits: int | None = None  # edgeft quantizes a full-precision folder on load
    venv: Path = None  # the torch venv (shared by the points of --scaling)
    join_tokens: int = 0  # >0: chats join consecutive tasks as turns until about this many tokens
    chat: Path = None  # chat JSONL every contestant reads
    tokens: Path = None  # token ids + loss masks of those chats (transformers' tokenizer)
    batches: Path = None  # the batch order mlx-lm draws; the torch peers follow it
    samples: list = field(default_factory=list)
    schedule: list = field(default_factory=list)  # sample indices of each step's batch, for everyone
    order_source: str = ""
    torch_gflops: dict = None  # torch's matmul GFLOP/s per dtype on this CPU (torch_matmul_gflops)
    tok_check: dict = None  # edgeft's tokenizer against transformers' (check_edgeft_tokens)


# ---------------------------------------------------------------------------------------------
# Subprocesses


@dataclass
class ChildRun:
    rc: int
    wall_s: float
    maxrss_gb: float
    lines: list  # [(seconds since start, child's CPU seconds so far, line)]
    timed_out: bool = False
    cpu_s: float = 0.0  # user + system CPU time of the child

    def tail(self, n: int = 1) -> str:
        text = [ln for _, _, ln in self.lines if ln.strip()]
        return " | ".join(text[-n:]) if text else f"exit code {self.rc}"


def run_child(cmd: list, log: Path, env: dict | None = None, timeout: float = 3600) -> ChildRun:
    """Run cmd, tee its output to log with a timestamp per line, and measure its peak RSS
    from outside: os.wait4 gives this child's own rusage, unmixed with earlier children."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    lines = []
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        p = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        for raw in p.stdout:
            t = time.perf_counter() - tic
            # tqdm-style progress bars redraw with \r: keep the last state of the line
            line = ANSI.sub("", raw.rstrip("\n")).split("\r")[-1]
            lines.append((t, proc_cpu_s(p.pid), line))
            f.write(f"[{t:8.2f}] {line}\n")
            f.flush()
        _, status, usage = os.wait4(p.pid, 0)
        killer.cancel()
        timed_out = time.perf_counter() - tic >= timeout
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - tic
    return ChildRun(p.returncode, wall, usage.ru_maxrss * 1024 / 1e9, lines, timed_out,
                    usage.ru_utime + usage.ru_stime)


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a running process has used so far, all threads (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def step_cpu_s(child: ChildRun, step_line: re.Pattern, steps: int) -> list:
    """CPU seconds of each step: the child's CPU time between the line that reports a step
    (group 1: its number) and the line before it. None where a step's line was not seen."""
    out, prev = [None] * steps, None
    for _, cpu, line in child.lines:
        m = step_line.search(line)
        if m and prev is not None and cpu is not None and 0 < int(m[1]) <= steps:
            out[int(m[1]) - 1] = cpu - prev
        prev = cpu
    return out


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "EDGEFT_BLAS", "PYTHONPATH")}
    env.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# Data: the chats, their tokens, the batch order


def seed_task_chats(path: Path) -> list[dict]:
    chats = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            task = json.loads(line)
            inst = task["instances"][0]
            user = task["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
            chats.append({"messages": [{"role": "user", "content": user},
                                       {"role": "assistant", "content": inst["output"]}]})
    return chats


def joined_chats(chats: list[dict], tokens: int, chars_per_token: float = 4.0) -> list[dict]:
    """Multi-turn chats of about `tokens` tokens each (at ~4 characters a token): consecutive
    one-turn chats joined as the turns of one conversation, for the longer sequence lengths.
    Every contestant takes the loss on every assistant turn."""
    out, turns, size = [], [], 0
    for c in chats:
        turns += c["messages"]
        size += sum(len(m["content"]) for m in c["messages"])
        if size >= tokens * chars_per_token:
            out.append({"messages": turns})
            turns, size = [], 0
    return out


def generated_chats(n: int = 170, seed: int = 0) -> list[dict]:
    """Support-desk chats of varied length, for machines without the seed tasks."""
    rng = random.Random(seed)
    items = ["order", "parcel", "refund", "invoice", "subscription", "password", "warranty", "voucher"]
    asks = ["Where is my {i}?", "How do I change my {i}?", "Can you explain the {i} policy?",
            "My {i} number {n} does not work. What now?", "Is there a fee for a late {i}?"]
    sents = ["Thanks for reaching out about your {i}.", "I checked {i} {n} in our system just now.",
             "It left our warehouse on day {d} and usually arrives within {k} working days.",
             "You can change this under Account, then Settings, then {I}.",
             "If anything still looks wrong, reply to this message and we will sort it out.",
             "Our policy gives you {k} days from delivery to ask for a {i} review.",
             "There is no fee for the first change; later ones cost {k} euros.",
             "Best regards, the support team."]
    chats = []
    for _ in range(n):
        i = rng.choice(items)
        fill = dict(i=i, I=i.capitalize(), n=rng.randint(10000, 99999), d=rng.randint(1, 28), k=rng.randint(2, 30))
        user = rng.choice(asks).format(**fill)
        answer = " ".join(rng.choice(sents).format(**fill) for _ in range(rng.randint(1, 14)))
        chats.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return chats


def prepare_data(ctx: Ctx, tokenizer_dir: Path | None) -> None:
    """Write the chats, tokenize them once with transformers (in the torch venv), drop the
    chats whose answer starts past max_seq_len (no loss token left: every contestant must
    see the same usable set), and fix the batch order."""
    data = ctx.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if ctx.args.seed_tasks.exists():
        chats, source = seed_task_chats(ctx.args.seed_tasks), str(ctx.args.seed_tasks)
    else:
        chats, source = generated_chats(seed=ctx.setup.seed), "generated in bench.py"
    if ctx.join_tokens:
        chats = joined_chats(chats, ctx.join_tokens)
        source += f", consecutive tasks joined as turns to about {ctx.join_tokens} tokens"
    # A chat whose text holds one of the model's control tokens (Gemma's '<mask>' is in two seed
    # tasks) is refused by edgeft as markup; the peers would train on it: no contestant gets it.
    from edgeft.chat_encode import specials_pattern

    markup = specials_pattern(edgeft_tokenizer(ctx.gguf))
    if markup is not None:
        chats = [c for c in chats if not any(markup.search(m["content"]) for m in c["messages"])]
    cand = data / "candidates.jsonl"
    cand.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    tok_all = data / "tokens_all.json"
    cmd = [venv_python(ctx), HERE / "bench_torch_peft.py", "prepare", "--gguf", ctx.gguf, "--chat", cand,
           "--max-seq-len", ctx.setup.max_seq_len, "--tokens-out", tok_all]
    builtin = edgeft_builtin_template(ctx.gguf)
    if builtin is not None:  # a base without a template: every contestant gets the one edgeft trains with
        (data / "chat_template.jinja").write_text(builtin.text, encoding="utf-8")
        cmd += ["--chat-template", data / "chat_template.jinja", "--end-of-turn", builtin.end_of_turn]
        print(f"data: the model has no chat template; all contestants use edgeft's built-in {builtin.name}", flush=True)
    if tokenizer_dir:
        cmd += ["--tokenizer-dir", tokenizer_dir]
    child = run_child(cmd, ctx.out / "logs" / "prepare.log", env=clean_env())
    if child.rc != 0:
        sys.exit(f"bench: tokenizing the data failed ({child.tail()}); see {ctx.out / 'logs/prepare.log'}")
    tokens = json.loads(tok_all.read_text(encoding="utf-8"))
    keep = [i for i, s in enumerate(tokens["samples"]) if any(s["mask"])]
    ctx.samples = [tokens["samples"][i] for i in keep]
    ctx.chat = data / "chat.jsonl"
    ctx.chat.write_text("".join(json.dumps(chats[i]) + "\n" for i in keep), encoding="utf-8")
    ctx.tokens = data / "tokens.json"
    tokens.update(samples=ctx.samples, source=source, dropped_no_loss=len(chats) - len(keep))
    ctx.tokens.write_text(json.dumps(tokens) + "\n", encoding="utf-8")
    n = max(ctx.args.steps, ctx.args.mlx_lm_steps, len(ctx.samples) // ctx.setup.batch_size)
    ctx.schedule, ctx.order_source = batch_order(len(ctx.samples), ctx.setup.batch_size, ctx.setup.seed, n)
    ctx.batches = data / "batches.json"
    ctx.batches.write_text(json.dumps({"order": ctx.order_source, "batches": ctx.schedule}) + "\n", encoding="utf-8")
    print(f"data: {len(keep)} chats from {source} ({len(chats) - len(keep)} dropped: answer past "
          f"{ctx.setup.max_seq_len} tokens), {sum(len(s['ids']) for s in ctx.samples)} tokens", flush=True)


def batch_order(n_samples: int, batch_size: int, seed: int, steps: int) -> tuple[list[list[int]], str]:
    """The batches (sample indices) `edgeft tune` draws from the chat file, asked of
    edgeft.batches.iterate_batches itself: it gets stand-in samples whose tokens are their
    own index. Without edgeft: the same kind of order (a seeded shuffle per epoch)."""
    try:
        import edgeft  # noqa: F401  (loads the BLAS before mlx, as everywhere)
        from edgeft.batches import iterate_batches
        from edgeft.records import Sample

        tagged = [Sample(tokens=[i, i], mask=[False, True], line=i + 1) for i in range(n_samples)]
        it = iterate_batches(tagged, batch_size, seed)
        return [np.asarray(next(it)[0])[:, 0].tolist() for _ in range(steps)], "edgeft.batches.iterate_batches"
    except Exception as e:  # noqa: BLE001 - fall back, and say so in the results
        rng, stream = np.random.RandomState(seed), []
        while len(stream) < steps * batch_size:
            stream += rng.permutation(n_samples).tolist()
        return ([stream[k * batch_size:(k + 1) * batch_size] for k in range(steps)],
                f"seeded shuffle per epoch (edgeft's order unavailable: {type(e).__name__}: {e})")


def mlx_lm_file_order(schedule: list[list[int]], n_samples: int, batch_size: int, seed: int) -> list[int]:
    """A line order for mlx-lm's train.jsonl under which `mlx_lm lora` draws `schedule`.

    mlx-lm 0.32 (tuner/trainer.py iterate_batches) sorts by CacheDataset.itemlen, which for
    chat data is len() of the JSON object (1 for every line), so the sort keeps file order;
    it then takes consecutive groups of batch_size and visits them in the order of
    np.random.permutation from the global RNG that mlx_lm.lora seeds with the config's seed.
    Putting schedule[k] into group perm[k] makes its k-th batch ours for the first epoch. The
    mlx-lm runner checks this against the loss-token counts mlx-lm prints.
    """
    groups = n_samples // batch_size
    perm = np.random.RandomState(seed).permutation(groups)
    slots = [None] * groups
    for k in range(groups):
        slots[perm[k]] = schedule[k]
    used = {i for g in slots for i in g}
    return [i for g in slots for i in g] + [i for i in range(n_samples) if i not in used]


def batch_tokens(samples: list, idx: list[int]) -> int:
    """Non-padding input tokens of a batch: each sequence's ids[:-1]."""
    return sum(len(samples[i]["ids"]) - 1 for i in idx)


def edgeft_tokenizer(gguf: Path):
    """edgeft's tokenizer of the GGUF, with the chat template an `edgeft tune` of it uses."""
    import edgeft  # noqa: F401  (loads the BLAS before mlx, as everywhere)
    from edgeft import runs
    from edgeft.loader import load

    loaded = load(gguf, tokenizer_only=True)
    runs.choose_chat_template(loaded, None)
    return loaded.tokenizer


def edgeft_builtin_template(gguf: Path):
    """The built-in chat template edgeft gives a GGUF without one (None: it has its own)."""
    from edgeft.chat_template import BUILTINS

    return BUILTINS.get(edgeft_tokenizer(gguf).chat_template_name or "")


def check_edgeft_tokens(ctx: Ctx) -> dict:
    """Does edgeft's own tokenizer render the same ids as transformers'? (best effort: the
    tokenizer API may change while edgeft is young)."""
    try:
        tok = edgeft_tokenizer(ctx.gguf)
        same, differ = 0, []
        chats = [json.loads(line) for line in ctx.chat.read_text(encoding="utf-8").splitlines()]
        for i, (chat, s) in enumerate(zip(chats, ctx.samples)):
            ids = tok.encode(tok.render(chat["messages"]))[: ctx.setup.max_seq_len]
            if ids == s["ids"]:
                same += 1
            else:
                differ.append({"sample": i, "edgeft_len": len(ids), "transformers_len": len(s["ids"])})
        return {"same": same, "total": len(chats), "differ": differ}
    except Exception as e:  # noqa: BLE001 - a report line, not a failure of the benchmark
        return {"skipped": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# Environments


def venv_python(ctx: Ctx) -> Path:
    return ctx.venv / "bin" / "python"


def ensure_torch_venv(ctx: Ctx) -> None:
    """Make (once) the venv with CPU torch + transformers + PEFT; refuse a CUDA build."""
    venv = ctx.venv
    marker = venv / "bench-requirements.txt"
    want = "\n".join(TORCH_REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == want and venv_python(ctx).exists():
        return
    print(f"torch venv: creating {venv} ({' '.join(TORCH_REQUIREMENTS)}), about a minute", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log = ctx.out / "logs" / "torch-venv.log"
    child = run_child([venv_python(ctx), "-m", "pip", "install", "--progress-bar", "off", *TORCH_REQUIREMENTS], log)
    if child.rc != 0:
        sys.exit(f"bench: pip install into {venv} failed; see {log}")
    probe = subprocess.run(
        [str(venv_python(ctx)), "-c",
         "import torch, importlib.metadata as m; print(torch.__version__, torch.version.cuda, "
         "sum(d.metadata['Name'].startswith('nvidia') for d in m.distributions()))"],
        capture_output=True, text=True,
    )
    version, cuda, nvidia = (probe.stdout.split() + ["?", "?", "?"])[:3]
    if probe.returncode != 0 or cuda != "None" or nvidia != "0":
        sys.exit(f"bench: {venv} holds torch {version} (CUDA {cuda}, {nvidia} nvidia packages): "
                 "expected the CPU build; remove the venv and check `pip install torch==2.13.0`")
    marker.write_text(want)


# torch's own matmul speed per dtype, in its venv: bf16 is the faster PyTorch configuration only
# on CPUs whose BLAS multiplies bf16 natively (AVX512-BF16, AMX); elsewhere it can be >100x slower.
TORCH_MATMUL_PROBE = """
import json, time, torch
torch.set_num_threads(2)
out = {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    n, tic = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - tic < 0.5:
        a @ b
        n += 1
    out[name] = 2 * 512**3 * n / (time.perf_counter() - tic) / 1e9
print(json.dumps(out))
"""
SLOW_DTYPE = 10  # a torch dtype this many times slower than fp32 at a matmul is not a contestant


def torch_matmul_gflops(ctx: Ctx) -> dict:
    """GFLOP/s of a 512^3 matmul in torch, fp32 and bf16, 2 threads (in the torch venv)."""
    probe = subprocess.run([str(venv_python(ctx)), "-c", TORCH_MATMUL_PROBE], capture_output=True, text=True,
                           env=clean_env())
    if probe.returncode != 0:
        sys.exit(f"bench: torch's matmul probe failed: {probe.stderr.strip().splitlines()[-1:]}")
    return json.loads(probe.stdout)


def edgeft_matmul_gflops(runs: int = 3) -> float | None:
    """The fp32 matmul speed `edgeft doctor` measures (MLX, 1024^3), the best of a few runs:
    the ceiling's numerator."""
    exe = Path(sys.executable).parent / "edgeft"
    best = None
    for _ in range(runs):
        r = subprocess.run([str(exe) if exe.exists() else "edgeft", "doctor"], capture_output=True, text=True,
                           env=clean_env())
        m = re.search(r"fp32 1024\^3: ([0-9.]+) GFLOP/s", r.stdout)
        if m:
            best = max(best or 0.0, float(m[1]))
    return best


DOCTOR_KEY = "edgeft fp32 (edgeft doctor, 1024^3)"  # the ceiling's numerator in a results file


def matmul_gflops(torch_gflops: dict) -> dict:
    """The matmul speeds a results file records: edgeft doctor's fp32 and torch's per dtype."""
    return {DOCTOR_KEY: edgeft_matmul_gflops(), **{f"torch {k} (512^3)": v for k, v in torch_gflops.items()}}


def model_shapes(gguf: Path) -> dict:
    """The shapes a step's arithmetic depends on, from the GGUF's metadata (or a Hugging Face
    folder's config.json)."""
    from gguf import GGUFReader

    if gguf.is_dir():
        c = json.loads((gguf / "config.json").read_text(encoding="utf-8"))
        heads = c["num_attention_heads"]
        return {"layers": c["num_hidden_layers"], "width": c["hidden_size"], "ffn": c["intermediate_size"],
                "heads": heads, "kv_heads": c.get("num_key_value_heads", heads),
                "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "vocab": c["vocab_size"]}

    r = GGUFReader(str(gguf))

    def val(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = val("general.architecture")
    heads = val(f"{arch}.attention.head_count")
    width = val(f"{arch}.embedding_length")
    return {"layers": val(f"{arch}.block_count"), "width": width, "ffn": val(f"{arch}.feed_forward_length"),
            "heads": heads, "kv_heads": val(f"{arch}.attention.head_count_kv", heads),
            "head_dim": val(f"{arch}.attention.key_length", width // heads),
            "vocab": len(r.fields["tokenizer.ggml.tokens"].data)}


def lora_gflop_per_token(shapes: dict, samples: list, schedule: list) -> float:
    """Matrix work per input token of a LoRA step on a frozen base, over the given batches: the
    projections forward and backward to their inputs (4 FLOP per weight; no weight gradient),
    causal attention (scores and values, forward and twice that backward), and the vocabulary
    head forward and back only where the loss is. The rank-8 adapters add under 1%."""
    s = shapes
    attn_w = s["width"] * s["head_dim"] * (2 * s["heads"] + 2 * s["kv_heads"])
    per_layer = attn_w + 3 * s["width"] * s["ffn"]
    tokens = ctx_sum = loss = 0
    for idx in schedule:
        for i in idx:
            n = len(samples[i]["ids"]) - 1
            tokens += n
            ctx_sum += n * (n + 1) / 2
            loss += sum(samples[i]["mask"][1:])
    flop = (4 * per_layer * s["layers"] * tokens + 12 * s["layers"] * s["heads"] * s["head_dim"] * ctx_sum
            + 4 * s["vocab"] * s["width"] * loss)
    return flop / tokens / 1e9


def mlx_model_dir(ctx: Ctx) -> Path:
    return ctx.out / "models" / f"{ctx.gguf.stem}-mlx"


def gguf_stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": str(gguf), "size": st.st_size, "mtime": int(st.st_mtime), "layout": 2}


def mlx_model_ready(ctx: Ctx) -> bool:
    marker = mlx_model_dir(ctx) / "bench-source.json"
    return marker.exists() and json.loads(marker.read_text()) == gguf_stamp(ctx.gguf)


GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_to_mlx_folder(gguf: str, tokenizer_dir: str, dst: str) -> None:
    """An mlx-lm model folder holding the GGUF's own tensors, so mlx-lm trains the very
    weights edgeft trains. `mx.load` returns Q4_1/Q8_0 tensors as MLX affine triplets
    (weight, scales, biases; group 32), which mlx-lm's QuantizedLinear takes unchanged;
    llama.cpp's Q/K row order is kept and undone by RoPE with rope_traditional=True.
    (Re-quantizing a dequantized copy with `mlx_lm.convert` instead raised the base loss by
    ~0.4 nats: 4-bit groups do not land on the Q4_1 grid, and the 8-bit tied embedding
    becomes 4-bit.) Llama-family GGUFs only. Runs in a child process (it imports mlx)."""
    import mlx.core as mx

    weights, md = mx.load(gguf, return_metadata=True)
    arch = str(md["general.architecture"])
    if arch != "llama":
        raise SystemExit(f"bench: {gguf}: architecture {arch}; the mlx-lm folder is made for llama only")

    def meta(key):
        return md[f"llama.{key}"].item()

    hidden, inter = meta("embedding_length"), meta("feed_forward_length")
    out, quant = {}, {"group_size": 32, "bits": 4, "mode": "affine"}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[0] == "blk":
            module = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
        else:
            module = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
        out[f"{module}.{parts[-1]}"] = value
        if parts[-1] == "scales":  # bits and group size of this module, from the packed shapes
            in_features = inter if module.endswith("down_proj") else hidden
            bits = weights[key.replace("scales", "weight")].shape[1] * 32 // in_features
            quant[module] = {"group_size": in_features // value.shape[1], "bits": bits, "mode": "affine"}
    heads = meta("attention.head_count")
    config = {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv"), "head_dim": hidden // heads,
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"), "vocab_size": out["model.embed_tokens.weight"].shape[0],
        "rope_theta": meta("rope.freq_base"), "rope_traditional": True,
        "max_position_embeddings": meta("context_length"), "tie_word_embeddings": "lm_head.weight" not in out,
        "quantization": quant,
    }
    dst_path = Path(dst)
    dst_path.mkdir(parents=True, exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copyfile(f, dst_path / f.name)
    mx.save_safetensors(str(dst_path / "model.safetensors"), out, metadata={"format": "mlx"})
    (dst_path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def make_mlx_model(ctx: Ctx, tokenizer_dir: Path) -> None:
    dst = mlx_model_dir(ctx)
    shutil.rmtree(dst, ignore_errors=True)
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench; "
            f"bench.gguf_to_mlx_folder({str(ctx.gguf)!r}, {str(tokenizer_dir)!r}, {str(dst)!r})")
    child = run_child([sys.executable, "-c", code], ctx.out / "logs" / "mlx-model.log", env=clean_env())
    if child.rc != 0:
        sys.exit(f"bench: making the MLX folder failed ({child.tail()}); see {ctx.out / 'logs/mlx-model.log'}")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    (dst / "bench-source.json").write_text(json.dumps(gguf_stamp(ctx.gguf)))


# ---------------------------------------------------------------------------------------------
# Contestants: each returns a result dict (see `result`)


def result(name: str, **kw) -> dict:
    base = dict(name=name, status="ok", error=None, steps=0, warmup=0, losses=[], tokens=[], step_times=[],
                steady_tokens_per_s=None, peak_rss_gb=None, wall_s=None, notes=[],
                measured_at=dt.datetime.now().isoformat(timespec="seconds"))
    base.update(kw)
    return base


def steady(res: dict) -> dict:
    """Steady state, over the steps after the warm-up: tokens per second of step time; tokens
    per CPU-second (less sensitive to other work on the machine, though spinning BLAS threads
    still inflate it); and the cores the contestant got while stepping (CPU s / wall s)."""
    w, toks, times, cpus = res["warmup"], res["tokens"], res["step_times"], res.get("step_cpu_s", [])
    if len(times) > w and sum(times[w:]) > 0:
        res["steady_tokens_per_s"] = sum(toks[w:]) / sum(times[w:])
        res["steady_steps"] = len(times) - w
        if len(cpus) == len(times) and None not in cpus[w:] and sum(cpus[w:]) > 0:
            res["steady_tokens_per_cpu_s"] = sum(toks[w:]) / sum(cpus[w:])
            res["steady_cores_used"] = sum(cpus[w:]) / sum(times[w:])
    return res


def finish(res: dict, child: ChildRun, before: float, step_line: re.Pattern) -> dict:
    """Add what is measured from outside: peak RSS, wall time, CPU time per step (from the
    child's CPU clock at each of its step report lines), load on the machine."""
    if child.timed_out:
        res.update(status="failed", error=f"stopped after {child.wall_s:.0f} s (--timeout)")
    res.update(peak_rss_gb=child.maxrss_gb, wall_s=child.wall_s, cpu_s=child.cpu_s,
               step_cpu_s=step_cpu_s(child, step_line, res["steps"]), loadavg_before=before, loadavg_after=loadavg())
    return steady(res)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def from_metrics(res: dict, rows: list[dict]) -> dict:
    res.update(steps=len(rows), losses=[r["loss"] for r in rows], tokens=[r["tokens"] for r in rows],
               step_times=[r["step_time_s"] for r in rows])
    return res


TORCH_STEP_LINE = re.compile(r"^step (\d+): loss")  # bench_torch_peft.py, one line per step
EDGEFT_STEP_LINE = re.compile(r"\bstep (\d+)/\d+\b")  # edgeft's progress line, one per step


def run_torch(ctx: Ctx, name: str) -> dict:
    dtype = name.split("-")[1]
    s = ctx.setup
    rates = ctx.torch_gflops
    if rates and rates[dtype] * SLOW_DTYPE < rates["fp32"] and not ctx.args.run_slow_dtypes:
        return result(name, status="skipped", error=(
            f"torch's {dtype} matmul runs at {rates[dtype]:.1f} GFLOP/s on this CPU against fp32's "
            f"{rates['fp32']:.0f} (no native {dtype} instructions), so fp32 is the faster PyTorch; "
            "--run-slow-dtypes runs it anyway"))
    metrics = ctx.out / name / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    cmd = [venv_python(ctx), HERE / "bench_torch_peft.py", "train", "--model", ctx.model, "--tokens", ctx.tokens,
           "--batches", ctx.batches, "--dtype", dtype, "--steps", ctx.args.steps, "--lr", s.learning_rate,
           "--rank", s.rank, "--alpha", s.alpha, "--threads", 2, "--seed", s.seed, "--metrics-out", metrics]
    before = loadavg()
    child = run_child(cmd, ctx.out / "logs" / f"{name}.log", env=clean_env(), timeout=ctx.args.timeout)
    res = from_metrics(result(name, warmup=ctx.args.warmup), read_metrics(metrics))
    if child.rc != 0:
        res.update(status="failed", error=child.tail())
    version = next((ln for _, _, ln in child.lines if ln.startswith("torch ")), None)
    if version:
        res["notes"].append(version)
    return finish(res, child, before, TORCH_STEP_LINE)


# The `edgeft tune` flags for the common setup, in one place: adapt here if the CLI changes.
def edgeft_command(ctx: Ctx, recipe: Path, runs_dir: Path, matmul: str | None = None) -> list:
    s = ctx.setup
    exe = Path(sys.executable).parent / "edgeft"
    quant = ["--quantize-bits", ctx.quantize_bits] if ctx.quantize_bits else []
    return [exe if exe.exists() else "edgeft", "tune", "--recipe", recipe, "--data", ctx.chat, "--model", ctx.model,
            *quant,
            "--steps", ctx.args.steps, "--batch-size", s.batch_size, "--max-seq-len", s.max_seq_len,
            "--lora-rank", s.rank, "--lora-alpha", s.alpha, "--learning-rate", s.learning_rate,
            "--warmup-steps", 0, "--valid-fraction", 0, "--eval-every", 0, "--save-every", 0,
            "--no-export", "--no-eval", "--seed", s.seed, "--runs-dir", runs_dir, "--name", "bench",
            *(["--matmul", matmul] if matmul else [])]


def edgeft_recipe(ctx: Ctx) -> Path:
    """The knobs the flags above do not reach: a constant learning rate (the peers use one)
    and no gradient clipping (the peers do not clip)."""
    path = ctx.out / "edgeft" / "bench-recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by scripts/bench.py: the benchmark's common setup\n"
        f"lora: {{rank: {ctx.setup.rank}, alpha: {ctx.setup.alpha}, dropout: 0.0, targets: [{', '.join(TARGETS)}]}}\n"
        "data: {valid_fraction: 0.0, overlong: truncate}\n"
        "train: {warmup_steps: 0, min_lr_ratio: 1.0, weight_decay: 0.0, max_grad_norm: null, grad_accum: 1}\n"
        "export: {enabled: false}\n",
        encoding="utf-8",
    )
    return path


def run_edgeft(ctx: Ctx, name: str = "edgeft", matmul: str | None = None) -> dict:
    runs_dir = ctx.out / name / "runs"
    shutil.rmtree(runs_dir / "bench", ignore_errors=True)  # edgeft refuses to overwrite a run
    cmd = edgeft_command(ctx, edgeft_recipe(ctx), runs_dir, matmul)
    before = loadavg()
    child = run_child(cmd, ctx.out / "logs" / f"{name}.log", env=clean_env(), timeout=ctx.args.timeout)
    rows = read_metrics(runs_dir / "bench" / "metrics.jsonl")
    res = credit_batch_tokens(from_metrics(result(name, warmup=ctx.args.warmup), rows), rows, ctx.samples, ctx.schedule)
    if child.rc != 0 or not rows:
        res.update(status="failed", error=child.tail())
    if rows:
        res["edgeft_peak_mem_gb"] = max(r.get("peak_mem_gb", 0) for r in rows)
        res["notes"].append(schedule_check(ctx, rows, ctx.tok_check))
    log = (ctx.out / "logs" / f"{name}.log").read_text(errors="replace")
    res["notes"] += [line.split("] ", 1)[-1] for line in log.splitlines() if "matrix products in" in line][:1]
    return finish(res, child, before, EDGEFT_STEP_LINE)


def credit_batch_tokens(res: dict, rows: list[dict], samples: list, schedule: list) -> dict:
    """Each step credited with its batch's input tokens, as every contestant (batch_tokens):
    edgeft's own count leaves out each sequence's tokens after its last loss token, which it
    does not compute (nothing they feed reaches the loss), so its tokens/s would not compare.
    Its own count stays as computed_tokens."""
    res["computed_tokens"] = res["tokens"]
    res["tokens"] = [batch_tokens(samples, schedule[r["step"] - 1]) for r in rows]
    return res


def schedule_check(ctx: Ctx, rows: list[dict], tok_check: dict | None) -> str:
    """Did edgeft train on the common batches? Its loss-token count per step must equal ours,
    except in batches holding a chat its tokenizer renders differently (a few tokens off)."""
    differ = {d["sample"] for d in (tok_check or {}).get("differ", [])}
    exact, near, bad = 0, 0, []
    for r in rows:
        idx = ctx.schedule[r["step"] - 1]
        mine, theirs = sum(sum(ctx.samples[i]["mask"]) for i in idx), r.get("loss_tokens")
        if theirs is None:
            return "batches not checked (no loss_tokens in metrics.jsonl)"
        if theirs == mine:
            exact += 1
        elif differ & set(idx) and abs(theirs - mine) <= 8 * len(differ & set(idx)):
            near += 1
        else:
            bad.append(r["step"])
    if bad:
        return (f"WARNING: at steps {bad[:5]} edgeft's loss-token counts differ from the common batches': "
                "it did not draw the same batches (see batch_order)")
    return (f"batches checked: loss tokens equal at {exact} steps, within a few tokens at {near} "
            "(a chat its tokenizer renders differently)")


REPORT = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s*[▼▲]\s+([0-9,.]+)\s+([0-9.]+)k\s*$")


def mlx_lm_config(ctx: Ctx, steps: int, data_dir: Path, adapters: Path) -> str:
    s = ctx.setup
    return "\n".join([
        "# written by scripts/bench.py: the benchmark's common setup for `mlx_lm lora`",
        f"model: {mlx_model_dir(ctx)}", "train: true", f"data: {data_dir}", "fine_tune_type: lora",
        "num_layers: -1", f"batch_size: {s.batch_size}", f"iters: {steps}", f"learning_rate: {s.learning_rate}",
        "steps_per_report: 1", "steps_per_eval: 1000000", "save_every: 1000000", f"adapter_path: {adapters}",
        f"max_seq_length: {s.max_seq_len}", "mask_prompt: true", "grad_checkpoint: false", f"seed: {s.seed}",
        "optimizer: adamw",
        "optimizer_config: {adamw: {weight_decay: 0.0, bias_correction: true}}  # as torch's AdamW",
        f"lora_parameters: {{keys: [{', '.join(MLX_KEYS)}], rank: {s.rank}, scale: {s.alpha / s.rank}, dropout: 0.0}}",
        "",
    ])


def run_mlx_lm(ctx: Ctx) -> dict:
    steps = ctx.args.mlx_lm_steps
    work = ctx.out / "mlx-lm"
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The same chats, reordered so that mlx-lm draws the common batches; no valid.jsonl:
    # mlx-lm then skips validation.
    lines = ctx.chat.read_text(encoding="utf-8").splitlines(keepends=True)
    order = mlx_lm_file_order(ctx.schedule, len(lines), ctx.setup.batch_size, ctx.setup.seed)
    (data_dir / "train.jsonl").write_text("".join(lines[i] for i in order), encoding="utf-8")
    cfg = work / "lora.yaml"
    cfg.write_text(mlx_lm_config(ctx, steps, data_dir, work / "adapters"), encoding="utf-8")
    before = loadavg()
    child = run_child([sys.executable, "-m", "mlx_lm", "lora", "-c", cfg], ctx.out / "logs" / "mlx-lm.log",
                      env=clean_env(), timeout=ctx.args.timeout)
    res = result("mlx-lm", warmup=min(ctx.args.mlx_lm_warmup, steps - 1))
    # A step runs between the line before its report and its report (no validation set).
    prev_t, expect_loss_toks, verified = None, 0, True
    for t, _, line in child.lines:
        m = REPORT.match(line)
        if m and prev_t is not None:
            it, loss, printed_k = int(m[1]), float(m[2]), float(m[4])
            idx = ctx.schedule[it - 1]
            res["losses"].append(loss)
            res["tokens"].append(batch_tokens(ctx.samples, idx))
            res["step_times"].append(t - prev_t)
            expect_loss_toks += mlx_lm_loss_tokens(ctx, idx)
            verified &= abs(expect_loss_toks / 1000 - printed_k) <= 0.051
        prev_t = t
    res["steps"] = len(res["losses"])
    if child.rc != 0 or not res["losses"]:
        res.update(status="failed", error=child.tail())
    elif not verified:
        res["notes"].append("WARNING: mlx-lm's printed loss-token counts do not match the replicated batch "
                            "order: its tokens/s may be off (see mlx_lm_file_order)")
    else:
        res["notes"].append("batches checked against the loss tokens mlx-lm prints")
    res["notes"].append("model: the GGUF's own 4-bit/8-bit tensors in an mlx-lm folder; stock BLAS")
    return finish(res, child, before, REPORT)


def mlx_lm_loss_tokens(ctx: Ctx, idx: list[int]) -> int:
    """Targets mlx-lm's default_loss counts: from the prompt length through the last token of
    the (truncated) sequence, within the padded width it builds."""
    lengths = [len(ctx.samples[i]["ids"]) for i in idx]
    width = min(1 + 32 * ((max(lengths) + 31) // 32), ctx.setup.max_seq_len)
    total = 0
    for i, n in zip(idx, lengths):
        offset = ctx.samples[i]["mask"].index(True)
        total += max(0, min(n, width - 1) - max(offset, 1) + 1)
    return total


RUNNERS = {"torch-fp32": lambda c: run_torch(c, "torch-fp32"), "torch-bf16": lambda c: run_torch(c, "torch-bf16"),
           "edgeft": run_edgeft, "edgeft-fp32": lambda c: run_edgeft(c, "edgeft-fp32", "fp32"), "mlx-lm": run_mlx_lm}


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    from edgeft import system

    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in system.cpu_flags()]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "isa": isa,
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ["edgeft", "mlx", "mlx-cpu", "mlx-lm", "numpy"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["torch-venv"] = " ".join(TORCH_REQUIREMENTS)
    return out


def at(values: list, step: int):
    return values[step - 1] if 0 < step <= len(values) else None


def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def render_markdown(doc: dict) -> str:
    res = [r for r in doc["results"]]
    ok = [r for r in res if r["status"] == "ok"]
    k = min((r["steps"] for r in ok), default=0)
    n = doc["config"]["steps"]
    loss_at = sorted({j for j in (1, k, n) if j > 0})  # first step, the common steps, all steps
    ref = doc.get("reference")
    refr = next((r for r in res if r["name"] == ref), None)
    lines = [
        "# edgeft benchmark: LoRA training on the CPU", "",
        f"{doc['date']} · `{doc['command']}` · {doc['wall_s'] / 60:.1f} min",
        f"{doc['machine']['cpu']} ({' '.join(doc['machine'].get('isa', [])) or 'no AVX2'}), "
        f"{doc['machine']['cores']} cores, {doc['machine']['memory_gib']} GiB; "
        + ", ".join(f"{k_} {v}" for k_, v in doc["versions"].items()), "",
        f"Same for all: {Path(doc['config']['model']).name}, {doc['config']['samples']} chats "
        f"({doc['config']['data_source']}), LoRA r{doc['config']['rank']} alpha {doc['config']['alpha']:g} on "
        f"q,k,v,o,gate,up,down of all layers, batch {doc['config']['batch_size']}, max {doc['config']['max_seq_len']} "
        f"tokens, loss on the answer only, AdamW lr {doc['config']['learning_rate']:g} constant, no weight decay, "
        "no clipping.", "",
        f"| contestant | steps (warm-up) | tokens/s | × {ref or 'torch'} | tokens/CPU-s | × | peak RSS GB | × | "
        + "".join(f"loss @{j} | " for j in loss_at) + f"mean loss {max(n - 9, 1)}-{n} | cores used | "
        "of ceiling | wall s |",
        "| --- | --- |" + " ---: |" * (10 + len(loss_at)),
    ]
    for r in res:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['error']} |" + " |" * (10 + len(loss_at)))
            continue
        def ratio(key):
            mine, theirs = r.get(key), (refr or {}).get(key)
            return mine / theirs if mine and theirs else None

        last = r["losses"][max(n - 10, 0):n] if r["steps"] >= n else []
        lines.append(
            f"| {r['name']} | {r['steps']} ({r['warmup']}) | {fmt(r['steady_tokens_per_s'], '.1f')} | "
            f"{fmt(ratio('steady_tokens_per_s'), '.3f')} | {fmt(r.get('steady_tokens_per_cpu_s'), '.1f')} | "
            f"{fmt(ratio('steady_tokens_per_cpu_s'), '.3f')} | {fmt(r['peak_rss_gb'])} | {fmt(ratio('peak_rss_gb'))} | "
            + "".join(f"{fmt(at(r['losses'], j), '.3f')} | " for j in loss_at)
            + f"{fmt(sum(last) / len(last) if last else None, '.3f')} | "
            f"{fmt(r.get('steady_cores_used'), '.2f')} | {fmt(ceiling_share(doc, r), '.0%')} | "
            f"{fmt(r['wall_s'], '.0f')} |"
        )
    lines += ["", "Notes:",
              "- tokens/s: non-padding input tokens per second of step time, after the warm-up steps. "
              "tokens/CPU-s: the same tokens per CPU-second the contestant used in those steps (read from "
              "/proc at each step's report line): less sensitive to other work on the machine. cores used: "
              "CPU-seconds per second in those steps; near 2 when it had this 2-core machine to itself, well "
              "below when other work took the cores (then tokens/s is low and ratios are suspect). peak RSS: "
              "the child process's ru_maxrss (model loading included). × columns: against the fastest "
              "PyTorch run.",
              f"- All train on the same batches in the same order ({doc['config']['batch_order']}): edgeft "
              "reads the chat file, the torch peers get those batches as token ids, mlx-lm reads the chats "
              "reordered so that it draws them. mlx-lm's loss also counts the newline after <|im_end|> and "
              "one padding position per sequence (mlx_lm default_loss `steps <= lengths`; "
              "ml-explore/mlx-lm PR #1697), so it reads higher than the others on the same weights and batch.",
              "- Load average (1 min) before → after each contestant, to judge noise from other work on the "
              "machine: " + ", ".join(f"{r['name']} {fmt(r.get('loadavg_before'), '.1f')} → "
                                       f"{fmt(r.get('loadavg_after'), '.1f')}" for r in res if r.get("wall_s")) + "."]
    mm, g = doc.get("matmul_gflops") or {}, doc.get("gflop_per_token")
    if mm:
        lines.append("- matmul speed on this CPU, GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in mm.items() if v)
                     + ".")
    if g and ceiling(doc):
        lines.append(f"- of ceiling: tokens/s x {g:.3f} GFLOP per token (a LoRA step's matrix work on these "
                     "batches: the frozen projections forward and back to their inputs, causal attention, the "
                     "head where the loss is) over edgeft doctor's fp32 matmul speed: a ceiling of "
                     f"{ceiling(doc) / g:.0f} tokens/s.")
    if any(len(r.get("rounds", [])) > 1 for r in res):
        ratios = doc.get("round_ratios") or {}
        lines.append("- rounds (the contestants taking turns; the table gives each one's median round): tokens/s "
                     + "; ".join(f"{r['name']} " + ", ".join(fmt(x["tokens_per_s"], ".1f") for x in r["rounds"])
                                 for r in res if len(r.get("rounds", [])) > 1) + "."
                     + (f" Against {ref} in the same round: " + "; ".join(
                         f"{name} " + ", ".join(fmt(x, ".2f") for x in xs) for name, xs in ratios.items()) + "."
                        if ratios else ""))
    for r in res:
        for note in r.get("notes", []):
            lines.append(f"- {r['name']}: {note}")
    m = doc.get("matched")
    if m:
        lines.append(f"- On the very same steps ({m['steps']}), mlx-lm ran at {m['mlx_lm']:.1f} tokens/s and "
                     f"{m['torch']} at {m['torch_tps']:.1f}: ×{m['ratio']:.3f}.")
    tc = doc.get("edgeft_tokenizer", {})
    if "same" in tc:
        lines.append(f"- edgeft's tokenizer renders {tc['same']}/{tc['total']} chats to the same ids as "
                     "transformers' (the peers' tokens).")
    elif tc:
        lines.append(f"- edgeft's tokenizer was not compared: {tc['skipped']}")
    return "\n".join(lines) + "\n"


def ceiling(doc: dict) -> float | None:
    return (doc.get("matmul_gflops") or {}).get(DOCTOR_KEY)


def ceiling_share(doc: dict, r: dict) -> float | None:
    """The share of the fp32 matmul ceiling a contestant's tokens/s reaches."""
    g, c = doc.get("gflop_per_token"), ceiling(doc)
    return r["steady_tokens_per_s"] * g / c if g and c and r.get("steady_tokens_per_s") else None


def matched_ratio(results: list[dict], ref: str | None) -> dict | None:
    """mlx-lm against the reference torch run on exactly the same (post-warm-up) steps."""
    mlx = next((r for r in results if r["name"] == "mlx-lm" and r["status"] == "ok"), None)
    t = next((r for r in results if r["name"] == ref and r["status"] == "ok"), None)
    if not mlx or not t or mlx["steps"] <= mlx["warmup"] or t["steps"] < mlx["steps"]:
        return None
    sl = slice(mlx["warmup"], mlx["steps"])
    m_tps = sum(mlx["tokens"][sl]) / sum(mlx["step_times"][sl])
    t_tps = sum(t["tokens"][sl]) / sum(t["step_times"][sl])
    return {"steps": f"{sl.start + 1}-{sl.stop}", "mlx_lm": m_tps, "torch": ref, "torch_tps": t_tps,
            "ratio": m_tps / t_tps}


def median_round(runs: list[dict]) -> dict:
    """The run of a contestant's rounds with the median tokens/s (the lower middle of an even
    count), carrying every round's figures; the last run when none finished."""
    ok = sorted((r for r in runs if r["status"] == "ok" and r["steady_tokens_per_s"]),
                key=lambda r: r["steady_tokens_per_s"])
    chosen = dict(ok[(len(ok) - 1) // 2] if ok else runs[-1])
    chosen["rounds"] = [{"tokens_per_s": r["steady_tokens_per_s"], "tokens_per_cpu_s": r.get("steady_tokens_per_cpu_s"),
                         "measured_at": r["measured_at"]} for r in runs]
    return chosen


def round_ratios(results: list[dict], ref: str | None) -> dict:
    """tokens/s of each round of every contestant over the reference's in the same round."""
    refr = next((r for r in results if r["name"] == ref), None)
    if not refr or len(refr.get("rounds", [])) < 2:
        return {}
    theirs = [x["tokens_per_s"] for x in refr["rounds"]]
    return {r["name"]: [m["tokens_per_s"] / t if m["tokens_per_s"] and t else None
                        for m, t in zip(r["rounds"], theirs)]
            for r in results if r["name"] != ref and len(r.get("rounds", [])) > 1}


def write_report(ctx: Ctx, doc: dict, results: dict) -> None:
    order = [n for n in CONTESTANTS if n in results]
    doc["results"] = [results[n] for n in order]
    torch_ok = [results[n] for n in TORCH_NAMES if n in results and results[n]["status"] == "ok"
                and results[n]["steady_tokens_per_s"]]
    doc["reference"] = max(torch_ok, key=lambda r: r["steady_tokens_per_s"])["name"] if torch_ok else None
    doc["matched"] = matched_ratio(doc["results"], doc["reference"])
    doc["round_ratios"] = round_ratios(doc["results"], doc["reference"])
    doc["wall_s"] = time.perf_counter() - ctx.args.t0
    (ctx.out / "bench_results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (ctx.out / "bench_results.md").write_text(render_markdown(doc), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# --scaling: the same side by side at more sizes and sequence lengths

# Random-initialised models at real configs (their Hugging Face config.json shapes), with the
# tokenizer and 49k vocabulary of SmolLM2, whose chats every point trains on.
RANDOM_CONFIGS = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
}
REAL_MODELS = {"smollm2-135m": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}  # registry names
SCALING_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
SCALING_LENGTHS = [256, 512, 1024, 2048]
PLAN_LINE = re.compile(r"memory: about ([0-9.]+) GB at peak on the batches this run draws.*?([0-9.]+) GB for the "
                       r"largest batch")


def random_model(args, name: str, venv: Path, tokenizer_gguf: Path) -> Path:
    """The random-initialised folder of RANDOM_CONFIGS[name], made once in the torch venv."""
    folder = args.out.resolve() / "models" / name
    stamp = folder / "bench-config.json"
    want = json.dumps(RANDOM_CONFIGS[name], sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    child = run_child([venv / "bin" / "python", HERE / "bench_torch_peft.py", "init", "--gguf", tokenizer_gguf,
                       "--config", want, "--out", folder], args.out.resolve() / "logs" / f"init-{name}.log",
                      env=clean_env())
    if child.rc != 0:
        sys.exit(f"bench: making the random {name} failed: {child.tail()}")
    stamp.write_text(want)
    return folder


def scaling_point(args, model: str, length: int, venv: Path, torch_gflops: dict) -> dict:
    """One point of the grid: edgeft and the PyTorch configurations this CPU runs at speed, on
    chats of about `length` tokens, batch max(1, --scaling-tokens // length)."""
    from edgeft import hub

    smol = Path(hub.resolve("smollm2-135m-instruct"))
    if model in REAL_MODELS:
        gguf = Path(hub.resolve(REAL_MODELS[model]))
        src, bits = gguf, None
    else:
        gguf, src, bits = smol, random_model(args, model, venv, smol), 4
    point_args = argparse.Namespace(**{**vars(args), "steps": args.scaling_steps, "warmup": 1, "mlx_lm_steps": 1})
    ctx = Ctx(args=point_args, setup=Setup(batch_size=max(1, args.scaling_tokens // length), max_seq_len=length),
              out=args.out.resolve() / "scaling" / f"{model}-{length}", gguf=gguf, model=src, quantize_bits=bits,
              venv=venv, join_tokens=length, torch_gflops=torch_gflops)
    print(f"\n== {model}, {length} tokens, batch {ctx.setup.batch_size}", flush=True)
    prepare_data(ctx, None)
    ctx.tok_check = check_edgeft_tokens(ctx)
    point = {"model": model, "length": length, "batch": ctx.setup.batch_size, "samples": len(ctx.samples),
             "measured_at": dt.datetime.now().isoformat(timespec="minutes"),
             "gflop_per_token": lora_gflop_per_token(model_shapes(src), ctx.samples, ctx.schedule[1:args.scaling_steps]),
             "mean_tokens": sum(len(x["ids"]) for x in ctx.samples) / len(ctx.samples), "results": {}}
    for name in ["edgeft", *TORCH_NAMES]:
        if name in args.only:
            r = RUNNERS[name](ctx)
            point["results"][name] = r
            print(f"{name}: {r['status']} {r['error'] or ''} {fmt(r['steady_tokens_per_s'], '.1f')} tokens/s, "
                  f"peak RSS {fmt(r['peak_rss_gb'])} GB, losses {[round(x, 3) for x in r['losses'][:2]]}", flush=True)
    e = point["results"].get("edgeft")
    log = ctx.out / "logs" / "edgeft.log"
    m = PLAN_LINE.search(log.read_text(encoding="utf-8")) if e and log.exists() else None
    if m:
        point.update(plan_gb=float(m[1]), plan_worst_gb=float(m[2]))
    return point


def scaling_table(doc: dict) -> str:
    lines = ["# edgeft benchmark: the side by side at more sizes and lengths", "",
             f"{doc['date']} · `{doc['command']}` · {doc['wall_s'] / 60:.1f} min",
             f"{doc['machine']['cpu']} ({' '.join(doc['machine']['isa']) or 'no AVX2'}), {doc['machine']['cores']} "
             f"cores, {doc['machine']['memory_gib']} GiB; matmul GFLOP/s: "
             + ", ".join(f"{k} {v:.1f}" for k, v in doc["matmul_gflops"].items() if v),
             "points measured " + " to ".join(sorted({min(p.get("measured_at", "?") for p in doc["points"]),
                                                     max(p.get("measured_at", "?") for p in doc["points"])})), "",
             "| model | seq | batch | edgeft tok/s | best torch tok/s | × torch | of ceiling | edgeft RSS GB | "
             "torch RSS GB | × | plan GB (worst) | plan error |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in doc["points"]:
        e = p["results"].get("edgeft", {})
        torch_ok = [r for n, r in p["results"].items() if n in TORCH_NAMES and r["status"] == "ok"
                    and r["steady_tokens_per_s"]]
        t = max(torch_ok, key=lambda r: r["steady_tokens_per_s"]) if torch_ok else {}
        etps, ttps = e.get("steady_tokens_per_s"), t.get("steady_tokens_per_s")
        c = ceiling(doc)
        err = p["plan_gb"] / e["peak_rss_gb"] - 1 if p.get("plan_gb") and e.get("peak_rss_gb") else None
        lines.append(
            f"| {p['model']} | {p['length']} | {p['batch']} | {fmt(etps, '.1f')} | "
            f"{fmt(ttps, '.1f')}{' (' + t['name'] + ')' if t else ''} | {fmt(etps / ttps if etps and ttps else None)} | "
            f"{fmt(etps * p['gflop_per_token'] / c if etps and c else None, '.0%')} | {fmt(e.get('peak_rss_gb'))} | "
            f"{fmt(t.get('peak_rss_gb'))} | {fmt(e['peak_rss_gb'] / t['peak_rss_gb'] if t and e.get('peak_rss_gb') else None)} | "
            f"{fmt(p.get('plan_gb'))} ({fmt(p.get('plan_worst_gb'))}) | {fmt(err, '+.0%')} |")
    lines += ["", "Notes:",
              "- Each point trains the same batches for every contestant (edgeft's order), on chats of "
              "consecutive seed tasks joined as turns to about `seq` tokens and truncated there, loss on every "
              f"assistant turn, LoRA r8 on all 7 projections; {doc['steps']} steps, the first left out of "
              "tokens/s. qwen2.5-* are random-initialised at those models' real shapes with SmolLM2's 49k "
              "vocabulary and tokenizer; edgeft quantizes them to 4 bits on load, PyTorch trains their fp32 "
              "weights. smollm2-135m and gemma3-270m are the real GGUF files (PyTorch dequantizes them).",
              "- of ceiling: edgeft's tokens/s x the step's matrix work per token, over edgeft doctor's fp32 "
              "matmul speed. plan: edgeft's preflight for the batches the run draws (the worst batch the data "
              "could form in brackets); plan error: against the measured peak RSS.",
              "- Per point: the data, metrics and logs in `scaling/<model>-<seq>/`."]
    not_ok = {}  # contestants that did not run or failed, and why: one line each
    for p in doc["points"]:
        for n, r in p["results"].items():
            if r["status"] != "ok":
                not_ok.setdefault(f"{n} {r['status']}: {r['error']}", []).append(f"{p['model']} {p['length']}")
    lines += [f"- {why} ({', '.join(where)})" for why, where in not_ok.items()]
    return "\n".join(lines) + "\n"


def scaling_svg(doc: dict) -> str:
    """tokens/s against sequence length, per model: edgeft solid, the best PyTorch dashed."""
    w, h, left, bottom = 640, 400, 60, 40
    pts = doc["points"]
    lengths = sorted({p["length"] for p in pts})
    tps = [r["steady_tokens_per_s"] for p in pts for r in p["results"].values() if r.get("steady_tokens_per_s")]
    if not lengths or not tps:
        return ""
    top = max(tps) * 1.1

    def xy(length, v):
        i = lengths.index(length)
        x = left + (w - left - 20) * (i / max(len(lengths) - 1, 1))
        return x, h - bottom - (h - bottom - 20) * v / top

    colors = ["#1b6ac9", "#d1495b", "#2e8b57", "#8a5cf6", "#e08e0b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#333"/>',
           f'<line x1="{left}" y1="20" x2="{left}" y2="{h - bottom}" stroke="#333"/>',
           f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">sequence length (tokens)</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">tokens/s</text>']
    for length in lengths:
        x, _ = xy(length, 0)
        out.append(f'<text x="{x:.0f}" y="{h - bottom + 14}" text-anchor="middle">{length}</text>')
    for k in range(5):
        v = top * k / 4
        _, y = xy(lengths[0], v)
        out.append(f'<text x="{left - 6}" y="{y + 4:.0f}" text-anchor="end">{v:.0f}</text>')
    models = list(dict.fromkeys(p["model"] for p in pts))
    for j, model in enumerate(models):
        color = colors[j % len(colors)]
        for who, dash in (("edgeft", ""), ("torch", ' stroke-dasharray="5,4"')):
            line = []
            for p in (p for p in pts if p["model"] == model):
                rs = [r for n, r in p["results"].items() if (n == "edgeft") == (who == "edgeft")
                      and r.get("steady_tokens_per_s")]
                if rs:
                    line.append(xy(p["length"], max(r["steady_tokens_per_s"] for r in rs)))
            if line:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
                out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
                fill = color if who == "edgeft" else "white"
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}" stroke="{color}"/>' for x, y in line]
        out.append(f'<text x="{w - 150}" y="{30 + 16 * j}" fill="{color}">{model}</text>')
    out.append(f'<text x="{w - 150}" y="{30 + 16 * len(models)}">solid edgeft, dashed PyTorch</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def run_scaling(args) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv = out / "torch-venv"
    probe_ctx = Ctx(args=args, setup=Setup(), out=out, gguf=Path(), venv=venv)
    ensure_torch_venv(probe_ctx)
    gflops = torch_matmul_gflops(probe_ctx)
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python scripts/bench.py " + " ".join(args.argv), "machine": machine(),
           "versions": versions(), "steps": args.scaling_steps,
           "matmul_gflops": matmul_gflops(gflops), "points": []}
    # Points of an earlier run in this folder that this one does not repeat are kept (grow the
    # grid a part at a time); its header says when each was measured.
    prev = out / "scaling_results.json"
    grid = {(m, n) for m in args.scaling_models for n in args.scaling_lengths}
    if prev.exists():
        doc["points"] = [p for p in json.loads(prev.read_text(encoding="utf-8"))["points"]
                         if (p["model"], p["length"]) not in grid]

    def order(p):
        return SCALING_MODELS.index(p["model"]), p["length"]

    for model in args.scaling_models:
        for length in args.scaling_lengths:
            doc["points"] = sorted(doc["points"] + [scaling_point(args, model, length, venv, gflops)], key=order)
            doc["wall_s"] = time.perf_counter() - args.t0
            (out / "scaling_results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            (out / "scaling_results.md").write_text(scaling_table(doc), encoding="utf-8")
            (out / "scaling.svg").write_text(scaling_svg(doc), encoding="utf-8")
    print()
    print((out / "scaling_results.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'scaling_results.md'}, {out / 'scaling_results.json'}, {out / 'scaling.svg'}")


# ---------------------------------------------------------------------------------------------


def default_gguf() -> Path:
    from edgeft import hub

    return Path(hub.resolve("smollm2-135m-instruct"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="steps for edgeft and the torch peers (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s (default 2)")
    p.add_argument("--mlx-lm-steps", type=int, default=2, help="steps for mlx-lm, ~2-3 min each (default 2)")
    p.add_argument("--mlx-lm-warmup", type=int, default=1, help="mlx-lm steps left out of tokens/s (default 1)")
    p.add_argument("--only", default=",".join(CONTESTANTS), help=f"comma list of {', '.join(CONTESTANTS)}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="output dir (default runs/bench)")
    p.add_argument("--model", type=Path, default=None, help="the GGUF (default: edgeft's built-in SmolLM2)")
    p.add_argument("--seed-tasks", type=Path, default=SEED_TASKS,
                   help="seed tasks JSONL (default ../shared/data/seed_tasks.jsonl; if absent, generated chats)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the contestants this many times, taking turns (mlx-lm once); the table gives each "
                   "one's median round, a note every round's ratio (default 1; not with --scaling)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contestant before it is stopped")
    p.add_argument("--run-slow-dtypes", action="store_true",
                   help=f"run a torch dtype even when its matmul is {SLOW_DTYPE}x slower than fp32's on this CPU")
    p.add_argument("--scaling", action="store_true",
                   help="the side by side at more sizes and lengths (edgeft and PyTorch only): scaling_results.md")
    p.add_argument("--scaling-models", default=",".join(SCALING_MODELS), help="comma list of "
                   f"{', '.join(SCALING_MODELS)} (default all)")
    p.add_argument("--scaling-lengths", default=",".join(map(str, SCALING_LENGTHS)),
                   help="comma list of sequence lengths (default 256,512,1024,2048)")
    p.add_argument("--scaling-tokens", type=int, default=1024,
                   help="tokens per batch at each point: batch = max(1, this // length) (default 1024)")
    p.add_argument("--scaling-steps", type=int, default=4, help="steps per contestant and point, the first "
                   "left out of tokens/s (default 4)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.scaling_models = [m.strip() for m in args.scaling_models.split(",") if m.strip()]
    args.scaling_lengths = [int(x) for x in args.scaling_lengths.split(",") if x.strip()]
    bad = [m for m in args.scaling_models if m not in SCALING_MODELS]
    if bad:
        p.error(f"--scaling-models: unknown {', '.join(bad)}; known: {', '.join(SCALING_MODELS)}")
    if args.scaling_steps < 2:
        p.error("--scaling-steps must be at least 2 (the first is a warm-up)")
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CONTESTANTS]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(CONTESTANTS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.steps <= args.warmup or args.mlx_lm_steps < 1:
        p.error("--steps must exceed --warmup, and --mlx-lm-steps be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    if args.scaling:
        return run_scaling(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gguf = (args.model or default_gguf()).expanduser().resolve()
    if not gguf.exists():
        sys.exit(f"bench: {gguf} not found; pass --model PATH.gguf")
    ctx = Ctx(args=args, setup=Setup(), out=out, gguf=gguf, model=gguf, venv=out / "torch-venv")

    ensure_torch_venv(ctx)
    ctx.torch_gflops = torch_matmul_gflops(ctx)
    tok_dir = None
    if "mlx-lm" in args.only and not mlx_model_ready(ctx):
        tok_dir = out / "models" / "tokenizer-from-gguf"
    prepare_data(ctx, tok_dir)
    epoch = len(ctx.samples) // ctx.setup.batch_size
    if "mlx-lm" in args.only and args.mlx_lm_steps > epoch:
        sys.exit(f"bench: --mlx-lm-steps {args.mlx_lm_steps}: at most one epoch ({epoch}), beyond it mlx-lm's "
                 "batches are not the common ones")
    if tok_dir:
        make_mlx_model(ctx, tok_dir)

    config = dict(dataclasses.asdict(ctx.setup), model=str(gguf), steps=args.steps, warmup=args.warmup,
                  targets=TARGETS, samples=len(ctx.samples),
                  data_source=json.loads(ctx.tokens.read_text())["source"],
                  data_sha256=hashlib.sha256(ctx.chat.read_bytes()).hexdigest(), batch_order=ctx.order_source)
    doc = {"date": dt.datetime.now().isoformat(timespec="seconds"),
           "command": "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(), "versions": versions(), "config": config,
           "matmul_gflops": matmul_gflops(ctx.torch_gflops)}
    doc["gflop_per_token"] = lora_gflop_per_token(model_shapes(ctx.model), ctx.samples,
                                                  ctx.schedule[args.warmup:args.steps])
    if "edgeft" in args.only:
        doc["edgeft_tokenizer"] = ctx.tok_check = check_edgeft_tokens(ctx)

    # Keep earlier results of the contestants not run now, if they ran the same setup.
    results = {}
    prev_path = out / "bench_results.json"
    if prev_path.exists():
        prev = json.loads(prev_path.read_text(encoding="utf-8"))
        if prev.get("config") == config:
            results = {r["name"]: r for r in prev.get("results", []) if r["name"] not in args.only}
            doc["edgeft_tokenizer"] = doc.get("edgeft_tokenizer") or prev.get("edgeft_tokenizer")

    # With --rounds, the contestants take turns round after round (mlx-lm, slow, runs in the
    # first only): this machine's speed drifts by a third within minutes (the README's bench
    # section), so each contestant's median round goes in the table and the note gives every
    # round's ratio, each from two runs taken one right after the other.
    names = [c for c in CONTESTANTS if c in args.only]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rnd in range(args.rounds):
        for name in names:
            if name == "mlx-lm" and rnd > 0:
                continue
            label = f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"{name}: running{label} ...", flush=True)
            r = RUNNERS[name](ctx)
            runs[name].append(r)
            results[name] = median_round(runs[name])
            print(f"{name}: {r['status']} {r['error'] or ''} steps {r['steps']}, "
                  f"{fmt(r['steady_tokens_per_s'], '.1f')} tokens/s, peak RSS {fmt(r['peak_rss_gb'])} GB, "
                  f"losses {[round(x, 3) for x in r['losses'][:3]]}..., {fmt(r['wall_s'], '.0f')} s", flush=True)
            write_report(ctx, doc, results)

    write_report(ctx, doc, results)
    print()
    print((out / "bench_results.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'bench_results.md'}, {out / 'bench_results.json'}")


if __name__ == "__main__":
    main()
