"""`qkspectra run` end to end on the bundled minilm: outputs, cached extraction, byte-identical analysis."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import orjson
import pytest

from qkspectra.cli import main
from qkspectra.extract.extraction import ExtractOptions
from qkspectra.workflow.runner import RunSettings, cache_key, default_out_dir, model_identity, reusable_geometry, run

OPTIONS = ExtractOptions(max_tokens=256, seq_len=64, quiet=True)
CLI_OPTIONS = ["--max-tokens", "256", "--seq-len", "64", "--quiet"]
PLOTS = {"evidence", "schedule", "temperature_heatmap", "residual_heatmap", "spectral_shapes", "entropy_scatter", "entropy_by_position", "entropy_descriptors",
         "cross_head", "rank_k"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One extraction of minilm into <tmp>/minilm, the folder `qkspectra run` picks by default there."""
    out = tmp_path_factory.mktemp("runs") / "minilm"
    messages: list[str] = []
    result = run("minilm", out, RunSettings(OPTIONS), say=messages.append)
    return result, messages


@pytest.mark.slow
def test_run_writes_every_output(first_run):
    result, messages = first_run
    out = result.out_dir
    assert result.extracted and messages[0] == "extracting the geometry of minilm"
    names = {p.name for p in out.iterdir()}
    assert names == {"geometry.json", "geometry.factors.safetensors", "analysis.json", "plots", "report.html", "report.md", "run.json"}
    assert {p.stem for p in (out / "plots").iterdir()} == PLOTS
    document = orjson.loads((out / "analysis.json").read_bytes())
    assert document == orjson.loads(orjson.dumps(result.document))
    assert document["input"]["metadata"]["model"] == "minilm" and document["input"]["file"] == "geometry.json"
    assert set(document["strategies"]) == {"last", "middle", "best", "group"}
    assert set(document["operator"]) == set(document["rank_k"]) == set(document["strategies"])  # from the factors file
    assert document["verdict"]["layers"]["operator"]["code"] != "n/a"
    assert abs(document["functional"]["control"]["delta_loss"]) < 1e-6  # run's default includes the functional test
    assert document["verdict"]["layers"]["functional"]["code"] != "n/a"
    record = orjson.loads((out / "run.json").read_bytes())
    assert record["extraction"] == "performed" and record["cache_key"]["options"]["max_tokens"] == 256
    assert {"started", "finished", "timings"} <= record.keys()
    assert "started" not in document and "timings" not in document  # dates and timings stay out of analysis.json


@pytest.mark.slow
def test_second_run_reuses_the_extraction_and_writes_the_same_bytes(first_run, monkeypatch, capsys):
    out = first_run[0].out_dir
    analysis, geometry_stat = (out / "analysis.json").read_bytes(), (out / "geometry.json").stat()
    capsys.readouterr()
    monkeypatch.chdir(out.parent)
    main(["run", *CLI_OPTIONS])  # MODEL defaults to minilm, --out to ./minilm
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bars, no messages
    assert "=== Anchor strategies side by side ===" in captured.out and "=== Verdict ===" in captured.out
    assert f"Overall: {first_run[0].document['verdict']['overall'].upper()}." in captured.out  # the one verdict
    assert first_run[0].document["verdict"]["text"] not in captured.out  # the seed's is in the report, apart
    assert orjson.loads((out / "run.json").read_bytes())["extraction"] == "reused"
    assert (out / "geometry.json").stat().st_mtime_ns == geometry_stat.st_mtime_ns
    assert (out / "analysis.json").read_bytes() == analysis


@pytest.mark.slow
def test_fresh_extraction_gives_byte_identical_outputs(first_run):
    out = first_run[0].out_dir
    analysis, geometry = (out / "analysis.json").read_bytes(), (out / "geometry.json").read_bytes()
    (out / "run.json").unlink()
    again = run("minilm", out, RunSettings(OPTIONS))
    assert again.extracted
    assert (out / "geometry.json").read_bytes() == geometry
    assert (out / "analysis.json").read_bytes() == analysis


