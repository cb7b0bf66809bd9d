"""`mimo-flash serve`: an OpenAI-compatible server for a checkpoint directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..cli import finite_float
    from ..generation.commands import add_decode_flags, add_fp8_flag, add_parallel_options

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model name clients send (default: the directory's name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--max-slots", type=int, default=16, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-context", type=int, default=8192,
                   help="longest prompt + output per request: the KV cache holds max-slots rows of this many "
                        "positions (capped at the model's max_position_embeddings)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per scheduler step (also the prefix cache's block)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="prompt tokens prefilled per step over all slots, batched into one forward per chunk "
                        "length (default max(4096, prefill-chunk))")
    p.add_argument("--admit-wait", type=finite_float, default=0.005,
                   help="seconds: while requests are decoding, new ones join in groups once the oldest has "
                        "waited this long or they fill the free slots (fewer prefill forwards between decode "
                        "steps; TTFT grows by this at most); 0: admit at every step")
    p.add_argument("--prefix-blocks", type=int, default=64, help="prefix-cache blocks kept (0: off)")
    p.add_argument("--speculative", default="0", metavar="K|auto",
                   help="MTP speculative decoding for requests without repetition penalty or logprobs (greedy "
                        "or sampled): K drafts per step from the model's first K MTP layers, verified in one forward "
                        "(0: off; at most the model's MTP layers); 'auto': 0 .. min(3, MTP layers) drafts, chosen "
                        "every step from the measured acceptance and step times (never slower than plain once "
                        "measured). Their prompts reuse prefix-cache blocks only up to K x sliding_window tokens "
                        "before their end (the MTP layers are primed there)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--request-timeout", type=finite_float, default=600.0, help="seconds a request may run")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the CUDA-graph decode steps (generate --compile's); the start-up warm-up then "
                        "compiles one step per batch-size bucket and cache bucket (minutes each on large models: "
                        "bound them with --max-slots and --max-context)")
    p.add_argument("--graph-prefill", action="store_true",
                   help="prefill chunks through CUDA graphs of eager code (padded to a power of two >= 16 tokens, a "
                        "graph per row block and length captured on first use): an eager forward's tens of ms of host "
                        "time each become a replay; matches the eager prefill up to rounding")
    p.add_argument("--no-overlap", action="store_true",
                   help="take each greedy decode step's tokens before launching the next (default: the next step is "
                        "launched first, and the host's output work overlaps the GPU's)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model's arithmetic on a CPU device (default: every core this "
                        "process may use but one, at least 1: the HTTP side and the clients get the last core "
                        "instead of preempting the threads of every step)")
    add_parallel_options(p)
    add_fp8_flag(p)
    add_decode_flags(p)
    p.set_defaults(fn=cmd_serve)


def cpu_threads(asked: int | None) -> int:
    """Threads for the scheduler's forwards on a CPU: `asked`, or every core this process may use but one.
    A step's threads meet at a barrier after every op; while the event loop or a client on the same cores
    preempts one of them, the others wait (measured: docs/BENCHMARKS.md, serving on the CPU)."""
    from ..cli import UserError

    if asked is not None:
        if asked < 1:
            raise UserError(f"--threads must be >= 1, got {asked}")
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def cmd_serve(args) -> int:
    from ..cli import UserError
    from ..generation.commands import load, speculative_k
    from .scheduler import Scheduler

    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    threads = cpu_threads(args.threads)
    spec_k = speculative_k(args.speculative)
    model, tok = load(args)
    if model.device.type == "cpu":
        import torch
        torch.set_num_threads(threads)
    n_mtp = model.config.num_nextn_predict_layers
    if spec_k == "auto" and not n_mtp or spec_k != "auto" and spec_k > n_mtp:
        raise UserError(f"--speculative {spec_k}: drafts come from the MTP layers, and the model has "
                        f"{n_mtp} MTP layers; use 0 (off) .. {n_mtp}" + (" or auto" if n_mtp else ""))
    name = args.name or Path(args.model).resolve().name
    try:
        sched = Scheduler(model, tok, max_slots=args.max_slots,
                          max_context=min(args.max_context, model.config.max_position_embeddings),
                          max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, prefix_blocks=args.prefix_blocks,
                          cuda_graphs=False if args.no_cuda_graphs else "auto", prefill_tokens=args.prefill_tokens,
                          admit_wait=args.admit_wait, speculative_k=spec_k,
                          overlap=not args.no_overlap, compile=args.compile, graph_prefill=args.graph_prefill)
    except ValueError as e:
        raise UserError(str(e)) from None
    if model.device.type == "cuda":
        print(f"{'compiling and ' if args.compile else ''}capturing decode{' and prefill' if args.graph_prefill else ''} "
              f"graphs for {args.max_slots} slots...", file=sys.stderr, flush=True)
        print(f"  done in {sched.warmup():.1f} s", file=sys.stderr, flush=True)
    if model.parallel is not None:  # rank 0 serves; the others step their replicas with it (scheduler.py)
        from ..distributed.steps import StepBroadcaster
        from ..generation.commands import leader
        steps = StepBroadcaster(sched.follow_step)
        if not leader():
            steps.follow()
            return 0
        sched.broadcaster = steps
    sched.start()
    spec = ("" if not spec_k else f", MTP speculation with {sched.spec.K} drafts" if spec_k != "auto" else
            f", MTP speculation with 0 .. {sched.spec.K} drafts chosen per step")
    banner = (f"serving {name!r} on http://{args.host}:{args.port}/v1 with {args.max_slots} slots{spec} "
              "(Ctrl-C stops)")
    try:
        code = serve_http(sched, args, name, banner)
    except SystemExit as e:  # SIGTERM (serve_http's handler)
        code = e.code
    finally:
        sched.stop()
        if sched.broadcaster is not None:
            sched.broadcaster.stop()
    # Everything this process started has ended: the HTTP process, the scheduler's thread, and the pipe's threads
    # with the pipe. The process exits without the interpreter's finalization, which had aborted it ("terminate
    # called without an active exception", exit -6 instead of SIGTERM's 143) in two of three full test runs
    # on a 2-core machine, never alone: the pattern of a daemon thread stopped inside a C++ call at finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_http(sched, args, name: str, banner: str) -> int:
    """The HTTP side in a process of its own (serving/remote.py) until it exits; SIGTERM and Ctrl-C end it.
    -> its exit code (uvicorn's 1 when it could not bind the port, say)."""
    import multiprocessing
    import signal

    from .remote import EngineLink, http_main

    ctx = multiprocessing.get_context("spawn")  # (a fork would copy the scheduler's threads' locks)
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=http_main, name="mimo-flash-http", daemon=True,
                       args=(theirs, str(Path(args.model)), name, args.host, args.port, sched.S, sched.vocab_size,
                             args.max_tokens_limit, args.request_timeout, banner))
    link = EngineLink(sched, ours).start()
    proc.start()
    theirs.close()

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        while proc.is_alive() and not link.closed.wait(0.5):
            pass
        proc.join(5)
        return 0 if proc.exitcode in (0, None, -signal.SIGINT) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        ours.close()
