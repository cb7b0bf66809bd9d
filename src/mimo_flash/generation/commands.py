"""`mimo-flash generate` and `mimo-flash chat`: load a checkpoint directory and stream text."""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

from ..cli import finite_float

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def _user_error(msg: str):
    from ..cli import UserError
    return UserError(msg)


def parse_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise _user_error(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise _user_error(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise _user_error(f"device {name!r} requested but CUDA is not available here")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise _user_error(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def parse_dtype(name: str, device: torch.device):
    if name not in DTYPES:
        raise _user_error(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    dt = DTYPES[name]
    if dt is None:  # auto: bf16 on GPU, fp32 on CPU
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dt


def speculative_k(text: str):
    """--speculative: an integer >= 0 or 'auto'."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise _user_error(f"--speculative must be an integer >= 0 or 'auto', got {text!r}")
    return k


def _add_common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=finite_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=finite_float, default=None, help="nucleus sampling (default: off)")
    p.add_argument("--top-k", type=int, default=None, help="default: off")
    p.add_argument("--min-p", type=finite_float, default=None, help="default: off")
    p.add_argument("--repetition-penalty", type=finite_float, default=None, help="default: off")
    p.add_argument("--speculative", default="0", metavar="K",
                   help="draft K tokens per step with the MTP layers (0 = off); 'auto': up to 3, chosen per step "
                        "from the measured acceptance and step times (never slower than plain)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the CUDA-graph decode steps")
    add_parallel_options(p)
    add_fp8_flag(p)
    add_decode_flags(p)


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    from ..generation.attention import CACHE_ATTENTION
    from ..ops.moe import DECODE_EXPERTS

    p.add_argument("--decode-experts", default=None, choices=DECODE_EXPERTS,
                   help="the routed experts of batched decode steps (options().decode_experts): routed (the "
                        "default: each expert on the tokens that chose it, in three Triton kernels), fused (every "
                        "expert on every token in two Triton kernels, no per-expert outputs, experts no token chose "
                        "skipped), dense (the same through cuBLAS), grouped_mm or triton (the token-expert pairs "
                        "sorted on the device, one grouped product per projection)")
    p.add_argument("--cache-attention", default=None, choices=CACHE_ATTENTION,
                   help="attention over the KV cache in decode steps (options().cache_attention): auto (the "
                        "default: triton for verification steps of several tokens a row and for one-token steps of 32 "
                        "rows or more, torch for smaller one-token steps), torch, or triton (CUDA: each row reads its "
                        "keys up to its own position; graphs of several rows need no cache-length bucket)")


def add_fp8_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp8", action="store_true", help="keep the weights the release quantizes in FP8 with their "
                   "128x128 block scales (a float checkpoint is quantized on load); on CPU they are dequantized "
                   "per use")


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch tp x ep processes with torchrun)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt, streaming the text")
    _add_common(p, temperature=0.0)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    p.set_defaults(fn=cmd_generate)
    c = subparsers.add_parser("chat", help="interactive multi-turn chat through the checkpoint's chat template")
    _add_common(c, temperature=0.0)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(fn=cmd_chat)
    b = subparsers.add_parser("kv-cache", help="KV-cache bytes per sequence: sliding-window rings vs all-global")
    b.add_argument("--preset", default="flash", help="config preset (flash, mini, tiny) unless --model is given")
    b.add_argument("--model", default=None,
                   help="checkpoint directory whose config.json to use (default: the --preset)")
    b.add_argument("--context", type=int, nargs="+", default=[4096, 32768, 262144])
    b.add_argument("--dtype", default="bfloat16")
    b.set_defaults(fn=cmd_kv_cache)


def cmd_kv_cache(args) -> int:
    from ..config import MiMoConfig
    from .cache import format_bytes_report

    config = MiMoConfig.from_pretrained(args.model) if args.model else MiMoConfig.preset(args.preset)
    dtype = parse_dtype(args.dtype, torch.device("cpu"))
    if any(c < 1 for c in args.context):
        raise _user_error("--context values must be >= 1")
    print(format_bytes_report(config, args.context, dtype, name=args.model or args.preset))
    return 0


def load(args):
    """-> (model, tokenizer) from args.model / device / dtype, with clear errors."""
    from ..model import MiMoForCausalLM
    from ..tokenizer import Tokenizer

    root = Path(args.model)
    if not root.is_dir():
        raise _user_error(f"model directory {root} does not exist")
    if not (root / "config.json").exists():
        raise _user_error(f"{root} has no config.json: not a checkpoint directory")
    if not (root / "tokenizer.json").exists():
        raise _user_error(f"{root} has no tokenizer.json; copy the checkpoint's tokenizer files "
                          "(tokenizer.json, tokenizer_config.json) into it")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    chosen = {k: v for k, v in (("decode_experts", args.decode_experts), ("cache_attention", args.cache_attention))
              if v is not None}
    if chosen:  # (before any step is traced or captured)
        from ..options import set_options
        set_options(**chosen)
    tok = Tokenizer(root)
    tp, ep = args.tp, args.ep
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's
    if tp < 1 or ep < 1 or world != tp * ep:
        raise _user_error(f"{world} process(es) run, but --tp {tp} x --ep {ep} = {tp * ep}: launch tp x ep "
                          "processes (`torchrun --nproc-per-node N -m mimo_flash.cli ... --tp N`)")
    if world > 1:  # this rank's share; "auto": this rank's GPU
        model = MiMoForCausalLM.from_pretrained(root, dtype=dtype, tp=tp, ep=ep, fp8=args.fp8,
                                                device=None if args.device == "auto" else device).eval()
    else:
        model = MiMoForCausalLM.from_pretrained(root, dtype=dtype, device=device, fp8=args.fp8).eval()
    if tok.vocab_size > model.config.vocab_size and leader():
        print(f"warning: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}", file=sys.stderr)
    return model, tok


def leader() -> bool:
    """Whether this process prints (rank 0 of a torchrun launch, or the only process)."""
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def shared(obj):
    """rank 0's `obj` on every rank (as is in one process): what the others must agree on."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gen_kwargs(args, tok) -> dict:
    if args.max_new_tokens < 1:
        raise _user_error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from .sampling import SamplingParams

    try:
        p = SamplingParams.from_request(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    except ValueError as e:
        flag = str(e).split("=", 1)[0].replace("_", "-")
        raise _user_error(f"--{flag}: {e}") from None
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
              top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
              num_speculative_tokens=speculative_k(args.speculative), seed=args.seed, compile=args.compile)
    if tok.eos_token_ids:
        kw["eos_token_id"] = tok.eos_token_ids
    if tok.pad_token_id is not None:
        kw["pad_token_id"] = tok.pad_token_id
    return kw


def _run(model, tok, text: str, args, write) -> tuple[str, object]:
    from .engine import generate
    from .streamer import TextStreamer

    ids = tok.encode(text)
    if not ids:
        raise _user_error("empty prompt: it encodes to no tokens")
    kw = _gen_kwargs(args, tok)
    streamer = TextStreamer(tok, write=write, stop_strings=args.stop)
    _, stats = generate(model, torch.tensor([ids]), streamer=streamer, stopping=streamer if args.stop else None,
                        return_stats=True, **kw)
    return streamer.text, stats


def _stdout(s: str) -> None:
    if leader():
        sys.stdout.write(s)
        sys.stdout.flush()


def _shared_seed(args, model) -> None:
    """A parallel model's ranks must sample alike: rank 0's seed (drawn when none was given) on every rank."""
    if model.parallel is not None:
        args.seed = shared(args.seed if args.seed is not None else random.randrange(2 ** 31))


def cmd_generate(args) -> int:
    if not args.prompt:
        raise _user_error("empty prompt: --prompt is ''")
    model, tok = load(args)
    _shared_seed(args, model)
    text = args.prompt
    if args.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    _, stats = _run(model, tok, text, args, _stdout)
    if not leader():
        return 0
    print()
    k = speculative_k(args.speculative)
    if k == "auto":
        spec = sum(1 for k in stats.spec_k if k)
        print(f"[speculative auto: {spec} of {len(stats.spec_k)} steps drafted (mean k "
              f"{sum(stats.spec_k) / max(1, spec):.2f}); acceptance length {stats.acceptance_length:.2f} "
              f"tokens/step]", file=sys.stderr)
    elif k:
        print(f"[speculative K={k}: acceptance length {stats.acceptance_length:.2f} "
              f"tokens/step]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    model, tok = load(args)
    _shared_seed(args, model)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    start = len(messages)
    if leader():
        print("chat with the model; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    seeds = random.Random(args.seed)
    while True:
        line = "/exit"
        if leader():  # the other ranks of a parallel model take rank 0's line
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                pass
        line = shared(line).strip()
        if model.parallel is not None:  # its ranks sample alike: a seed per turn, the same on every rank
            args.seed = seeds.randrange(2 ** 31)
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            del messages[start:]
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        reply, _ = _run(model, tok, prompt, args, _stdout)
        _stdout("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0