@pytest.mark.slow
def test_the_cache_key_follows_model_and_options(first_run):
    out = first_run[0].out_dir
    assert reusable_geometry(out, cache_key("minilm", OPTIONS))
    assert reusable_geometry(out, cache_key("minilm", ExtractOptions(max_tokens=256, seq_len=64, quiet=False)))
    for other in (ExtractOptions(max_tokens=512, seq_len=64), ExtractOptions(max_tokens=256, seq_len=64, fold_ln=False)):
        assert not reusable_geometry(out, cache_key("minilm", other))
    assert not reusable_geometry(out, cache_key("smollm2", OPTIONS))


def fake_previous_run(folder: Path, key) -> None:
    """A geometry, a factors file and the run.json that vouches for both."""
    (folder / "geometry.json").write_text("{}")
    factors = folder / "geometry.factors.safetensors"
    factors.write_bytes(b"factors")
    stamp = {"name": factors.name, "size": factors.stat().st_size, "mtime_ns": factors.stat().st_mtime_ns}
    sha = hashlib.sha256(b"{}").hexdigest()
    (folder / "run.json").write_bytes(orjson.dumps({"cache_key": key, "geometry_sha256": sha, "factors_file": stamp}))


def test_an_edited_geometry_is_not_reused(tmp_path):
    key = cache_key("minilm", OPTIONS)
    fake_previous_run(tmp_path, key)
    assert reusable_geometry(tmp_path, key)
    (tmp_path / "geometry.json").write_text('{"edited": 1}')
    assert not reusable_geometry(tmp_path, key)


def test_a_deleted_or_replaced_factors_file_means_extracting_again(tmp_path):
    key = cache_key("minilm", OPTIONS)
    fake_previous_run(tmp_path, key)
    factors = tmp_path / "geometry.factors.safetensors"
    os.utime(factors, ns=(1, 1))
    assert not reusable_geometry(tmp_path, key)
    fake_previous_run(tmp_path, key)
    factors.unlink()
    assert not reusable_geometry(tmp_path, key)


def test_a_model_folder_is_identified_by_its_files(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = model_identity(str(model))
    os.utime(model / "config.json", ns=(1, 1))
    assert model_identity(str(model)) != before
    assert before["path"] == str(model.resolve())


def test_default_output_folder(tmp_path):
    assert default_out_dir("minilm", tmp_path) == tmp_path / "minilm"
    assert default_out_dir(str(tmp_path / "models" / "tiny.gguf"), tmp_path) == tmp_path / "tiny"
    (tmp_path / "llama").mkdir()
    assert default_out_dir(str(tmp_path / "llama"), tmp_path) == tmp_path / "llama-qkspectra"  # never inside the model


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-model"], "neither a bundled model"),
        (["minilm", "--corpus", "no-such-corpus.txt"], "corpus no-such-corpus.txt does not exist"),
        (["minilm", "--max-tokens", "0"], "--max-tokens must be between 1 and"),
        (["minilm", "--max-tokens", "100000000000000000000"], "--max-tokens must be between 1 and"),
        (["minilm", "--groups", "0"], "--groups 0: must be between 1 and the number of layers"),
        (["minilm", "--groups", "99999999999999999999"], "must be between 1 and the number of layers"),
        (["minilm", "--groups", "7"], "--groups 7: must be between 1 and the number of layers (6)"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *args, "--out", str(out), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_folder_in_the_way_of_an_output_stops_the_run_before_it_writes(tmp_path, capsys):
    (tmp_path / "out" / "report.md").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "minilm", "--out", str(tmp_path / "out"), "--quiet", "--no-functional"])
    assert exit_info.value.code == 2 and "report.md: it is a folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.md"]


def test_output_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["run", "--out", str(tmp_path / "file"), "--quiet"])
    assert "exists and is not a folder" in capsys.readouterr().err



