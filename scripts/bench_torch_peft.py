"""The PyTorch peer of scripts/bench.py: transformers + PEFT LoRA on the CPU.

Runs inside its own virtual environment (bench.py makes it: torch 2.13.0 CPU, transformers,
peft, gguf), never in edgeft's: torch and MLX do not share a process here.

    python scripts/bench_torch_peft.py prepare --gguf M.gguf --chat chat.jsonl --max-seq-len 256 \
        --tokens-out tokens.json [--tokenizer-dir folder]
    python scripts/bench_torch_peft.py train --model M.gguf --tokens tokens.json \
        --batches batches.json --dtype bf16 --steps 40 --metrics-out metrics.jsonl

`prepare` renders every chat with the model's own chat template (read from the GGUF by
transformers) and writes the token ids and loss masks that every contestant is checked
against; with --tokenizer-dir it also saves the tokenizer files (for the MLX folder that
bench.py makes for the mlx-lm contestant). `train` is a plain training loop over
the batches bench.py chose; it writes one JSON line per step, like edgeft's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_tokenizer(gguf: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def sample_tokens(tok, messages: list[dict], max_len: int, end_of_turn: str = "<|im_end|>") -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat, and a mask that is True on every assistant turn's
    content and its end-of-turn token (the targets that carry loss), truncated to max_len."""
    ids = list(tok.apply_chat_template(messages, return_dict=False))
    end_id = tok.convert_tokens_to_ids(end_of_turn) if end_of_turn in tok.get_vocab() else tok.eos_token_id
    mask = [False] * len(ids)
    for turn, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = list(tok.apply_chat_template(messages[:turn], add_generation_prompt=True, return_dict=False))
        if ids[: len(prompt)] != prompt:
            raise ValueError("the chat template renders the prompt differently with the answer appended")
        stop = len(ids)
        for i in range(len(prompt), len(ids)):
            if ids[i] == end_id:
                stop = i + 1
                break
        for i in range(len(prompt), stop):
            mask[i] = True
    return ids[:max_len], mask[:max_len]


def prepare(args) -> None:
    gguf = Path(args.gguf)
    tok = load_tokenizer(gguf)
    if args.chat_template:  # the model has none: the one edgeft trains it with
        tok.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    samples = []
    with open(args.chat, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids, mask = sample_tokens(tok, json.loads(line)["messages"], args.max_seq_len, args.end_of_turn)
                samples.append({"ids": ids, "mask": mask})
    Path(args.tokens_out).write_text(
        json.dumps({"tokenizer": f"transformers {__import__('transformers').__version__} from {gguf.name}",
                    "max_seq_len": args.max_seq_len, "samples": samples}) + "\n",
        encoding="utf-8",
    )
    print(f"prepare: {len(samples)} samples -> {args.tokens_out}", flush=True)
    if args.tokenizer_dir:
        tok.save_pretrained(args.tokenizer_dir)  # for the MLX folder bench.py makes for mlx-lm
        print(f"prepare: tokenizer files -> {args.tokenizer_dir}", flush=True)


def make_batch(samples: list[dict], idx: list[int], pad_id: int):
    """input_ids / attention_mask / labels padded on the right to the batch's longest sample;
    labels are -100 where no loss is taken (transformers shifts them by one itself)."""
    import torch

    width = max(len(samples[i]["ids"]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(idx), width), dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    tokens = 0
    for row, i in enumerate(idx):
        s = samples[i]
        n = len(s["ids"])
        ids[row, :n] = torch.tensor(s["ids"])
        att[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(s["ids"], s["mask"])])
        tokens += n - 1  # inputs are ids[:-1]: the last token predicts nothing
    return ids, att, labels, tokens


def train(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    src = Path(args.model)
    tic = time.perf_counter()
    if src.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
    else:  # a Hugging Face folder (scripts/bench.py --scaling makes random-initialised ones)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    # PEFT's default: adapter weights stay fp32 on a bf16 base (mixed precision, as people run it).
    model = get_peft_model(model, cfg)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"torch {torch.__version__} {args.dtype}, {torch.get_num_threads()} threads, "
          f"{n_train / 1e6:.2f}M trainable, loaded in {time.perf_counter() - tic:.1f}s", flush=True)

    data = json.loads(Path(args.tokens).read_text(encoding="utf-8"))["samples"]
    schedule = json.loads(Path(args.batches).read_text(encoding="utf-8"))["batches"]
    if len(schedule) < args.steps:
        raise SystemExit(f"{args.batches}: {len(schedule)} batches, {args.steps} steps asked")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    with open(args.metrics_out, "w", encoding="utf-8") as out:
        for step in range(1, args.steps + 1):
            ids, att, labels, tokens = make_batch(data, schedule[step - 1], pad_id)
            tic = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_v = loss.item()
            dt = time.perf_counter() - tic
            rec = {"kind": "train", "step": step, "loss": loss_v, "lr": args.lr, "tokens": tokens,
                   "padded_tokens": int(ids.numel()), "step_time_s": dt, "tokens_per_s": tokens / dt}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"step {step}: loss {loss_v:.4f}, {tokens} tokens in {dt:.2f}s ({tokens / dt:.1f} tok/s)",
                  flush=True)


def init(args) -> None:
    """A random-initialised Hugging Face folder of the given config, with the GGUF's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    tok = load_tokenizer(Path(args.gguf))
    kw = json.loads(args.config)
    cfg = AutoConfig.for_model(kw.pop("model_type"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"init: {cfg.model_type} {n / 1e6:.0f}M parameters, random -> {args.out}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenize the chats; optionally save the tokenizer files")
    pp.add_argument("--gguf", required=True)
    pp.add_argument("--chat", required=True, help="chat JSONL ({'messages': [...]} per line)")
    pp.add_argument("--max-seq-len", type=int, required=True)
    pp.add_argument("--tokens-out", required=True)
    pp.add_argument("--tokenizer-dir", default=None, help="also save the tokenizer files here")
    pp.add_argument("--chat-template", default=None, help="a Jinja chat template file, for a model without one")
    pp.add_argument("--end-of-turn", default="<|im_end|>", help="the token that ends an assistant turn")
    pp.set_defaults(fn=prepare)
    pt = sub.add_parser("train", help="LoRA training loop over bench.py's batches")
    pt.add_argument("--model", required=True, help="a GGUF file or a Hugging Face folder")
    pt.add_argument("--tokens", required=True)
    pt.add_argument("--batches", required=True)
    pt.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    pt.add_argument("--steps", type=int, required=True)
    pt.add_argument("--lr", type=float, default=2e-4)
    pt.add_argument("--rank", type=int, default=8)
    pt.add_argument("--alpha", type=float, default=16.0)
    pt.add_argument("--threads", type=int, default=2)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--metrics-out", required=True)
    pt.set_defaults(fn=train)
    pi = sub.add_parser("init", help="a random-initialised Hugging Face folder of a config")
    pi.add_argument("--gguf", required=True, help="the GGUF whose tokenizer the folder gets")
    pi.add_argument("--config", required=True, help="JSON: model_type and the config's shapes")
    pi.add_argument("--out", required=True)
    pi.add_argument("--seed", type=int, default=0)
    pi.set_defaults(fn=init)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
