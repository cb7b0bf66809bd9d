"""The Triton kernels of the ops, one file per op, beside the op's own file in ops/:

    swa_attention.py  banded sliding-window attention with the sink (ops/attention.py, "triton" backend);
                      its kernels, being long, in swa_kernels.py
    rope.py           RoPE of q / k / v from one projection (ops/rope.py)
    norm.py           RMSNorm and add + RMSNorm (ops/norm.py)
    swiglu.py         the routing-weighted SwiGLU of the experts (ops/swiglu.py)
    moe.py            counting sort by expert, gather-sum (ops/moe.py)
    router.py         the sigmoid router (ops/moe.py)
    loss.py           cross entropy (ops/loss.py)
    launch.py         the launcher they share (direct launches where the Triton version allows)

A kernel file holds the @triton.jit kernels and the host code that launches them, including the
autograd.Function that pairs a kernel path's forward launch with its backward launch. The op's file holds
the reference (the definition), the dispatch (which body runs) and the autograd that every body shares.
Importing a kernel file needs triton; the ops import them through ops.compiled.kernels(name), which
gives None where triton does not import. Each kernel is tested against its reference in
tests/test_ops_kernels.py (Triton's CPU interpreter) and tests/test_ops_gpu.py.
"""
