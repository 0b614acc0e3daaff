"""Thread limits for the many small matrix factorisations qkspectra does.

Its matrices are d_head-sized: a second BLAS thread brings nothing, and on a busy
machine (two cores shared with torch's own threads) a spinning OpenBLAS thread makes
each call many times slower (measured here: 10 pseudo-inverses of (12, 384, 32)
stacks took 6.5 s with two threads, 0.05 s with one).
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def single_blas_thread() -> threadpool_limits:
    """Context manager (or decorator): numpy's BLAS/LAPACK on one thread inside it."""
    return threadpool_limits(limits=1, user_api="blas")
