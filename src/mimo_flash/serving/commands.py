"""`mimo-flash serve`: an OpenAI-compatible server for a checkpoint directory."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..generation.commands import add_parallel_options

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model name clients send (default: the directory's name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--speculative", type=int, default=0, metavar="K", help="MTP draft tokens per step by default")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    add_parallel_options(p)
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> int:
    from ..cli import UserError
    from ..generation.commands import load
    from .server import Engine, make_server

    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    model, tok = load(args)
    if not 0 <= args.speculative <= model.config.num_nextn_predict_layers:
        raise UserError(f"--speculative must be in 0..{model.config.num_nextn_predict_layers}")
    name = args.name or Path(args.model).resolve().name
    engine = Engine(model, tok, name, speculative=args.speculative, max_tokens_limit=args.max_tokens_limit)
    if model.parallel is not None:  # rank 0 serves; the others run each request's generate with it
        from ..distributed.steps import StepBroadcaster
        from ..generation.commands import leader
        steps = StepBroadcaster(lambda text, params: engine.run(text, params))
        if not leader():
            steps.follow()
            return 0
        engine.steps = steps
    try:
        server = make_server(engine, args.host, args.port)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = server.server_address[:2]
    print(f"serving {name!r} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if engine.steps is not None:
            engine.steps.stop()
    return 0
