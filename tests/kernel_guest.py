"""The script the aarch64 kernel tests run in the emulated Python (tests/test_kernels.py, tests/test_gemm_neon.py):
argv[1] an .npz of cases KEY/{name, w, gamma, bias, x, n, batches} beside KEY.so libraries, argv[2] the .npz of
outputs KEY/BATCH it writes (each kernel called on the first BATCH rows of x)."""

GUEST_RUNNER = """
import sys, numpy as np
from bitrl_compile.runtime import tvm_runtime as rt
data = dict(np.load(sys.argv[1]))
out = {}
for key in sorted({k.rsplit('/', 1)[0] for k in data}):
    fn = rt.load_module(key + '.so')[str(data[key + '/name'])]
    args = [rt.to_device(rt.aligned(data[key + '/' + a])) for a in ('w', 'gamma', 'bias')]
    for b in [int(v) for v in data[key + '/batches']]:
        y = rt.aligned(np.zeros((b, int(data[key + '/n'])), np.float32))
        fn(rt.to_device(rt.aligned(data[key + '/x'][:b])), *args, rt.to_device(y))
        out[key + '/' + str(b)] = y
np.savez(sys.argv[2], **out)
"""
