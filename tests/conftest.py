"""Shared fixtures: small models with every parameter non-trivial, and the transformers oracle."""

from __future__ import annotations

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_in_triton_interpreter(script: str) -> None:
    """Run `script` in a fresh Python with the package importable; it must print 'ok' last.
    Skips where triton is not installed (the CPU venv); the script sets TRITON_INTERPRET itself."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    # one torch thread: the interpreter runs on one anyway, and on the CI machine's CPU a fresh process's first
    # parallel torch.exp was now and then 1e-4 off in its worker thread (test_ops_kernels.py's banded SWA test)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def randomize(model: MiMoForCausalLM, seed: int = 0) -> MiMoForCausalLM:
    """Make sinks, correction biases and norm weights non-trivial (they start at 0/0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("attention_sink_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 1.5)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    return model


def tiny_model(seed: int = 0, **overrides) -> MiMoForCausalLM:
    torch.manual_seed(seed)
    config = MiMoConfig.preset("tiny", **overrides)
    return randomize(MiMoForCausalLM(config), seed).eval()


def transformers_twin(model: MiMoForCausalLM, tmp_path):
    """The same weights in transformers' MiMoV2FlashForCausalLM (through our hub-format save)."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "twin"
    model.save_pretrained(path)
    tf = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tf.eval()


@pytest.fixture(autouse=True)
def graph_outputs_expire(monkeypatch) -> None:
    """Every test: on the CPU a GraphRunner's graph outputs live only as long as on CUDA. Each graph (a run_step,
    or a main / MTP step that _run_once would replay) returns persistent buffers of its own, and every later
    graph fills every other graph's buffers with garbage (NaN, 10**9 for integers). On CUDA the graphs share one
    memory pool and replay in any order, so a replay may overwrite the outputs of a graph captured after it
    (GraphRunner._replay): code that reads an output after another graph ran reads garbage here too, every time
    rather than now and then. (Adaptive K read a speculative graph's N after plain graphs ran: wrong tokens and
    index faults on CUDA only, until this caught it on the CPU.) Runners on CUDA are left as they are."""
    from torch.utils._pytree import tree_map

    from mimo_flash.generation.runner import GraphRunner

    bufs: dict = {}

    def expiring(real):
        def run(self, key, *args, **kwargs):
            out = real(self, key, *args, **kwargs)
            if self.cache.device.type == "cuda":
                return out
            mine = bufs.setdefault((id(self), key), {})
            count = iter(range(1 << 30))

            def keep(t):
                if not isinstance(t, torch.Tensor):
                    return t
                i = next(count)
                if i not in mine or mine[i].shape != t.shape or mine[i].dtype != t.dtype:
                    mine[i] = torch.empty_like(t)
                return mine[i].copy_(t)
            out = tree_map(keep, out)
            for other, b in bufs.items():
                if other != (id(self), key):
                    for t in b.values():
                        t.fill_(float("nan") if t.is_floating_point() else 10 ** 9 if t.dtype != torch.bool else True)
            return out
        return run

    monkeypatch.setattr(GraphRunner, "run_step", expiring(GraphRunner.run_step))
    monkeypatch.setattr(GraphRunner, "_run_once", expiring(GraphRunner._run_once))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and stays fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return tiny_model()
