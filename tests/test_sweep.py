"""`qkspectra sweep` on real Dask clusters (everything on 127.0.0.1), with tiny random checkpoints.

One interrupted sweep on a local cluster, then its resumption (extended by a new model) on a
separately started scheduler with two workers; every other test reads those folders.
"""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

pytest.importorskip("distributed")

import qkspectra  # noqa: E402
from qkspectra.extract.extraction import ExtractOptions  # noqa: E402
from qkspectra.workflow.runner import run  # noqa: E402
from qkspectra.workflow.runner import RunSettings  # noqa: E402
from qkspectra.workflow.sweep import PARTIAL_FOLDER, SweepModel, run_sweep, safe_name, sweep_models, unique_names  # noqa: E402

SETTINGS = RunSettings(ExtractOptions(static_only=True, quiet=True), functional=False)
CLI_OPTIONS = ["--static-only", "--no-functional", "--quiet"]
SRC = str(Path(qkspectra.__file__).parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny GPT-2 checkpoints and one with corrupt weights."""
    import torch
    from transformers import AutoModel, GPT2Config

    folder = tmp_path_factory.mktemp("checkpoints")
    for i, layers in enumerate((2, 3, 2)):
        torch.manual_seed(i)
        AutoModel.from_config(GPT2Config(n_embd=16, n_layer=layers, n_head=2, vocab_size=32)).save_pretrained(folder / f"step{i}")
    broken = folder / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((folder / "step0" / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, stopped by their pids at the end."""
    folder = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    scheduler = [sys.executable, "-m", "dask", "scheduler"]
    worker = [sys.executable, "-m", "dask", "worker"]
    address = f"tcp://127.0.0.1:{port}"
    log = open(folder / "cluster.log", "wb")
    processes = [subprocess.Popen([*scheduler, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
                                  stdout=log, stderr=log, env=env)]
    processes += [subprocess.Popen([*worker, address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                    "--name", f"w{i}"], stdout=log, stderr=log, env=env) for i in range(2)]
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@pytest.fixture(scope="module")
def sweeps(checkpoints, external_cluster, tmp_path_factory):
    """An interrupted sweep (Ctrl-C after the first model that ran) on a local cluster of two workers,
    then the same sweep extended by a new model, run to the end on the external cluster."""
    out = tmp_path_factory.mktemp("sweep")
    first = [SweepModel("step0", str(checkpoints / "step0"), {"step": 0}), SweepModel("broken", str(checkpoints / "broken"), {"step": 5}),
             SweepModel("step1", str(checkpoints / "step1"), {"step": 10})]
    finished: list[str] = []

    def interrupt_after_the_first_ok(line: str) -> None:
        if ": ok (" in line:
            finished.append(line.split("] ")[1].split(":")[0])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(first, out, SETTINGS, workers=2, say=interrupt_after_the_first_ok)
    after_interrupt = {p.name: (p / "run.json").is_file() and (p / "analysis.json").is_file()
                       and orjson.loads((p / "run.json").read_bytes())["finished"] is not None for p in out.iterdir()}
    second = [*first, SweepModel("step2", str(checkpoints / "step2"), {"step": 20})]
    lines: list[str] = []
    result = run_sweep(second, out, SETTINGS, scheduler=external_cluster, say=lines.append)
    return result, finished, after_interrupt, lines


def test_the_operator_fits_go_through_the_given_map():
    import pickle

    import numpy as np

    from qkspectra.analysis.factors import make_factors
    from qkspectra.analysis.operator_fit import OperatorFitter

    rng = np.random.default_rng(0)
    factors = make_factors({"W_Q": rng.standard_normal((3, 2, 8, 4)), "W_K": rng.standard_normal((3, 2, 8, 4))})
    calls = []

    def elsewhere(func, items):  # as a cluster does it: the function travels pickled, without the map or the cache
        items = list(items)
        calls.append(items)
        return [pickle.loads(pickle.dumps(func))(item) for item in items]

    remote, local = OperatorFitter(factors, map=elsewhere), OperatorFitter(factors)
    fits, expected = remote.fit_all(np.array([2, 2, 2])), local.fit_all(np.array([2, 2, 2]))
    assert calls == [[0, 1, 2], [(0, 2), (1, 2), (2, 2)]]  # the layers' summaries, then the layer pairs
    remote.fit_all(np.array([2, 2, 2]))
    assert len(calls) == 2  # fitted pairs are kept
    for fit, want in zip(fits, expected):
        assert all(np.array_equal(getattr(fit, k), getattr(want, k)) for k in ("T", "residual", "matched_head", "difference_singvals"))


def test_names_are_safe_and_unique():
    assert safe_name("../a b/..") == "a_b" and safe_name("...") == "model"
    assert unique_names(["a", "A", "a", "plots", "sweep.json"]) == ["a", "A-2", "a-3", "plots-2", "sweep.json-2"]


def test_models_file_reads_names_labels_and_relative_paths(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "m.csv").write_text("model,name,step,family\nckpt,,100,gpt\nminilm,mini,,bert\nckpt,x/y,2.5,gpt\n")
    models = sweep_models(["minilm"], tmp_path / "m.csv")
    assert [m.name for m in models] == ["minilm", "ckpt", "mini", "x_y"]
    assert models[1].model == str(tmp_path / "ckpt") and models[2].model == "minilm"
    assert models[1].labels == {"step": 100, "family": "gpt"} and models[2].labels == {"step": None, "family": "bert"}
    assert models[3].labels["step"] == 2.5


def test_interrupted_sweep_leaves_only_finished_run_folders(sweeps):
    _, finished, after_interrupt, _ = sweeps
    assert len(finished) == 1 and finished[0] in ("step0", "step1")
    # the run that was reported, and any other that completed before the cancel took effect, each finished;
    # no sweep file, no partial run
    assert finished[0] in after_interrupt and set(after_interrupt) <= {"step0", "step1"}
    assert all(after_interrupt.values())


def test_resumed_sweep_redoes_only_what_is_missing(sweeps):
    result, _, after_interrupt, _ = sweeps
    runs = {m["name"]: m["run"] for m in result.document["models"]}
    assert {name for name, how in runs.items() if how == "reused"} == set(after_interrupt)
    assert {name for name, how in runs.items() if how == "performed"} == {"step0", "step1", "step2"} - set(after_interrupt)
    assert result.document["engine"]["workers"] == 2


def test_a_broken_model_is_recorded_and_the_others_finish(sweeps):
    result, _, _, lines = sweeps
    models = {m["name"]: m for m in result.document["models"]}
    assert result.failed == 1 and models["broken"]["status"] == "failed" and models["broken"]["run_dir"] is None
    assert "\n" not in models["broken"]["error"] and "broken" in models["broken"]["error"]
    assert all(models[name]["status"] == "ok" for name in ("step0", "step1", "step2"))
    assert any(line.endswith(models["broken"]["error"]) for line in lines)
    out = result.out_dir
    assert not (out / "broken").exists() and not (out / PARTIAL_FOLDER).exists()
    assert orjson.loads((out / "sweep.json").read_bytes()) == orjson.loads(orjson.dumps(result.document))


def test_sweep_json_holds_the_key_figures(sweeps):
    result, _, _, _ = sweeps
    step2 = next(m for m in result.document["models"] if m["name"] == "step2")
    analysis = orjson.loads((result.out_dir / "step2" / "analysis.json").read_bytes())
    figures = step2["figures"]
    assert figures["verdict"]["layers"]["operator"] == analysis["verdict"]["layers"]["operator"]
    assert figures["spectral_residual"]["group"] == analysis["strategies"]["group"]["rescale"]["mean_residual_fitted"]
    assert figures["spectral_residual_all_layers"]["group"] == analysis["strategies"]["group"]["rescale"]["mean_residual"]
    assert figures["operator_residual"]["last"]["same_head"] == analysis["operator"]["last"]["mean_residual_fitted"]
    single = [analysis["operator"][name][key] for name in ("last", "middle", "best")
              for key in ("mean_residual_fitted", "matched_mean_residual_fitted")]
    assert figures["operator_residual_best"] == min(single)  # group (more anchors) never chosen
    assert figures["null_p_values"]["shuffle"]["mean_residual.last"] == analysis["null"]["shuffle"]["figures"]["mean_residual.last"]["p_value"]
    assert len(figures["schedule"]["mean_T"]) == 2 and step2["labels"] == {"step": 20}
    # static only: no entropy, so no descriptor link, no context slope, no sink mass (null, shown as n/a)
    assert (figures["entropy_link_best"], figures["median_context_slope"], figures["mean_sink_mass"]) == (None, None, None)
    assert {"python", "numpy", "qkspectra", "torch"} <= result.document["engine"]["versions"].keys()
    assert {p.name for p in (result.out_dir / "plots").iterdir()} == {"sweep_schedules.png", "sweep_verdicts.png", "sweep_against_step.png"}
    page = (result.out_dir / "sweep.html").read_text()
    assert 'href="step2/report.html"' in page and "http" not in page.replace("http-equiv", "")
    assert "strongest within-layer descriptor of entropy" in page and "mean sink mass" in page


def test_a_sweeps_run_equals_a_single_run(sweeps, checkpoints, tmp_path):
    result, _, _, _ = sweeps
    single = run(str(checkpoints / "step2"), tmp_path / "single", SETTINGS)
    assert (tmp_path / "single" / "analysis.json").read_bytes() == (result.out_dir / "step2" / "analysis.json").read_bytes()
    assert single.document == orjson.loads((result.out_dir / "step2" / "analysis.json").read_bytes())


def test_run_with_a_scheduler_gives_the_same_numbers(sweeps, external_cluster, cli):
    result, _, _, _ = sweeps
    folder = result.out_dir / "step1"
    local = orjson.loads((folder / "analysis.json").read_bytes())
    copy = folder.parent.parent / "step1-cluster"
    status, _, err = cli(["run", next(m["model"] for m in result.document["models"] if m["name"] == "step1"), "-o", str(copy),
                          "--scheduler", external_cluster, *CLI_OPTIONS])
    assert status == 0, err
    assert orjson.loads((copy / "analysis.json").read_bytes()) == local
    status, out, err = cli(["analyze", str(copy / "geometry.json"), "--anchor", "all", "--scheduler", external_cluster, "-q",
                            "--json", str(copy / "again.json")])
    assert status == 0, err
    assert orjson.loads((copy / "again.json").read_bytes())["operator"] == local["operator"]


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(checkpoints, tmp_path, cli):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        clock = time.perf_counter()
        status, _, err = cli(["sweep", str(checkpoints / "step0"), "--out", str(tmp_path / "out"),
                              "--scheduler", f"tcp://127.0.0.1:{_free_port()}", *CLI_OPTIONS])
    assert status == 2 and err.startswith("qkspectra: error: --scheduler tcp://127.0.0.1:") and err.count("\n") == 1
    assert time.perf_counter() - clock < 60 and not (tmp_path / "out").exists()
    status, _, err = cli(["sweep", "--out", str(tmp_path / "out")])
    assert status == 2 and "no model to sweep" in err


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; `make test` does it when run as root)")
def test_sweep_page_in_chromium(sweeps, tmp_path):
    from test_browser import chromium

    result, _, _, _ = sweeps
    dom = chromium(result.out_dir / "sweep.html", tmp_path / "profile", "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images-ok="true"' in body and 'data-images-total="3"' in body, body
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    assert "broken" in text and next(m["error"] for m in result.document["models"] if m["status"] == "failed") in text


def test_load_sweep_opens_the_folder_with_each_models_run(sweeps):
    pandas = pytest.importorskip("pandas")
    result, _, _, _ = sweeps
    sweep = qkspectra.load_sweep(result.out_dir)
    assert sweep.document == result.document and sweep.out_dir == result.out_dir
    assert list(sweep) == [m["name"] for m in result.document["models"] if m["status"] == "ok"]
    assert sweep["step2"] == qkspectra.load_run(result.out_dir / "step2")
    assert sweep["step2"].document == orjson.loads((result.out_dir / "step2" / "analysis.json").read_bytes())
    with pytest.raises(KeyError, match="'broken' failed in this sweep: "):
        sweep["broken"]
    models = sweep.models()
    assert isinstance(models, pandas.DataFrame) and list(models["name"]) == [m["name"] for m in result.document["models"]]
    row = models.set_index("name").loc["step2"]
    figures = next(m for m in result.document["models"] if m["name"] == "step2")["figures"]
    assert row["step"] == 20 and row["overall"] == figures["verdict"]["overall"]
    assert row["verdict_operator"] == figures["verdict"]["layers"]["operator"]["code"]
    assert row["spectral_residual_group"] == figures["spectral_residual"]["group"]
    assert row["p_shuffle_mean_residual_last"] == figures["null_p_values"]["shuffle"]["mean_residual.last"]
    assert models.set_index("name").loc["broken", "status"] == "failed"
    documented = (Path(__file__).parents[1] / "docs" / "tables.md").read_text()
    for column in models.columns.drop(["step"]):
        generic = re.sub(r"_(last|middle|best|group)$", "_{strategy}", re.sub(r"^p_(gaussian|shuffle)_", "p_{null}_", column))
        assert f"`{generic}`" in documented, column
    assert "\n" not in repr(sweep) and "3 ok" in repr(sweep) and "<table" in sweep._repr_html_()
