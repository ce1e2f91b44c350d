"""Generation speed on the CPU: edgeft's MLX generation against llama.cpp on the same GGUF.

    python scripts/bench_generation.py                          # SmolLM2 (the cached default), ~1 min
    python scripts/bench_generation.py --model gemma3-270m --tokens 128

`edgeft chat` and an evaluation without an exported GGUF generate with MLX (edgeft.generate, the
model made dense by backend.prepare_inference); an evaluation of an exported run uses llama.cpp
(edgeft.evaluate). Both answer the same chat prompts greedily here, for exactly --tokens new
tokens each (no stop), after one warm-up answer; prompt processing and generation are timed
apart. llama.cpp runs the file as it is (its own quantized kernels), with one thread per core.
Prints a table: tokens/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import edgeft  # noqa: F401  (BLAS before mlx)

PROMPTS = [
    "Write a short note to a customer whose tea order arrived late.",
    "Explain in a few sentences how to brew green tea.",
    "List three things to pack for a weekend hike, and why.",
]


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def mlx_speeds(path: Path, tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of edgeft's MLX generation."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from edgeft import backend, generate
    from edgeft.loader import load

    loaded = load(path)
    model = backend.prepare_inference(loaded.model)
    model.eval()
    prompt_s, gen_s, n_prompt = [], [], []
    for i, text in enumerate([PROMPTS[0], *PROMPTS]):
        ids = generate.prompt_ids(loaded.tokenizer, [{"role": "user", "content": text}])
        cache = make_prompt_cache(model)
        tic = time.perf_counter()
        logits = model(mx.array(ids)[None], cache=cache)[:, -1, :]
        tok = mx.argmax(logits, axis=-1)
        mx.eval(tok)
        mid = time.perf_counter()
        for _ in range(tokens - 1):
            tok = mx.argmax(model(tok.reshape(1, 1), cache=cache)[:, -1, :], axis=-1)
            mx.eval(tok)
        end = time.perf_counter()
        if i:  # the first answer warms up
            prompt_s.append(mid - tic)
            gen_s.append(end - mid)
            n_prompt.append(len(ids))
    return sum(n_prompt) / sum(prompt_s), (tokens - 1) * len(gen_s) / sum(gen_s)


def llama_cpp_speeds(path: Path, tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of llama.cpp, from its own timings."""
    import llama_cpp

    from edgeft import generate
    from edgeft.loader import load

    tok = load(path, tokenizer_only=True).tokenizer
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    prompt_s, gen_s, n_prompt = [], [], []
    try:
        for i, text in enumerate([PROMPTS[0], *PROMPTS]):
            ids = generate.prompt_ids(tok, [{"role": "user", "content": text}])
            llm.reset()
            tic = time.perf_counter()
            llm.eval(ids)
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            mid = time.perf_counter()
            for _ in range(tokens - 1):
                llm.eval([nxt])
                nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            end = time.perf_counter()
            if i:
                prompt_s.append(mid - tic)
                gen_s.append(end - mid)
                n_prompt.append(len(ids))
    finally:
        llm.close()
    return sum(n_prompt) / sum(prompt_s), (tokens - 1) * len(gen_s) / sum(gen_s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or GGUF file")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per answer (default 128)")
    args = p.parse_args(argv)
    from edgeft import hub

    path = Path(hub.resolve(args.model, log=lambda m: print(m, file=sys.stderr)))
    rows = {"edgeft (MLX)": mlx_speeds(path, args.tokens), "llama.cpp": llama_cpp_speeds(path, args.tokens)}
    print(f"{path.name}, {len(PROMPTS)} prompts x {args.tokens} new tokens, greedy; "
          f"{cpu_name()}, {os.cpu_count()} cores\n")
    print("| engine | prompt tokens/s | generated tokens/s | generation × llama.cpp |")
    print("| --- | ---: | ---: | ---: |")
    ref = rows["llama.cpp"][1]
    for name, (pp, tg) in rows.items():
        print(f"| {name} | {pp:.0f} | {tg:.1f} | {tg / ref:.2f} |")


if __name__ == "__main__":
    main()
