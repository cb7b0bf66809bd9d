"""Shared test machinery: running a function on N gloo ranks in child processes, and measuring how far a
process's peak host memory (resident set) rises while it does something."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


# ------------------------------------------------------------------------------------------------ ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., dict], rank: int, world: int, port: int, args: tuple, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        res = fn(rank, world, *args)
    except Exception as e:  # report instead of hanging the parent
        import traceback

        res = {"error": f"rank {rank}: {e}\n{traceback.format_exc()}"}
    q.put((rank, res))
    from mimo_flash.distributed.context import leave_distributed
    leave_distributed(ok="error" not in res)


def run_ranks(fn: Callable[..., dict], world: int, *args: Any, start: str = "fork", timeout: float = 240) -> list[dict]:
    """Run fn(rank, world, *args) -> dict in `world` child processes, one thread each, with RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT (a free port) set for them to start a process group (fn starts it;
    the child destroys it after reporting). -> the dicts in rank order; fails with every rank's error when
    any raised, or when a rank reports nothing within `timeout` seconds.

    start "fork": the children start at once instead of re-importing torch (spawn takes ~10 s a process on two
    shared cores); only safe while this process has started neither a process group nor CUDA. The results
    travel through a queue: tensors in them should be numpy arrays or plain values (fork) to come back whole."""
    ctx = mp.get_context(start)
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [results[r]["error"] for r in range(world) if "error" in results[r]]
    assert not errors, "\n".join(errors)
    return [results[r] for r in range(world)]


# ------------------------------------------------------------------------------------------ peak memory
def _status(key: str) -> int:
    """A /proc/self/status line in bytes (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS


def _can_reset_peak() -> bool:
    try:
        _reset_peak()
        return True
    except OSError:
        return False


needs_peak_rss = pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak(),
                                    reason="needs Linux /proc/self/clear_refs to measure peak RSS")


def peak_rss_growth(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[Any, int]:
    """Call fn(*args, **kw) -> (its result, how many bytes this process's peak resident set rose above the
    resident set it had at the call). Linux only: mark the test with needs_peak_rss."""
    _reset_peak()
    base = _status("VmRSS")
    out = fn(*args, **kw)
    return out, _status("VmHWM") - base


def run_python(*argv: str, timeout: float = 300) -> list[dict]:
    """Run `python *argv` with src/ and tests/ importable (so it can use this module) and one OpenMP thread;
    fail with the ends of its stdout and stderr unless it exits 0. -> the JSON objects it printed, each on a
    line starting with '{' (processes that share the stdout, as torchrun's ranks do, may put several on one
    line: an unbuffered print writes its text and its newline separately, each write whole)."""
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    objs = []
    decoder = json.JSONDecoder()
    for line in out.stdout.splitlines():
        at = 0
        while line.startswith("{", at):
            try:
                obj, at = decoder.raw_decode(line, at)
            except json.JSONDecodeError as e:  # (say which line)
                raise AssertionError(f"not a JSON line ({e}): {line[:500]!r}\nstdout: {out.stdout[-3000:]}\n"
                                     f"stderr: {out.stderr[-3000:]}") from None
            objs.append(obj)
    return objs
