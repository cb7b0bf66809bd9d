"""`kernel[grid](*args)` with less host work per call, for the Triton version it was written for.

The forward of a training step issues ~110 short kernels barely ahead of the GPU, and Triton's own launch
path spends most of its time in Python (hooks, launch metadata, a cache-key string, scratch allocators):
15-23 us of host time per call on the device's machines, 9-13 us on a laptop (bench/host_time.py).
`Launcher` sends the first call of each specialization through Triton (compiling if need be), keeps the
compiled kernel, keyed by Triton's own binder (the argument specialization Triton keys its cache by, so the
same compiled kernel runs), and launches later calls through its C launcher directly.

That reads Triton's internals: `fn.device_caches[device]` is the tuple (kernel cache, key cache, target,
backend, binder) and the binder maps the arguments to (bound args, specialization, options); the compiled
kernel's `run` is the C launcher with `launch(...)`, and `function` / `packed_metadata` its arguments. They
are Triton 3.6's (DIRECT_TRITON). On any other version, where those are missing or of another shape, for
kernels that need scratch memory, under Triton's CPU interpreter, or with options().direct_launch False,
every call is the plain `kernel[grid](*args, **meta)`.
"""

from __future__ import annotations

import os

import torch
import triton

from ...options import options

DIRECT_TRITON = "3.6."  # the Triton release whose internals the direct path reads

# Triton's CPU interpreter (TRITON_INTERPRET=1, which tests the kernels' index logic without a GPU) cannot take
# tensor loop bounds: kernels with a STATIC flag then run a fixed count of iterations with a guard. Read here
# because Triton itself reads the variable (at import), not an option of ours.
STATIC_LOOPS = os.environ.get("TRITON_INTERPRET") == "1"


_PLAIN = object()  # a specialization that always takes Triton's own path


def direct_supported(fn, version: str = triton.__version__) -> bool:
    """Can Launcher launch `fn` directly: a compiled @triton.jit function (not the interpreter's) of the
    Triton release DIRECT_TRITON, with the per-device binder cache that the direct path reads."""
    return (version.startswith(DIRECT_TRITON) and isinstance(fn, triton.runtime.JITFunction)
            and isinstance(getattr(fn, "device_caches", None), dict) and hasattr(fn, "create_binder"))


class Launcher:
    """`launcher[grid](*args, **meta)` launches the kernel `fn`, directly where it can (see the module
    docstring). direct=False: always Triton's own path (as does options().direct_launch=False)."""

    def __init__(self, fn, direct: bool = True):
        self.fn = fn
        self.direct = direct and direct_supported(fn)
        self.kernels = {}  # (device, specialization, options) -> what the direct launch needs

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta):
        if not (self.direct and options().direct_launch):
            self.fn[grid](*args, **meta)
            return
        device = torch.cuda.current_device()
        try:
            binder = self.fn.device_caches[device][4]
        except (IndexError, KeyError, TypeError):  # not the internals this was written for
            self.direct = False
            self.fn[grid](*args, **meta)
            return
        bound, spec, opts = binder(*args, **meta)
        key = (device, *spec, *opts.items())
        hit = self.kernels.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **meta)
            self.kernels[key] = self._entry(kernel)
            return
        if hit is _PLAIN:
            self.fn[grid](*args, **meta)
            return
        launch, run, function, packed, coop, pdl = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        if launch is not None:
            launch(grid[0], g1, g2, stream, function, coop, pdl, None, None, packed, None, None, None,
                   *bound.values())
        else:
            run(grid[0], g1, g2, stream, function, packed, None, None, None, *bound.values())

    @staticmethod
    def _entry(kernel):
        """What the direct launch of a compiled kernel needs (launch None: the launcher's generic run, for kernels
        with scratch memory), or _PLAIN where the compiled kernel lacks the parts this was written against."""
        run = getattr(kernel, "run", None)
        parts = ("launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size")
        if run is None or not all(hasattr(run, a) for a in parts) or not hasattr(kernel, "packed_metadata"):
            return _PLAIN
        direct = run.global_scratch_size == 0 and run.profile_scratch_size == 0 and hasattr(run, "launch")
        return (run.launch if direct else None, run, kernel.function, kernel.packed_metadata,
                run.launch_cooperative_grid, run.launch_pdl)


def launcher(fn) -> Launcher:
    """Decorator: wrap a @triton.jit kernel in a Launcher."""
    return Launcher(fn)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
