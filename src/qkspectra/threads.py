"""Thread limits and worker pools for the many small matrix factorisations qkspectra does.

Its matrices are d_head-sized: a second BLAS thread brings nothing, and on a busy
machine (two cores shared with torch's own threads) a spinning OpenBLAS thread makes
each call many times slower (measured here: 10 pseudo-inverses of (12, 384, 32)
stacks took 6.5 s with two threads, 0.05 s with one). Work is therefore spread over
the cores as threads, each calling BLAS on one thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from threadpoolctl import threadpool_limits

# A ``map``-like callable: map(function, items) -> iterable of results, in order.
Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


def single_blas_thread() -> threadpool_limits:
    """Context manager (or decorator): numpy's BLAS/LAPACK on one thread inside it."""
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread: the per-head factorisations are small, and on a busy machine
    a second spinning thread makes them many times slower rather than faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def worker_count() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def thread_map(map: Mapper | None) -> Iterator[Mapper]:
    """``map`` itself, or a thread pool's map over every core with BLAS on one thread per call."""
    if map is not None:
        yield map
        return
    with single_blas_thread(), ThreadPoolExecutor(worker_count()) as pool:
        yield pool.map
