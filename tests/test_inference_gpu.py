"""On one GPU: the tensor-parallel path with tp=1 over a one-rank NCCL group (every collective runs,
vocabulary-parallel embedding / lm_head and the expert dispatcher included) gives the plain model's logits
and greedy tokens, eagerly and with the decode steps captured in CUDA graphs (NCCL all-reduce inside).

Run: `.venv/bin/python -m pytest tests/test_inference_gpu.py -m gpu -q`"""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tp1_path_on_one_gpu_matches_plain_model():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mimo_flash import MiMoConfig, MiMoForCausalLM
    from mimo_flash.distributed import parallelize_for_inference

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        m = MiMoForCausalLM(MiMoConfig.preset("mini", num_hidden_layers=4, num_nextn_predict_layers=2)).to("cuda", torch.bfloat16).eval()
        ids = torch.randint(0, m.config.vocab_size, (2, 300), device="cuda")
        mask = torch.ones_like(ids)
        mask[1, :100] = 0
        def outputs():
            with torch.no_grad():
                return {"logits": m(ids, attention_mask=mask).logits,
                        "eager": m.generate(ids, attention_mask=mask, max_new_tokens=24, cuda_graphs=False),
                        "graphed": m.generate(ids, attention_mask=mask, max_new_tokens=24, cuda_graphs=True),
                        "spec": m.generate(ids[:1], max_new_tokens=24, num_speculative_tokens=2, cuda_graphs=True)}

        ref = outputs()
        parallelize_for_inference(m, 1, 1, init_device_mesh("cuda", (1, 1), mesh_dim_names=("ep", "tp")))
        assert type(m.lm_head).__name__ == "VocabParallelHead"  # the parallel modules are in place
        got = outputs()
        # one rank: every collective is an identity, so each path computes what the plain model's does
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
    finally:
        dist.destroy_process_group()
