"""The synthetic checkpoint source (checkpoint.synthetic.SyntheticCheckpoint) under tensor x expert parallel
loading, and bench/full_size.py's CPU check, on CPU with gloo.

Two ranks (TP=2, and TP=1 x EP=2) load FP8-resident from the unwritten synthetic checkpoint: each holds exactly
the tensors it gets from the written one (write_synthetic_checkpoint, same seed), the sharded model gives the
single-process model's logits, each rank's experts are 1/2 of the model's, and under EP each rank's reader
generates only its own experts (plus the tensors every rank shares). A config whose heads and intermediate
shares are whole 128x128 blocks (test_inference_fp8.ALIGNED): nothing is requantized, so logits agree to fp32
rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from harness import SRC, free_port, needs_peak_rss, run_python, run_ranks
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import SyntheticCheckpoint, load_pretrained, write_synthetic_checkpoint
from mimo_flash.checkpoint.names import expert_index
from mimo_flash.quant.blocks import FP8
from test_inference_fp8 import ALIGNED, VOCAB

BENCH = SRC.parent / "bench" / "full_size.py"
TOL = 1e-5
SEED = 4
KPROJ_EXTRA = (1, 0)  # the release's k_proj scale trap, in both


def _config() -> MiMoConfig:
    return MiMoConfig.preset("tiny", **ALIGNED)


def _ids():
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _rank(rank: int, world: int, tp: int, ep: int, path: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from mimo_flash.distributed import load_parallel

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (ep, tp), mesh_dim_names=("ep", "tp"))
    kw = dict(tp=tp, ep=ep, dtype=torch.float32, fp8=True, mesh=mesh, progress=False)
    reader = SyntheticCheckpoint(_config(), seed=SEED, kproj_extra_scale=KPROJ_EXTRA).open_reader()
    mine = load_parallel(reader, **kw)
    from_file = load_parallel(path, **kw)
    a, b = mine.state_dict(), from_file.state_dict()
    assert list(a) == list(b)
    with torch.no_grad():
        logits = mine(_ids()).logits
    experts = {n: t.numel() * t.element_size() for n, t in a.items() if ".mlp.experts." in n}
    return dict(differs=[n for n in a if a[n].dtype != b[n].dtype or not torch.equal(_bits(a[n]), _bits(b[n]))],
                logits=logits.numpy(), experts=experts, generated=reader.generated_bytes,
                infos={k: (i.nbytes, expert_index(k)) for k, i in reader.infos.items()},
                fp8=sorted(n for n, t in a.items() if t.dtype == FP8))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("full_size") / "ckpt"
    write_synthetic_checkpoint(path, _config(), seed=SEED, kproj_extra_scale=KPROJ_EXTRA, max_shard_size="300KB")
    return str(path)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
@pytest.mark.filterwarnings("ignore::mimo_flash.checkpoint.CheckpointWarning")  # the k_proj trap's warning
def test_synthetic_source_loads_sharded_like_the_written_checkpoint(tp, ep, written):
    one = load_pretrained(written, dtype=torch.float32, fp8=True, progress=False)
    with torch.no_grad():
        ref = one(_ids()).logits
    whole_experts = {n: t.numel() * t.element_size() for n, t in one.state_dict().items() if ".mlp.experts." in n}
    results = run_ranks(_rank, 2, tp, ep, written, timeout=300)
    E = _config().n_routed_experts
    for rank, res in enumerate(results):
        assert res["differs"] == [], (rank, res["differs"])  # the very bytes of the written checkpoint's shards
        assert res["fp8"], rank  # FP8-resident
        assert (torch.from_numpy(res["logits"]) - ref).abs().max().item() <= TOL, rank
        # no whole model: every expert tensor (FP8 bytes and scales) is exactly half of the single process's
        assert res["experts"].keys() == whole_experts.keys()
        for name, n in res["experts"].items():
            assert 2 * n == whole_experts[name], (rank, name, n, whole_experts[name])
        total = sum(n for n, _ in res["infos"].values())
        if ep == 2:  # the reader generated this rank's experts and the shared tensors, nothing else
            want = sum(n for n, e in res["infos"].values() if e is None or rank * E // 2 <= e < (rank + 1) * E // 2)
            assert res["generated"] == want < total, (rank, res["generated"], want, total)
        else:  # TP: every tensor generated (whole, one at a time), each once
            assert res["generated"] == total, (rank, res["generated"], total)


def test_synthetic_reader_serves_the_written_files(written):
    """Names, dtypes, shapes and values, tensor by tensor; one tensor (and its scale) cached at a time."""
    from mimo_flash.checkpoint import CheckpointReader

    with CheckpointReader(written) as files, \
            SyntheticCheckpoint(_config(), seed=SEED, kproj_extra_scale=KPROJ_EXTRA).open_reader() as gen:
        assert files.keys() == gen.keys()
        assert files.config()[0] == gen.config()[0]
        for k in sorted(files.keys()):
            f, g = files.info(k), gen.info(k)
            assert (f.dtype, f.shape, f.nbytes) == (g.dtype, g.shape, g.nbytes), k
            assert torch.equal(_bits(files.get(k)), _bits(gen.get(k))), k
            assert set(gen._cache) <= {k.removesuffix("_scale_inv"), k.removesuffix("_scale_inv") + "_scale_inv"}


def test_generation_does_not_depend_on_threads():
    from mimo_flash.checkpoint.synthetic import PARALLEL_MIN, synthetic_fp8, synthetic_tensor

    shape = (PARALLEL_MIN // 256 + 130, 256)  # several stripes, the last one partial; above the threading cut
    for threads in (1, 3):
        q, s = synthetic_fp8("model.layers.1.mlp.experts.3.up_proj.weight", shape, (128, 128), seed=2,
                             threads=threads)
        w = synthetic_tensor("lm_head.weight", shape, torch.bfloat16, seed=2, threads=threads)
        if threads == 1:
            ref = (q.view(torch.uint8).clone(), s.clone(), w.clone())
        else:
            assert torch.equal(q.view(torch.uint8), ref[0]) and torch.equal(s, ref[1]) and torch.equal(w, ref[2])
    assert 0.015 < w.float().std().item() < 0.025  # ~N(0, 0.02^2)
    assert not torch.equal(w[:128], w[128:256])  # stripes are not copies of each other


def _tables(text: str) -> dict[str, list[list[str]]]:
    """The markdown tables bench/common.table printed: title -> rows of cells (header row first)."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            out[title] = []
        elif title and line.startswith("|") and not line.startswith("|-"):
            out[title].append([c.strip() for c in line.strip("|").split("|")])
    return out


