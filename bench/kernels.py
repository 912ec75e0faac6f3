"""BitLinear kernels against torch, ONNX Runtime (fp32, int8) and TVM fp32, one layer at a time.

    python bench/kernels.py                           # N = K in 64, 256, 1024, 4096; batch 1 and 32; 1 thread
    python bench/kernels.py --sizes 1024 --threads 2  # see --help; same as `bitrl-compile bench-kernels`

The benchmark lives in bitrl_compile/bench_kernels.py so that the installed CLI has it too.
"""

import sys

from bitrl_compile.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
