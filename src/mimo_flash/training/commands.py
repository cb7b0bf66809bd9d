"""`mimo-flash demo` and `mimo-flash train`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterator

from ..cli import finite_float


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: train a tiny MiMo-V2-Flash from scratch on the CPU, save, "
                                    "reload and generate",
                       description="Train the tiny preset (MTP included) from scratch on CPython's pydoc topics "
                                   "with a BPE tokenizer trained on them, save a hub-format checkpoint, reload it "
                                   "and generate. A few minutes on two CPU cores; no download.")
    p.add_argument("--out", help="directory for the demo's outputs (default: a new temporary directory)")
    p.add_argument("--steps", type=int, help="training steps (default: the demo's own number)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="pre-train or fine-tune on text / JSONL data (one process or torchrun)",
                       description="Pre-train from a preset or config, or fine-tune a checkpoint (--init-from). "
                                   "From scratch without --tokenizer, a byte-level BPE of the model's vocab_size is "
                                   "trained on the data first (saved in OUT/tokenizer, reused by --resume). "
                                   "The model is built on the meta device and each process fills only its own "
                                   "shards (from --init-from, or a seeded init that is the same on any number of "
                                   "processes). Under torchrun the model is sharded with FSDP2; --ep N splits the "
                                   "experts over N ranks, --cp N each sequence over N ranks. Checkpoints are "
                                   "torch.distributed.checkpoint shards that resume on another layout.")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="train from scratch: a preset (tiny, mini, flash)")
    src.add_argument("--config", help="train from scratch: a config.json")
    src.add_argument("--init-from", help="fine-tune: a hub-format checkpoint directory (weights, config, tokenizer)")
    data = t.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", nargs="+",
                      help="text files, JSONL files ({'text'} or chat {'messages'}) or directories of them")
    data.add_argument("--data-dir", help="a token directory written by `mimo-flash tokenize` (memory-mapped, "
                                         "read row by row; needs the tokenizer it was written with)")
    t.add_argument("--tokenizer", help="directory with tokenizer.json (default: the --init-from checkpoint's; from "
                                       "scratch, a byte-level BPE trained on --data)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for --preset / --config, e.g. vocab_size=4096 (JSON values)")
    t.add_argument("--out", default="runs/train", help="run directory: checkpoints, metrics, plot, final model")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--steps", type=int, help=_device_default("steps"))
    t.add_argument("--seq-len", type=int, help=_device_default("seq_len") + "; at most the model's "
                   "max_position_embeddings")
    t.add_argument("--batch-size", type=int, help="rows per micro-batch per process; " + _device_default("batch_size"))
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=finite_float, default=None,
                   help="peak LR (default 3e-4 from scratch, 2e-5 fine-tuning)")
    t.add_argument("--min-lr-ratio", type=finite_float, default=0.1)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    t.add_argument("--weight-decay", type=finite_float, default=0.1)
    t.add_argument("--grad-clip", type=finite_float, default=1.0)
    t.add_argument("--mtp-weight", type=finite_float, default=None, help="MTP loss weight (default: the config's, 0.3)")
    t.add_argument("--no-mtp", action="store_true", help="train the main head only")
    t.add_argument("--bias-update-rate", type=finite_float, default=None,
                   help="aux-loss-free balancing rate (default 1e-3 from scratch, 0 = frozen when fine-tuning)")
    t.add_argument("--activation-checkpointing", action="store_true")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--ep", type=int, default=1, help="expert-parallel size (under torchrun)")
    t.add_argument("--cp", type=int, default=1, help="context-parallel size (under torchrun): each sequence split "
                                                     "over N ranks; --seq-len must be divisible by 2N")
    t.add_argument("--export-fp8", action="store_true",
                   help="write the final model with FP8 weights and 128x128 block scales (as the release)")
    t.add_argument("--attention-backend", help="attention backend (default auto)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: one log line every --log-every steps")
    t.add_argument("--log-every", type=int, default=None,
                   help="steps between log lines without the progress bar (default: a tenth of --steps)")
    t.set_defaults(fn=cmd_train)


# Defaults that fit the device: today's on CUDA; on a CPU, a run of the tiny preset in about a minute.
DEVICE_DEFAULTS = {"cuda": dict(steps=1000, seq_len=1024, batch_size=8),
                   "cpu": dict(steps=100, seq_len=128, batch_size=4)}


def _device_default(name: str) -> str:
    return f"default {DEVICE_DEFAULTS['cuda'][name]} on CUDA, {DEVICE_DEFAULTS['cpu'][name]} on a CPU"


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be at least 1")
    run_demo(args.out, steps=args.steps, quiet=args.quiet)
    return 0


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def resolve_defaults(args: argparse.Namespace, device_type: str) -> None:
    """Fill the device-dependent defaults (steps, seq_len, batch_size) and check every size: all before
    anything is allocated."""
    for name, value in DEVICE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "grad_accum", "ep", "cp", "keep_checkpoints", "log_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    for name in ("save_every", "warmup_steps"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a token and its target), got {args.seq_len}")
    if args.cp > 1 and args.seq_len % (2 * args.cp):
        raise ValueError(f"--seq-len {args.seq_len} must be divisible by 2 * --cp = {2 * args.cp} (the zigzag's "
                         "chunks)")


def check_seq_len(args: argparse.Namespace, config, where: str) -> None:
    if args.seq_len > config.max_position_embeddings:
        fix = "" if args.init_from else f", or --set max_position_embeddings={args.seq_len}"
        raise ValueError(f"--seq-len {args.seq_len} exceeds the max_position_embeddings of {where} "
                         f"({config.max_position_embeddings}): use --seq-len {config.max_position_embeddings} or "
                         f"less{fix}")


def _texts(paths: list[str]) -> Iterator[str]:
    """The raw text of the training data, for training a tokenizer: text files whole, JSONL lines' 'text'
    and the messages' 'content' strings (lines that do not parse are left to the data reader to report)."""
    from .data import data_files

    for f in data_files(paths):
        if f.suffix not in (".jsonl", ".json"):
            yield f.read_text(encoding="utf-8", errors="replace")
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                yield obj["text"]
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                yield from (m["content"] for m in obj["messages"] if isinstance(m, dict)
                            and isinstance(m.get("content"), str))


