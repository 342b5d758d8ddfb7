"""Numba set-up shared by the kernel modules: import this before numba compiles anything.

LLVM vectorises for 256-bit registers on Intel CPUs with AVX-512, a guard against
the clock drop wide instructions once caused. swtool's kernels are bound by
float32 multiply-adds, and on the machine the benchmarks run on 512-bit vectors
make the fused bf16 product 1.2-1.4x faster (bench/run.py, kernels.py). So the
"prefer 256-bit" tuning is switched off, for this process, through numba's own
setting for CPU features (NUMBA_CPU_FEATURES, as numba's test suite does to get
512-bit code).

This only changes which registers LLVM picks, never the results of code without
fastmath (no reordering is allowed there), and the compiled-code cache keys on the
feature string, so cached kernels stay consistent. An explicit NUMBA_CPU_FEATURES
or NUMBA_CPU_NAME from the user wins, and nothing changes once numba's code
generator exists (then its features are fixed for the process).

Threads: numba's default OpenMP layer keeps its workers spinning after each
parallel region, on the cores that NumPy's BLAS threads (attention, the long-input
products) and the next kernel need. swtool alternates between the two many times a
layer, so it uses numba's "workqueue" layer, whose workers sleep between regions.
Measured on the 2-core benchmark machine, in process, best of 3 (other work running):
SmolLM2 scan 0.71 -> 0.44 s, Llama-1B-shaped scan 1.35 -> 0.91 s; OMP_WAIT_POLICY=PASSIVE
gave the same. swtool never launches kernels from two Python threads at once, which
workqueue does not allow. NUMBA_THREADING_LAYER from the user wins.
"""

from numba.core import config
from numba.core.registry import cpu_target


def _prefer_wide_vectors():
    if config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        return  # the user chose
    if "_toplevel_target_context" in cpu_target.__dict__:
        return  # numba's code generator already exists, with its features fixed
    from numba.core.codegen import get_host_cpu_features

    features = get_host_cpu_features()
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


def _sleeping_workers():
    if config.THREADING_LAYER == "default":  # not chosen by the user (NUMBA_THREADING_LAYER)
        config.THREADING_LAYER = "workqueue"


_prefer_wide_vectors()
_sleeping_workers()
