"""A sweep under faults, on real Dask processes bound to 127.0.0.1 and stopped by their process ids.

A worker killed while it runs a model: Dask runs the task again on the other worker and every
model finishes. The scheduler killed mid-sweep: one line, exit status 1, no sweep file; the same
command on a new scheduler resumes from the finished runs. A model past its worker's memory
limit, an unsupported model type and a missing path: each recorded in one line, the others finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

pytest.importorskip("distributed")

import qkspectra  # noqa: E402
from qkspectra.extract.extraction import ExtractOptions  # noqa: E402
from qkspectra.workflow.runner import RunSettings  # noqa: E402
from qkspectra.workflow.sweep import PARTIAL_FOLDER, SweepModel, run_sweep  # noqa: E402

SETTINGS = RunSettings(ExtractOptions(static_only=True, quiet=True), functional=False)
SRC = str(Path(qkspectra.__file__).parents[1])
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cluster(folder: Path, workers: int, *, worker_args: tuple[str, ...] = (), scheduler_env: dict[str, str] | None = None):
    """A scheduler and ``workers`` worker processes (each in its own process group), all on 127.0.0.1;
    yields (address, {process: Popen}); stops whatever still runs by its process id."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = open(folder / f"cluster-{port}.log", "wb")
    processes = {"scheduler": subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=log, stderr=log, env={**ENV, **(scheduler_env or {})}, start_new_session=True)}
    for i in range(workers):
        processes[f"w{i}"] = subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
             "--name", f"w{i}", *worker_args], stdout=log, stderr=log, env=ENV, start_new_session=True)
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
        yield address, processes
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _kill(process: subprocess.Popen) -> None:
    """Kill a process and everything it started (its process group), and reap it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Four tiny GPT-2 checkpoints, one of a model type qkspectra cannot read, and a folder that is not there."""
    import torch
    from transformers import AutoModel, GPT2Config

    folder = tmp_path_factory.mktemp("checkpoints")
    for i in range(4):
        torch.manual_seed(i)
        AutoModel.from_config(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32)).save_pretrained(folder / f"step{i}")
    unsupported = folder / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text('{"model_type": "no-such-type", "architectures": ["NoSuchModel"]}')
    return folder


def test_a_worker_killed_mid_model_is_replaced_and_every_model_finishes(checkpoints, tmp_path):
    """Kill w0's process group as soon as it runs a model: the task runs again on w1."""
    from distributed import Client

    models = [SweepModel(f"step{i}", str(checkpoints / f"step{i}")) for i in range(4)]
    with cluster(tmp_path, 2, worker_args=("--no-nanny",)) as (address, processes), Client(address) as watcher:
        pids = watcher.run(os.getpid)  # {worker address: its process id}
        names = {address: info["name"] for address, info in watcher.scheduler_info()["workers"].items()}
        assert {names[a]: pid for a, pid in pids.items()}["w0"] == processes["w0"].pid  # no nanny: the worker is the process started
        outcome: dict = {}
        sweep = threading.Thread(target=lambda: outcome.update(result=run_sweep(models, tmp_path / "out", SETTINGS, scheduler=address)))
        sweep.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline:
            processing = watcher.processing()  # {worker address: [task keys]}
            for worker, info in watcher.scheduler_info()["workers"].items():
                if info["name"] == "w0" and any(str(key).startswith("qkspectra-run-") for key in processing.get(worker, ())):
                    killed = next(str(key) for key in processing[worker])
                    _kill(processes["w0"])
            time.sleep(0.05)
        sweep.join(timeout=300)
    assert killed is not None, "w0 never ran a model"
    result = outcome["result"]
    assert result.failed == 0 and [m["status"] for m in result.document["models"]] == ["ok"] * 4
    name = killed.removeprefix("qkspectra-run-").rsplit("-", 1)[0]
    assert (tmp_path / "out" / name / "analysis.json").is_file()  # the killed model, run again on w1
    assert not (tmp_path / "out" / PARTIAL_FOLDER).exists()


def test_a_lost_scheduler_is_one_line_and_the_same_command_resumes(checkpoints, tmp_path):
    out = tmp_path / "out"
    steps = [str(checkpoints / f"step{i}") for i in range(4)]

    def sweep(address: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "qkspectra", "sweep", *steps, "--out", str(out), "--scheduler", address,
                                 "--static-only", "--no-functional"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)

    with cluster(tmp_path, 1, worker_args=("--no-nanny",)) as (address, processes):
        command = sweep(address)
        lines = []
        for line in command.stderr:  # progress lines, one per model
            lines.append(line)
            if ": ok (" in line:
                _kill(processes["scheduler"])
                break
        rest = command.stderr.read()
        status = command.wait(timeout=120)
    errors = [line for line in rest.splitlines() if not line.startswith("qkspectra: [")]
    assert status == 1, rest
    assert len(errors) == 1 and errors[0].startswith(f"qkspectra: error: lost the Dask scheduler {address} after "), rest
    assert "Traceback" not in rest and not (out / "sweep.json").exists()
    finished = {p.name for p in out.iterdir() if (p / "analysis.json").is_file()}
    assert finished  # at least the one reported before the scheduler went

    with cluster(tmp_path, 1) as (address, _):
        command = sweep(address)
        _, err = command.communicate(timeout=300)
    assert command.returncode == 0, err
    document = orjson.loads((out / "sweep.json").read_bytes())
    runs = {m["name"]: m["run"] for m in document["models"]}
    assert all(m["status"] == "ok" for m in document["models"])
    assert {name for name, how in runs.items() if how == "reused"} >= finished  # nothing finished is done twice


def test_memory_limit_unsupported_type_and_missing_path_are_one_line_each(checkpoints, tmp_path):
    """One worker whose memory limit is below what reading a model takes (its nanny kills it), no retry allowed."""
    models = [SweepModel("unsupported", str(checkpoints / "unsupported")), SweepModel("missing", str(checkpoints / "not-there")),
              SweepModel("step0", str(checkpoints / "step0"))]
    with cluster(tmp_path, 1, scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}) as (address, _):
        ok = run_sweep(models[:2], tmp_path / "out", SETTINGS, scheduler=address)
    records = {m["name"]: m for m in ok.document["models"]}
    assert ok.failed == 2 and all("\n" not in r["error"] for r in records.values())
    assert "no-such-type" in records["unsupported"]["error"] and "not-there" in records["missing"]["error"]

    with cluster(tmp_path, 1, worker_args=("--memory-limit", "350MB"),
                 scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}) as (address, _):
        result = run_sweep(models[2:], tmp_path / "small", SETTINGS, scheduler=address)
    record = result.document["models"][0]
    assert record["status"] == "failed" and record["error"].startswith("the worker running it died each time it was tried")
    assert not (tmp_path / "small" / "step0").exists() and not (tmp_path / "small" / PARTIAL_FOLDER).exists()