def _bench(*argv: str, nproc: int = 0) -> str:
    """Run bench/full_size.py (under torchrun with `nproc` processes when nproc > 0) -> its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    run = subprocess.run([sys.executable, *(launch if nproc else []), str(BENCH), *argv], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _check_tables(text: str, ranks: int, batches: list[int], prompts: list[int], K: int, ttft: list[int],
                  capped: bool) -> None:
    """Every table and every row the bench promises, with positive numbers."""
    t = _tables(text)
    assert set(t) == {"load", "memory per GPU", "decode", "TTFT", "largest context at batch 1"}, text[-3000:]
    num = float  # a cell that is not a number fails the test
    load = t["load"][1:]
    assert [r[0] for r in load] == [str(r) for r in range(ranks)]  # every rank's row, gathered to rank 0
    for r in load:
        assert num(r[1]) > 0 and num(r[3]) > 0 and num(r[4]) > 0
        assert num(r[4]) == pytest.approx(num(load[0][4]))  # every rank holds the same share
    mem = t["memory per GPU"][1:]
    assert [r[0] for r in mem] == [str(r) for r in range(ranks)]
    assert all(num(r[1]) > 0 and num(r[3]) > 0 and num(r[5]) >= num(r[3]) for r in mem)
    decode = t["decode"][1:]
    assert [(r[0], r[1], r[2]) for r in decode] == [(str(b), str(p), str(k)) for b in batches for p in prompts
                                                    for k in (0, K)]
    for r in decode:
        assert num(r[3]) > 0 and num(r[4]) > 0 and num(r[5]) >= 1.0, r
        if r[2] != "0":
            assert num(r[6]) > 0, r  # break-even acceptance length
    rows = t["TTFT"][1:]
    assert [r[0] for r in rows] == [str(p) for p in ttft] and all(num(r[1]) > 0 and num(r[2]) > 0 for r in rows)
    (ctx,) = t["largest context at batch 1"][1:]
    assert int(ctx[0]) > max(ttft) and (ctx[2] == "yes") == capped, ctx
    assert [num(b) > 0 for b in ctx[1].split()] == [True] * ranks


def test_bench_cpu_check_runs_under_torchrun():
    out = _bench("--cpu-check", "--tp", "1", "--ep", "2", "--gen-threads", "1", nproc=2)
    # bench CPU_CHECK: batch 1 2, prompt 16 40, K 0 and 3 (the tiny preset's 3 MTP layers), TTFT 24 48; the host
    # has room for the tiny preset's whole max_position_embeddings
    _check_tables(out, 2, [1, 2], [16, 40], 3, [24, 48], capped=True)
    (ctx,) = _tables(out)["largest context at batch 1"][1:]
    assert int(ctx[0]) == MiMoConfig.preset("tiny").max_position_embeddings


@pytest.mark.gpu
def test_bench_on_one_gpu_with_the_released_dims_cut_to_two_layers():
    """What a session with one H200 runs: the released dimensions (2 layers + 3 MTP layers, FP8) built from the
    synthetic source on the GPU, every measurement at small sizes."""
    out = _bench("--layers", "2", "--batch", "1", "4", "--prompt", "256", "--new", "8", "--ttft", "512", "2048")
    _check_tables(out, 1, [1, 4], [256], 3, [512, 2048], capped=True)  # 262144 positions fit beside 2 layers


PEAK_CHILD = r"""
import json, torch, torch.distributed as dist
from harness import peak_rss_growth
from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.checkpoint import SyntheticCheckpoint
from mimo_flash.distributed import leave_distributed, load_parallel

