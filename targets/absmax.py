"""The activation scale's absmax (quant: scale = 127 / max(max |x|, eps) per row), the prologue of the hand-written
kernels (the NEON GEMM rows in gemm_neon.py, the NEON and VNNI convolutions): one TVMScript macro that each inlines
into its per-row loop, so the three cannot drift apart. Its own module (as epilogue.py) so that no kernel module
imports another one for it."""

from __future__ import annotations

from tvm.script import tirx as T


@T.macro
def absmax(m, mx, X, b, size: int):
    """m[0] = max |X[b, 0:size]| (float32; 0 for an all-zero row). Four independent 16-lane max chains (one
    chain would wait on fmax / vmaxps latency at every vector), combined as a tree, a horizontal max over the 16
    lanes, then the size % 16 last values one by one. `mx` is a (4, 16) float32 scratch buffer; `size` a Python
    int. Max is exact, so the order changes nothing in the result, only the speed."""
    for u in T.unroll(4):
        mx[u, T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
    for v in T.serial(size // 64):
        for u in T.unroll(4):
            mx[u, T.ramp(0, 1, 16)] = T.max(mx[u, T.ramp(0, 1, 16)], T.abs(X[b, T.ramp((v * 4 + u) * 16, 1, 16)]))
    for v in T.serial(size // 16 % 4):
        mx[0, T.ramp(0, 1, 16)] = T.max(mx[0, T.ramp(0, 1, 16)],
                                        T.abs(X[b, T.ramp((size // 64 * 4 + v) * 16, 1, 16)]))
    mx[0, T.ramp(0, 1, 16)] = T.max(T.max(mx[0, T.ramp(0, 1, 16)], mx[1, T.ramp(0, 1, 16)]),
                                    T.max(mx[2, T.ramp(0, 1, 16)], mx[3, T.ramp(0, 1, 16)]))
    m[0] = T.float32(0)
    for v in T.serial(16):
        m[0] = T.max(m[0], mx[0, v])
    for v in T.serial(size % 16):
        m[0] = T.max(m[0], T.abs(X[b, size // 16 * 16 + v]))
