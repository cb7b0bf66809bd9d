"""`mimo-flash demo` and `mimo-flash train`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
                                   "Under torchrun the model is sharded with FSDP2 and, with --ep N, the experts "
                                   "are split over N ranks.")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="train from scratch: a preset (tiny, mini, flash)")
    src.add_argument("--config", help="train from scratch: a config.json")
    src.add_argument("--init-from", help="fine-tune: a hub-format checkpoint directory (weights, config, tokenizer)")
    t.add_argument("--data", nargs="+", required=True,
                   help="text files, JSONL files ({'text'} or chat {'messages'}) or directories of them")
    t.add_argument("--tokenizer", help="directory with tokenizer.json (default: the --init-from checkpoint's)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for --preset / --config, e.g. vocab_size=4096 (JSON values)")
    t.add_argument("--out", default="runs/train", help="run directory: checkpoints, metrics, plot, final model")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=finite_float, default=None, help="peak LR (default 3e-4 from scratch, 2e-5 fine-tuning)")
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
    t.add_argument("--attention-backend", help="attention backend (default auto)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)


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


def build_model(args: argparse.Namespace):
    """(model on the CPU in fp32, tokenizer, fine-tuning?) from the command line."""
    import dataclasses

    import torch

    from ..config import MiMoConfig
    from ..model import MiMoForCausalLM
    from ..tokenizer import Tokenizer

    overrides = _parse_overrides(args.set)
    if args.init_from:
        if overrides:
            raise ValueError("--set applies to --preset / --config, not to --init-from")
        model = MiMoForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        tok_dir = args.tokenizer or args.init_from
        finetune = True
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
        if not args.tokenizer:
            raise ValueError("training from scratch needs --tokenizer (a directory with tokenizer.json)")
        tok_dir = args.tokenizer
        torch.manual_seed(args.seed)
        model = MiMoForCausalLM(config)
        finetune = False
    tok = Tokenizer.from_pretrained(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    if args.attention_backend:
        model.set_backends(attention=args.attention_backend)
    return model, tok, finetune


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .data import load_rows
    from .parallel import init_distributed
    from .trainer import TrainConfig, Trainer

    ctx = init_distributed(ep=args.ep, device=args.device)
    model, tok, finetune = build_model(args)
    t0 = time.perf_counter()
    rows = load_rows(args.data, tok, args.seq_len)
    if ctx.is_main:
        print(f"data: {len(rows)} rows of {rows.seq_len} tokens ({rows.target_tokens():,} training targets) "
              f"in {time.perf_counter() - t0:.1f}s; {model.num_parameters():,} parameters; "
              f"{ctx.world} process(es) on {ctx.device.type}" + (f", ep={ctx.ep}" if ctx.ep > 1 else ""))
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else (2e-5 if finetune else 3e-4), min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, mtp=not args.no_mtp, mtp_weight=args.mtp_weight,
        bias_update_rate=args.bias_update_rate if args.bias_update_rate is not None else (0.0 if finetune else 1e-3),
        activation_checkpointing=args.activation_checkpointing, dtype=args.dtype, seed=args.seed,
        out_dir=args.out, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        progress=not args.no_progress, deterministic=args.deterministic)
    trainer = Trainer(model, rows, cfg, ctx, tokenizer=tok)
    hist = trainer.fit()
    final = trainer.export(Path(args.out) / "final")
    if ctx.is_main:
        if hist:
            print(f"loss {hist[0]['loss']:.4f} (step {hist[0]['step']}) -> {hist[-1]['loss']:.4f} "
                  f"(step {hist[-1]['step']})")
        print(trainer.load_summary())
        plot = getattr(trainer, "plot_path", None)
        print(f"final model (hub format, with tokenizer): {final}")
        print(f"metrics: {Path(args.out) / 'metrics.jsonl'}" + (f"; loss curve: {plot}" if plot else ""))
    if ctx.distributed:
        torch.distributed.destroy_process_group()
    return 0