@pytest.mark.slow
def test_functional_test_on_request_gets_the_run_options(first_run, monkeypatch):
    import qkspectra.analysis.reconstruction.evidence
    from qkspectra.extract.extraction import factors_path
    from qkspectra.geometry import load_geometry
    from qkspectra.workflow.runner import RunSettings, analysis_document

    effect = {"delta_loss": 0.5, "loss_kind": "final_hidden_cosine_distance", "mean_kl": 0.1, "mean_entropy_shift": 0.2}
    calls = []

    def fake_functional_evidence(model, geometry, anchors, rank_k, options, **kwargs):
        calls.append((model, set(anchors), set(rank_k), options, kwargs))
        return {"control": dict(effect, delta_loss=0.0),
                **{name: {"operator": effect, "num_anchor_layers": anchors[name].num_anchor_layers,
                          "replaced_layers": anchors[name].num_fitted_layers} for name in anchors}}

    monkeypatch.setattr(qkspectra.analysis.reconstruction.evidence, "functional_evidence", fake_functional_evidence)
    geometry_path = first_run[0].out_dir / "geometry.json"
    options = ExtractOptions(max_tokens=100_000, seq_len=64, fold_ln=True, quiet=True)
    document = analysis_document(load_geometry(geometry_path), factors_path(geometry_path), RunSettings(options), model="minilm")
    ((model, anchors, rank_k, passed, kwargs),) = calls
    assert model == "minilm" and anchors == rank_k == {"last", "middle", "best", "group"}
    assert passed == options and kwargs == {"max_tokens": 2048}
    assert document["functional"]["last"]["operator"]["delta_loss"] == 0.5
    assert document["verdict"]["layers"]["functional"]["code"] == "rejected"


def test_an_extraction_survives_a_failure_after_it(tmp_path, monkeypatch):
    import qkspectra.extract.extraction
    import qkspectra.workflow.runner
    from qkspectra.errors import QkspectraError

    golden = Path(__file__).parent / "data" / "golden" / "minilm_like.json"
    extractions = []

    def fake_extract_to_files(subject, out, *, options):
        extractions.append(subject.model)
        shutil.copy(golden, out)
        qkspectra.extract.extraction.factors_path(out).write_bytes(b"stand-in factors")  # never read (see below)

    def failing_analysis(*args, **kwargs):
        raise QkspectraError("--groups 99: must be between 1 and the number of layers (6)")

    monkeypatch.setattr(qkspectra.extract.extraction, "extract_to_files", fake_extract_to_files)
    with monkeypatch.context() as patch:
        patch.setattr(qkspectra.workflow.runner, "analysis_document", failing_analysis)
        with pytest.raises(QkspectraError):
            run("minilm", tmp_path, RunSettings(OPTIONS, functional=False))
    record = orjson.loads((tmp_path / "run.json").read_bytes())
    assert record["extraction"] == "performed" and record["finished"] is None
    assert not (tmp_path / "analysis.json").exists()
    analysis_document = qkspectra.workflow.runner.analysis_document
    monkeypatch.setattr(qkspectra.workflow.runner, "analysis_document",  # analyse without the stand-in factors
                        lambda geometry, factors, *args, **kw: analysis_document(geometry, tmp_path / "absent", *args, **kw))
    result = run("minilm", tmp_path, RunSettings(OPTIONS, functional=False))  # the stand-in geometry is not minilm's
    assert extractions == ["minilm"] and not result.extracted
    assert orjson.loads((tmp_path / "run.json").read_bytes())["finished"] is not None


@pytest.mark.parametrize("architecture", ["bert", "falcon"])
def test_a_checkpoint_saved_with_a_task_head_runs_end_to_end(tmp_path, architecture):
    """Its tensors are named under the head's prefix ("bert.", "transformer."); the bare model that the corpus
    pass and the functional test load names them without it. The run's one adapter reads both."""
    import torch
    import transformers

    from qkspectra.models.bundled import bundled_model_path

    torch.manual_seed(0)
    shapes = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if architecture == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(intermediate_size=64, **shapes))
    else:
        model = transformers.FalconForCausalLM(transformers.FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False, **shapes))
    folder = tmp_path / architecture
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(bundled_model_path("minilm")).save_pretrained(folder)
    options = ExtractOptions(seq_len=32, max_tokens=128, quiet=True)
    result = run(str(folder), tmp_path / "out", RunSettings(options, functional_tokens=64))
    assert result.document["functional"]["control"]["delta_loss"] < 1e-4
    assert result.document["verdict"]["layers"]["functional"]["code"] != "n/a"