def data_tokenizer(args: argparse.Namespace, vocab_size: int, ctx):
    """From scratch without --tokenizer: OUT/tokenizer, a byte-level BPE of `vocab_size` tokens trained on
    --data the way the demo trains its own (kept and reused by later runs into OUT, --resume included)."""
    from ..tokenizer import Tokenizer
    from .demo import train_tokenizer

    out = Path(args.out) / "tokenizer"
    if ctx.is_main and not (out / "tokenizer.json").exists():
        t0 = time.perf_counter()
        tok = train_tokenizer(list(_texts(args.data)), vocab_size, out)
        print(f"tokenizer: trained a {tok.vocab_size}-token byte-level BPE on --data in "
              f"{time.perf_counter() - t0:.1f}s -> {out}")
    ctx.barrier()
    return Tokenizer.from_pretrained(out)


def build_model(args: argparse.Namespace, ctx):
    """(model on the meta device, its init, tokenizer, fine-tuning?) from the command line; sizes are checked
    before anything is allocated. The Trainer fills each rank's shards through the init after sharding."""
    import dataclasses

    import torch

    from ..config import MiMoConfig
    from ..distributed.materialize import CheckpointInit, SeededInit
    from ..model import MiMoForCausalLM
    from ..tokenizer import Tokenizer

    overrides = _parse_overrides(args.set)
    if args.data_dir and not (args.tokenizer or args.init_from):
        raise ValueError("--data-dir needs the tokenizer it was written with: --tokenizer DIR (or --init-from)")
    if args.init_from:
        if overrides:
            raise ValueError("--set applies to --preset / --config, not to --init-from")
        init = CheckpointInit(args.init_from)
        config = init.config()
        check_seq_len(args, config, args.init_from)
        tok_dir = args.tokenizer or args.init_from
        tok = Tokenizer.from_pretrained(tok_dir)
        if tok.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer in {tok_dir} has {tok.vocab_size} tokens but the checkpoint's vocab_size "
                             f"is {config.vocab_size}: fine-tune with the checkpoint's own tokenizer")
    else:
        names = {f.name for f in dataclasses.fields(MiMoConfig)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"--set: unknown config fields {', '.join(bad)}")
        if args.preset:
            config = MiMoConfig.preset(args.preset, **overrides)
        else:
            config = MiMoConfig.from_pretrained(args.config).replace(**overrides)
            config.validate()
        check_seq_len(args, config, f"the {args.preset or args.config} model")
        if args.tokenizer:
            tok = Tokenizer.from_pretrained(args.tokenizer)
        else:
            tok = data_tokenizer(args, config.vocab_size, ctx)
            # the special tokens are the trained tokenizer's, unless --set says otherwise
            ids = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=None)
            config = config.replace(**{k: v for k, v in ids.items() if k not in overrides})
        if tok.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                             f"{config.vocab_size}: add --set vocab_size={tok.vocab_size}")
        init = SeededInit(args.seed)
    with torch.device("meta"):
        model = MiMoForCausalLM(config)  # fp32 master weights, allocated shard by shard by the Trainer
    if args.attention_backend:
        model.set_backends(attention=args.attention_backend)
    return model, init, tok, bool(args.init_from)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .data import load_rows
    from ..distributed import init_distributed
    from .tokens import TokenRows
    from .config import TrainConfig
    from .trainer import Trainer

    ctx = init_distributed(ep=args.ep, device=args.device, cp=args.cp)
    resolve_defaults(args, ctx.device.type)
    model, init, tok, finetune = build_model(args, ctx)
    t0 = time.perf_counter()
    if args.data_dir:
        rows = TokenRows(args.data_dir, args.seq_len, tok)
        what = f"{rows.header['num_tokens']:,} tokens memory-mapped from {args.data_dir}"
    else:
        rows = load_rows(args.data, tok, args.seq_len)
        what = f"{rows.target_tokens():,} training targets"
    if ctx.is_main:
        print(f"data: {len(rows)} rows of {rows.seq_len} tokens ({what}) "
              f"in {time.perf_counter() - t0:.1f}s; {model.num_parameters():,} parameters; "
              f"{ctx.world} process(es) on {ctx.device.type}" + (f", ep={ctx.ep}" if ctx.ep > 1 else "") +
              (f", cp={ctx.cp}" if ctx.cp > 1 else "") +
              f"; {args.steps} steps of {args.batch_size} x {args.grad_accum} x {ctx.dp_world} rows")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else (2e-5 if finetune else 3e-4), min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, mtp=not args.no_mtp, mtp_weight=args.mtp_weight,
        bias_update_rate=args.bias_update_rate if args.bias_update_rate is not None else (0.0 if finetune else 1e-3),
        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype, seed=args.seed,
        out_dir=args.out, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        progress=not args.no_progress, log_every=args.log_every, deterministic=args.deterministic)
    trainer = Trainer(model, rows, cfg, ctx, tokenizer=tok, init=init)
    hist = trainer.fit()
    final = trainer.export(Path(args.out) / "final", fp8=args.export_fp8)
    if ctx.is_main:
        if hist:
            print(f"loss {hist[0]['loss']:.4f} (step {hist[0]['step']}) -> {hist[-1]['loss']:.4f} "
                  f"(step {hist[-1]['step']})")
        print(trainer.load_summary())
        plot = getattr(trainer, "plot_path", None)
        print(f"final model (hub format, with tokenizer): {final}")
        print(f"metrics: {Path(args.out) / 'metrics.jsonl'}" + (f"; loss curve: {plot}" if plot else ""))
    return 0
