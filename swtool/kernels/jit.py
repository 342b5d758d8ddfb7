"""Numba set-up for every module that compiles: imported before numba compiles anything,
by swtool/kernels/common.py for the kernels and swtool/quant/bits.py for the quantizers.

LLVM vectorises for 256-bit registers on Intel CPUs with AVX-512, a guard against
the clock drop wide instructions once caused. swtool's kernels are bound by
float32 multiply-adds, and 512-bit vectors make the fused bf16 product faster
(docs/performance.md). So the "prefer 256-bit" tuning is switched off, for
this process, through numba's own setting for CPU features (NUMBA_CPU_FEATURES, as
numba's test suite does to get 512-bit code).

This only changes which registers LLVM picks, never the results of code without
fastmath (no reordering is allowed there), and the compiled-code cache keys on the
feature string, so cached kernels stay consistent. An explicit NUMBA_CPU_FEATURES
or NUMBA_CPU_NAME from the user wins, and nothing changes once numba's code
generator exists (then its features are fixed for the process).

Threads: numba's OpenMP workers, by default, keep spinning for a while after each
parallel region, on the cores that NumPy's BLAS threads (attention, the long-input
products), the next kernel or another program need. swtool sets OMP_WAIT_POLICY=PASSIVE
(unless the environment sets it) so they sleep instead: a little slower on a quiet
machine, much faster when other work shares the cores (docs/performance.md, "Threads").

Signatures: Numba compiles a function once per argument type, and a read-only array is another
type than a writable one. Weights come read-only from a mapped file and writable from memory, so
the kernels take them through `read_only`: one compiled specialization (and one disk-cache entry)
per kernel, not two.
"""

import os

import numpy as np
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
    # read by libgomp when numba first loads it (its first parallel launch), so it must be set before
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_prefer_wide_vectors()
_sleeping_workers()


def read_only(array):
    """`array` viewed read-only (no copy): the type a kernel is compiled for, whoever owns the memory."""
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view
