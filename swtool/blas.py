"""The threads of NumPy's BLAS, per calling thread: OpenBLAS's `openblas_set_num_threads_local`.

Attention over long inputs multiplies many small matrices (one query block of one head at a time,
128 x 64 by 64 x 512 at 512-token chunks). OpenBLAS splits each such product over its threads and
synchronises them per product: on a quiet machine that costs little, but when other work shares the
cores, a thread that is descheduled holds up every product (ops.attention took 10x longer on two
busy cores). `blas_threads(1)` makes the calling thread's products single-threaded for a while;
ops.attention then runs its blocks on Python threads of its own (NumPy releases the GIL in BLAS),
so the cores are still used, without a synchronisation per product.

The symbol is looked up in the OpenBLAS NumPy's wheels ship (numpy.libs/libscipy_openblas*.so,
OpenBLAS >= 0.3.27); with another BLAS, or none found, `blas_threads` changes nothing.
"""

import contextlib
import ctypes
import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _set_local():
    import numpy

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("libscipy_openblas*.so")):
        try:
            function = ctypes.CDLL(str(path)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    return None


@contextlib.contextmanager
def blas_threads(n):
    """NumPy's BLAS products made by this thread use `n` threads inside the block."""
    set_local = _set_local()
    if set_local is None:
        yield
        return
    previous = set_local(n)
    try:
        yield
    finally:
        set_local(previous)


def configured_threads():
    """The threads NumPy's BLAS uses by default (-t N, OPENBLAS_NUM_THREADS, or every core)."""
    set_local = _set_local()
    if set_local is None:
        import os

        return os.cpu_count() or 1
    current = set_local(0)  # 0: back to the global count, which the call returns next
    threads = set_local(current)
    return max(1, threads)
