"""The Dask distributed side of qkspectra: one place that knows about schedulers and workers.

``connect(scheduler, workers)`` gives a ``distributed.Client``: on an existing cluster at
``scheduler`` (``tcp://HOST:PORT``, started with ``dask scheduler`` / ``dask worker``,
dask-jobqueue or Kubernetes), or, without one, on a local cluster of ``workers`` processes
of one thread each, bound to the loopback interface and closed on leaving. A scheduler that
cannot be reached within Dask's connect timeout (``distributed.comm.timeouts.connect``,
30 s by default) is a ``QkspectraError``.

``cluster_map(client)`` is a drop-in for the builtin ``map`` over a function and one
iterable, with each call a task on the cluster (results in order). The maths modules take
such a callable (``analysis.operator_fit.OperatorFitter(map=...)``) and never import Dask.

Needs the ``cluster`` extra (``dask[distributed]``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qkspectra.errors import QkspectraError
from qkspectra.threads import worker_count


class ClusterLost(QkspectraError):
    """The connection to the scheduler was lost while tasks ran: not bad input, so the command line exits 1."""

    exit_status = 1


def lost_scheduler(error: BaseException) -> bool:
    """Whether ``error`` says the client lost its scheduler (a closed comm, a refused or timed-out reconnection)."""
    from distributed.comm.core import CommClosedError

    return isinstance(error, (CommClosedError, ConnectionError, TimeoutError)) or type(error).__name__ == "CancelledError"


@contextlib.contextmanager
def quiet_client_logs() -> Iterator[None]:
    """The client's own error logs (tracebacks of lost connections) kept off the terminal: qkspectra reports in one line."""
    names = ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def require_distributed():
    try:
        import distributed
    except ImportError:
        raise QkspectraError("a Dask cluster needs dask.distributed (pip install 'qkspectra[cluster]')") from None
    return distributed


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` on ``scheduler``, or on a local cluster of ``workers`` processes (default: one per core)."""
    distributed = require_distributed()
    if scheduler is not None:
        if workers is not None:
            raise QkspectraError("--workers sizes a local cluster; with --scheduler the cluster's own workers run the tasks")
        try:
            client = distributed.Client(scheduler, set_as_default=False)
        except (OSError, ValueError, TypeError) as e:  # unreachable (timed out), refused, or not an address
            message = " ".join(str(e).split()) or type(e).__name__
            raise QkspectraError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({message})") from None
        with quiet_client_logs(), client:  # quiet until the client has closed
            yield client
        return
    workers = worker_count() if workers is None else workers  # one worker process per core
    if workers < 1:
        raise QkspectraError(f"--workers {workers}: must be at least 1")
    with distributed.LocalCluster(host="127.0.0.1",  # loopback only, dashboard included
        n_workers=workers, threads_per_worker=1, processes=True,
        dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL,  # failures are recorded, not logged
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


def describe(client: Any) -> dict[str, Any]:
    """The engine for the record: scheduler address, workers, and the versions that ran."""
    import dask
    import distributed

    info = client.scheduler_info()
    return {
        "name": "dask.distributed",
        "scheduler": client.scheduler.address,
        "workers": len(info.get("workers", {})),
        "dask_version": dask.__version__,
        "distributed_version": distributed.__version__,
    }


def _call(func: Callable[[Any], Any], item: Any) -> Any:
    return func(item)


def cluster_map(client: Any) -> Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]:
    """``map(func, items)`` with each ``func(item)`` a task on ``client``'s cluster; results in order.

    ``func`` (with what it carries, e.g. a bound method's object) is sent to the cluster once per
    call and fetched once by each worker that needs it.
    """

    def mapped(func: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        items = list(items)
        if not items:
            return []
        remote = client.scatter(func, hash=False)
        futures = [client.submit(_call, remote, item, pure=False) for item in items]
        return client.gather(futures)

    return mapped


@contextlib.contextmanager
def fit_map(scheduler: str | None) -> Iterator[Callable | None]:
    """None without a scheduler (the fitter's own thread per core); with one, ``cluster_map`` on it (connected for the block)."""
    if scheduler is None:
        yield None
        return
    with connect(scheduler) as client:
        yield cluster_map(client)