torch.set_num_threads(1)
dist.init_process_group("gloo")
kw = dict(tp=1, ep=2, dtype=torch.bfloat16, fp8=True, progress=False)
load_parallel(SyntheticCheckpoint(MiMoConfig.preset("tiny")), **kw)  # warm up: imports, first use
config = MiMoConfig.preset("tiny", vocab_size=8192, hidden_size=512, intermediate_size=1024, n_routed_experts=32,
                           moe_intermediate_size=512, num_nextn_predict_layers=1)
model, extra = peak_rss_growth(load_parallel, SyntheticCheckpoint(config), **kw)
sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
print(json.dumps({"rank": dist.get_rank(), "extra": extra, "local": sum(sizes), "largest": max(sizes)}))
leave_distributed()
"""
MB = 1 << 20


@needs_peak_rss
def test_each_rank_holds_its_share_plus_one_generated_tensor(tmp_path):
    """Two ranks (EP=2) load FP8-resident from the synthetic source: each one's peak host memory rises by its
    share plus about one generated tensor (the largest: an fp32 stripe buffer aside, the tensor itself), well
    under the whole model."""
    from mimo_flash.quant import quantize_model_

    config = MiMoConfig.preset("tiny", vocab_size=8192, hidden_size=512, intermediate_size=1024, n_routed_experts=32,
                               moe_intermediate_size=512, num_nextn_predict_layers=1)
    with torch.device("meta"):
        whole = MiMoForCausalLM(config).to(torch.bfloat16)
    quantize_model_(whole)
    full = sum(t.numel() * t.element_size() for t in whole.state_dict().values())
    (tmp_path / "child.py").write_text(PEAK_CHILD)
    results = run_python("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                         str(tmp_path / "child.py"))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert full > 40 * MB  # a second copy of the model, or of half of it, would show
    for r in results:
        shown = {k: round(v / MB, 1) for k, v in {**r, "full": full}.items()}
        assert r["local"] < 0.6 * full, shown  # about half: its experts, the rest whole
        assert r["local"] < r["extra"] < r["local"] + r["largest"] + 16 * MB, shown
        assert r["extra"] < 0.75 * full, shown
