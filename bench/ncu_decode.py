"""One batch-1 Triton decode step of the mini preset, for a kernel profiler (Nsight Compute):

    ncu -k regex:"attn|router|gate_up|down|gemv" --launch-skip 80 --launch-count 12 \
        --metrics gpu__time_duration.sum,... python3 bench/ncu_decode.py

Random bf16 weights, a 512-token prompt prefilled eagerly, then 3 steps of TritonStep without PDL
(kernel times do not overlap)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mimo_flash import MiMoConfig, MiMoForCausalLM  # noqa: E402
from mimo_flash.generation import KVCache  # noqa: E402
from mimo_flash.generation.engine import prefill  # noqa: E402
from mimo_flash.generation.runner import Runner, prepare_fused  # noqa: E402
from mimo_flash.generation.triton_step import TritonStep  # noqa: E402

torch.manual_seed(0)
config = MiMoConfig.preset("mini", torch_dtype="bfloat16")
with torch.device("cuda"):
    model = MiMoForCausalLM(config)
model = model.to(torch.bfloat16).eval()
prepare_fused(model)
P, S = 512, 832
runner = Runner(model, KVCache(config, 1, S, device="cuda", dtype=torch.bfloat16), S)
ids = torch.randint(0, config.vocab_size, (1, P), device="cuda")
with torch.no_grad():
    logits, _ = prefill(runner, ids, None, 512, keep_hidden=False)
    step = TritonStep(model, runner.cache, runner.rope_tables, pdl=False)
    tok = logits.argmax(-1)[:, None]
    for i in range(3):
        step(tok, torch.full((1, 1), P + i, device="cuda", dtype=torch.long), S)
        tok = step.token[:, None].clone()
    torch.cuda.synchronize()
print("ok")
