"""The Python API: ``extract_geometry`` and ``run`` on models in memory, equal to the command line on the same weights."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

import qkspectra
from qkspectra import QkspectraError
from qkspectra.geometry import load_geometry

SMALL = {"max_tokens": 96, "seq_len": 32, "quiet": True}
SMALL_CLI = ["--max-tokens", "96", "--seq-len", "32", "-q"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from qkspectra.models.bundled import bundled_model_path

    return AutoTokenizer.from_pretrained(bundled_model_path("minilm"))


def tiny_bert(vocab_size: int):
    """An encoder with sharp heads, LayerNorm gains to fold, and the default (SDPA) attention."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                        vocab_size=vocab_size, max_position_embeddings=64)
    model = BertModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm.weight" in name:
                parameter.uniform_(0.5, 1.5)
            elif parameter.ndim == 2 and "embeddings" not in name:
                parameter.normal_(0, 0.3)
    return model


def tiny_llama(vocab_size: int):
    """A causal LM with grouped-query attention and rotary positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def snapshot(model) -> dict:
    """Everything a caller could see change: weights (bitwise), dtypes, devices, modes, gradient flags, attention."""
    return {
        "state": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: p.grad is None for name, p in model.named_parameters()},
        "attention": model.config._attn_implementation,
        "num_key_value_heads": getattr(model.config, "num_key_value_heads", None),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        now = after["state"][name]
        assert now.dtype == tensor.dtype and now.device == tensor.device and torch.equal(now, tensor), name
    for key in ("training", "requires_grad", "grad", "attention", "num_key_value_heads"):
        assert after[key] == before[key], key


def spectra_and_entropy(geometry):
    return geometry.singular_values, geometry.entropy


def test_in_memory_extraction_equals_the_command_line_on_the_saved_weights(tmp_path, tokenizer, cli):
    model = tiny_bert(tokenizer.vocab_size)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert cli(["extract", str(folder), "-o", str(tmp_path / "g.json"), *SMALL_CLI])[0] == 0
    on_disk = load_geometry(tmp_path / "g.json")
    in_memory = qkspectra.extract_geometry(model, tokenizer, **SMALL)
    np.testing.assert_allclose(in_memory.singular_values, on_disk.singular_values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(in_memory.entropy, on_disk.entropy, rtol=0, atol=1e-6)
    assert in_memory.metadata["model_source"].startswith("model in memory: BertModel, float32 on cpu")
    same = {key for key in on_disk.metadata if key not in ("model", "model_source", "factors_file")}
    assert {key: in_memory.metadata[key] for key in same} == {key: on_disk.metadata[key] for key in same}
    assert not (tmp_path / "tiny" / "geometry.json").exists() and len(list(tmp_path.iterdir())) == 3


def test_a_bfloat16_model_is_read_as_it_is_and_left_unchanged(tokenizer):
    model = tiny_llama(tokenizer.vocab_size).to(torch.bfloat16)
    before = snapshot(model)
    geometry = qkspectra.extract_geometry(model, tokenizer, **SMALL)
    assert_unchanged(model, before)
    assert geometry.metadata["dtype"] == "bfloat16"
    # bfloat16 -> float32 is exact, so the spectra equal those of the float32 copy; the forward pass is bfloat16's
    widened = qkspectra.extract_geometry(tiny_llama(tokenizer.vocab_size).to(torch.bfloat16).float(), tokenizer, **SMALL)
    np.testing.assert_allclose(geometry.singular_values, widened.singular_values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry.entropy, widened.entropy, rtol=0, atol=0.05)


def test_a_model_in_training_mode_with_frozen_parts_is_left_as_it_was(tokenizer, tmp_path, monkeypatch):
    model = tiny_bert(tokenizer.vocab_size).train()
    model.embeddings.requires_grad_(False)
    model.encoder.layer[1].eval()  # a mixed state that model.train(True) would not restore
    before = snapshot(model)
    monkeypatch.chdir(tmp_path)
    result = qkspectra.run(model, tokenizer, **SMALL)  # the functional test rewrites a copy, never this model
    assert_unchanged(model, before)
    assert list(tmp_path.iterdir()) == []  # nothing written without out
    assert abs(result.document["functional"]["control"]["delta_loss"]) < 1e-6  # float32 rounding of the rewrite
    assert result.verdict.layers["functional"].code != "n/a"


def test_run_result_exposes_the_document_verdict_strategies_and_figures(tokenizer, tmp_path):
    model = tiny_llama(tokenizer.vocab_size)
    before = snapshot(model)
    result = qkspectra.run(model, tokenizer, tmp_path / "run", **SMALL)
    assert_unchanged(model, before)  # grouped-query heads are expanded in the functional test's copy only
    document = orjson.loads((tmp_path / "run" / "analysis.json").read_bytes())
    assert document == orjson.loads(orjson.dumps(result.document))
    verdict = document["verdict"]
    assert result.verdict.overall == verdict["overall"] and result.verdict.summary == verdict["summary"]
    assert set(result.verdict.layers) == {"spectral", "spectral_vs_null", "operator", "functional"}
    for name, layer in verdict["layers"].items():
        assert result.verdict.layers[name].code == layer["code"]
        assert result.verdict.layers[name].evidence == layer["evidence"]
    assert set(result.strategies) == set(result.analyses) == {"last", "middle", "best", "group"}
    assert result.strategies["best"].rescale.mean_residual == result.analyses["best"].rescale.mean_residual
    figures = result.figures()
    assert list(figures)[:3] == ["evidence", "schedule", "temperature_heatmap"]
    assert {p.stem for p in (tmp_path / "run" / "plots").iterdir()} == set(figures)
    html = result._repr_html_()
    assert f"Overall: {verdict['overall'].upper()}" in html and "Anchor strategies side by side" in html
    assert "<table>" in html and "<script" not in html
    record = orjson.loads((tmp_path / "run" / "run.json").read_bytes())
    assert record["extraction"] == "performed" and record["cache_key"] is None and record["model"] == "LlamaForCausalLM"
    again = qkspectra.run(model, tokenizer, tmp_path / "run", functional=False, **SMALL)  # a model in memory is never reused
    assert orjson.loads((tmp_path / "run" / "run.json").read_bytes())["extraction"] == "performed"
    assert again.document["verdict"]["layers"]["functional"]["code"] == "n/a"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t: qkspectra.extract_geometry(m, t, seq_len=1), r"^seq_len must be at least 2, got 1$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, seq_len="12"), r"^seq_len must be a whole number or None, got '12'$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, fold_ln=1), r"^fold_ln must be True or False, got 1$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, seq_len=64, max_tokens=32),
         r"^max_tokens \(32\) must be at least seq_len \(64\)$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, seq_len=64, window_per_line=True),
         r"^seq_len and window_per_line exclude each other"),
        (lambda m, t: qkspectra.extract_geometry(m, t, seq_len=128), r"^seq_len 128 exceeds the model's max_position_embeddings=64$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, batch_size=0), r"^batch_size must be at least 1, got 0$"),
        (lambda m, t: qkspectra.extract_geometry(m, t, no_fold_ln=True), r"^extract_geometry\(\) has no option 'no_fold_ln'; did you mean 'fold_ln'\? its options: fold_ln, "),
        (lambda m, t: qkspectra.extract_geometry(m), r"the attention-entropy pass needs the model's tokenizer; pass tokenizer=\.\.\., or static_only=True"),
        (lambda m, t: qkspectra.extract_geometry("minilm", t), r"^tokenizer goes with a model in memory"),
        (lambda m, t: qkspectra.extract_geometry(m.state_dict(), t), r"^model must be a bundled model name, a path, or a transformers model in memory; got OrderedDict$"),
        (lambda m, t: qkspectra.extract_geometry("no-such-model"), r"^model 'no-such-model' is neither a bundled model"),
        (lambda m, t: qkspectra.run(m, t, groups=9, **SMALL), r"^groups 9: must be between 1 and the number of layers \(3\)$"),
        (lambda m, t: qkspectra.run(m, t, functional="no"), r"^functional must be True or False, got 'no'$"),
    ],
)
def test_bad_arguments_raise_one_line_errors_naming_python_arguments(tokenizer, call, message):
    model = tiny_bert(tokenizer.vocab_size)
    with pytest.raises(QkspectraError, match=message) as info:
        call(model, tokenizer)
    assert "\n" not in str(info.value) and "--" not in str(info.value)


def test_analyze_with_every_anchor_and_errors_in_python_terms():
    from qkspectra.geometry import parse_geometry

    rng = np.random.default_rng(0)
    sigma = np.sort(rng.uniform(0.1, 2.0, (4, 3, 5)), axis=-1)[..., ::-1]
    g = parse_geometry({"num_layers": 4, "num_heads": 3, "static": [{"metric_singvals_per_head": s.tolist()} for s in sigma]})
    every = qkspectra.analyze_all(g, groups=2)
    assert set(every) == {"last", "middle", "best", "group"}
    assert all(isinstance(a, qkspectra.Analysis) for a in every.values())
    with pytest.raises(QkspectraError, match=r"^anchor 'all' gives one analysis per strategy: use analyze_all\(geometry\)"):
        qkspectra.analyze(g, anchor="all")
    assert every["group"].anchor.groups == qkspectra.analyze(g, anchor="group", groups=2).anchor.groups
    np.testing.assert_array_equal(every["best"].rescale.T, qkspectra.analyze(g, anchor="best").rescale.T)
    assert qkspectra.analyze(g, anchor=np.int64(-1)).anchor.layer == 3
    for anchor, groups, message in [("first", None, r"^anchor 'first': choose last, middle, best, group, all or a layer index$"),
                                    (4, None, r"^anchor 4: the geometry has 4 layers \(valid indices -4 to 3\)$"),
                                    ("group", 5, r"^groups 5: must be between 1 and the number of layers \(4\)$"),
                                    ("best", 2, r"^groups goes with anchor group or anchor all$")]:
        with pytest.raises(QkspectraError, match=message):
            qkspectra.analyze(g, anchor=anchor, groups=groups)


def test_names_and_paths_work_as_on_the_command_line():
    from qkspectra.models.bundled import bundled_model_path

    by_name = qkspectra.extract_geometry("minilm", static_only=True, quiet=True)
    by_path = qkspectra.extract_geometry(bundled_model_path("minilm"), static_only=True, fold_ln=False, quiet=True)
    assert by_name.entropy is None and by_name.metadata["model"] == "minilm" and by_name.metadata["fold_ln"]
    assert by_path.singular_values.shape == by_name.singular_values.shape == (6, 12, 32)
    assert not by_path.metadata["fold_ln"] and not np.allclose(by_path.singular_values, by_name.singular_values)


def test_the_command_line_still_names_its_flags(tmp_path, cli):
    status, _, stderr = cli(["extract", "minilm", "-o", str(tmp_path / "g.json"), "--seq-len", "1", "-q"])
    assert status == 2 and stderr == "qkspectra: error: --seq-len must be at least 2, got 1\n"


# ----------------------------------------------------------------------------
# The model's own device: read and rewritten where it is, never copied whole, put back exactly
# ----------------------------------------------------------------------------


def parts(model) -> dict:
    """The model's parameter and module objects by name (identity, not values)."""
    return {"parameters": {name: id(p) for name, p in model.named_parameters()},
            "modules": {name: id(m) for name, m in model.named_modules()}}


def deep_copy_functional_model(subject, options):
    """The functional test's model before it was rewritten in place: a deep copy of the whole model."""
    import contextlib
    import copy

    from qkspectra.models.adapters import adapter_for

    @contextlib.contextmanager
    def copied():
        model = copy.deepcopy(subject.model.model)
        yield model, subject.model.tokenizer, adapter_for(copy.deepcopy(model.config))

    return copied()


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["grouped-query llama", "bert"])
def test_the_functional_test_rewrites_the_model_in_place_without_copying_it_and_puts_it_back(
        tokenizer, monkeypatch, build):
    import copy

    from torch import nn

    from qkspectra.analysis.reconstruction import evidence

    model = build(tokenizer.vocab_size)
    before, identity = snapshot(model), parts(model)
    real_deepcopy = copy.deepcopy

    def no_model_copies(thing, *args, **kwargs):
        assert not isinstance(thing, nn.Module), "the functional test copied a whole model"
        return real_deepcopy(thing, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(copy, "deepcopy", no_model_copies)
        in_place = qkspectra.run(model, tokenizer, **SMALL)
    assert_unchanged(model, before)
    assert parts(model) == identity
    # the previous way, a deep copy rewritten, gives the very same numbers
    monkeypatch.setattr(evidence, "functional_model", deep_copy_functional_model)
    copied = qkspectra.run(model, tokenizer, **SMALL)
    assert orjson.dumps(in_place.document["functional"]) == orjson.dumps(copied.document["functional"])


def test_a_functional_test_failing_midway_leaves_the_model_exactly_as_it_was(tokenizer, fail_on_the_second_call):
    from qkspectra.analysis.reconstruction.passes import ForwardPasses

    model = tiny_llama(tokenizer.vocab_size)
    before, identity = snapshot(model), parts(model)
    calls = fail_on_the_second_call(ForwardPasses, "compare")
    with pytest.raises(RuntimeError, match="interrupted"):
        qkspectra.run(model, tokenizer, **SMALL)
    assert len(calls) == 2
    assert_unchanged(model, before)
    assert parts(model) == identity
    assert all(module.num_key_value_groups == 2 for module in model.model.layers.modules()
               if hasattr(module, "num_key_value_groups"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"device": "cuda"}, r"^device='cuda', but the model in memory is on cpu; it runs where it is: move it "
                             r"\(model.to\(...\)\) or leave device unset$"),
        ({"device": "mps"}, r"^device='mps', but the model in memory is on cpu"),
        ({"dtype": "bfloat16"}, r"^dtype='bfloat16', but the model in memory is float32; it runs in its own dtype"),
        ({"dtype": "float16", "static_only": True}, r"^dtype='float16', but the model in memory is float32"),
    ],
)
def test_another_device_or_dtype_for_a_model_in_memory_is_refused_in_one_line(tokenizer, options, message):
    model = tiny_llama(tokenizer.vocab_size)
    for call in (qkspectra.extract_geometry, qkspectra.run):
        with pytest.raises(QkspectraError, match=message) as info:
            call(model, tokenizer, **{**SMALL, **options})
        assert "\n" not in str(info.value)


def test_the_model_s_own_device_and_dtype_may_be_named(tokenizer):
    model = tiny_llama(tokenizer.vocab_size)
    named = qkspectra.extract_geometry(model, tokenizer, device="cpu", dtype="float32", **SMALL)
    unnamed = qkspectra.extract_geometry(model, tokenizer, **SMALL)
    np.testing.assert_array_equal(named.entropy, unnamed.entropy)
    assert named.metadata["corpus_device"] == "cpu" and named.metadata["corpus_dtype"] == "float32"


# ----------------------------------------------------------------------------
# The real checkpoint: all-MiniLM-L6-v2 loaded with transformers, against `qkspectra extract` and `run`
# ----------------------------------------------------------------------------

MINILM = {"max_tokens": 256, "seq_len": 64, "quiet": True}
MINILM_CLI = ["--max-tokens", "256", "--seq-len", "64", "-q"]


@pytest.fixture(scope="module")
def minilm_in_memory():
    from transformers import AutoModel, AutoTokenizer

    from qkspectra.models.bundled import bundled_model_path

    path = bundled_model_path("minilm")
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def minilm_cli_run(tmp_path_factory):
    """`qkspectra run minilm` once: its geometry is also `qkspectra extract minilm`'s (same options, same code)."""
    from qkspectra.cli import main

    out = tmp_path_factory.mktemp("cli") / "minilm"
    main(["run", "minilm", "--out", str(out), *MINILM_CLI])
    return out


@pytest.mark.slow
def test_minilm_in_memory_extraction_equals_the_command_line(minilm_in_memory, tmp_path, cli):
    assert cli(["extract", "minilm", "-o", str(tmp_path / "g.json"), *MINILM_CLI])[0] == 0
    expected = load_geometry(tmp_path / "g.json")
    geometry = qkspectra.extract_geometry(*minilm_in_memory, **MINILM)
    np.testing.assert_allclose(geometry.singular_values, expected.singular_values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(geometry.entropy, expected.entropy, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_minilm_in_memory_run_equals_the_command_line(minilm_in_memory, minilm_cli_run):
    model, tokenizer = minilm_in_memory
    before = snapshot(model)
    result = qkspectra.run(model, tokenizer, **MINILM)
    assert_unchanged(model, before)
    expected = orjson.loads((minilm_cli_run / "analysis.json").read_bytes())
    document = orjson.loads(orjson.dumps(result.document))
    assert document.keys() == expected.keys()
    for key in document.keys() - {"input"}:  # input names the file and the model's source
        assert document[key] == expected[key], key
    assert result.verdict.overall == expected["verdict"]["overall"]


# ----------------------------------------------------------------------------
# Runs as files and back, tables, options as on the command line, errors, displays
# ----------------------------------------------------------------------------

import inspect  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from qkspectra import QkspectraTypeError  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden" / "minilm_like.json"
FAST = {"null_draws": 20}  # the nulls are not what these tests are about
FAST_CLI = ["--null-draws", "20"]
RUN_FILES = {"geometry.json", "geometry.factors.safetensors", "analysis.json", "report.html", "report.md", "run.json"}
TABLES_DOC = (Path(__file__).parents[1] / "docs" / "tables.md").read_text()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """tiny_bert saved with its tokenizer: a model folder for `qkspectra run` and for `qkspectra.run` by path."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    tiny_bert(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cli_run(tiny_folder, tmp_path_factory):
    """`qkspectra run` on the tiny folder, functional test included: every section of the document."""
    from qkspectra.cli import main

    out = tmp_path_factory.mktemp("cli-run") / "run"
    main(["run", str(tiny_folder), "--out", str(out), *SMALL_CLI, *FAST_CLI])
    return out


@pytest.fixture(scope="module")
def tiny_in_memory(tiny_folder):
    """The same run from Python, nothing written."""
    return qkspectra.run(tiny_folder, **SMALL, **FAST)


def run_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_writes_what_run_out_writes_byte_for_byte(tiny_in_memory, tiny_cli_run, tiny_folder, tmp_path):
    from qkspectra.extract.extraction import ExtractOptions
    from qkspectra.workflow.runner import cache_key, reusable_geometry

    assert tiny_in_memory.out_dir is None and tiny_in_memory.factors is not None
    saved = tiny_in_memory.save(tmp_path / "saved")
    expected, written = run_files(tiny_cli_run), run_files(tmp_path / "saved")
    assert written.keys() == expected.keys() and RUN_FILES <= written.keys()
    for name in expected.keys() - {"run.json"}:  # plots and pages included
        assert written[name] == expected[name], name
    record, cli_record = (orjson.loads(files["run.json"]) for files in (written, expected))
    assert record.keys() == cli_record.keys()
    assert {key for key in record if record[key] != cli_record[key]} <= {"started", "finished", "timings", "factors_file"}
    options = ExtractOptions(max_tokens=96, seq_len=32, quiet=True)
    assert reusable_geometry(tmp_path / "saved", cache_key(str(tiny_folder), options))  # a later `run` reuses it
    assert saved == qkspectra.load_run(tmp_path / "saved") and saved.out_dir == tmp_path / "saved"
    assert saved.document["input"]["file"] == "geometry.json" and tiny_in_memory.document["input"]["file"] != "geometry.json"


def test_load_run_equals_the_run_that_wrote_it_and_saves_the_same_files(tiny_folder, tmp_path):
    written = qkspectra.run(tiny_folder, out=tmp_path / "run", functional=False, **SMALL, **FAST)
    loaded = qkspectra.load_run(tmp_path / "run")
    assert loaded == written and loaded.document == written.document and loaded.geometry == written.geometry
    assert loaded.out_dir == written.out_dir and loaded.record == written.record
    assert loaded.document["verdict"]["layers"]["functional"]["code"] == "n/a"
    again = loaded.save(tmp_path / "copy")  # the factors file copied from beside the loaded geometry
    original, copy = run_files(tmp_path / "run"), run_files(tmp_path / "copy")
    assert copy.keys() == original.keys()
    assert all(copy[name] == original[name] for name in original.keys() - {"run.json"})
    assert again == qkspectra.load_run(tmp_path / "copy") and again != loaded  # another folder


def test_run_on_a_geometry_is_the_analysis_part(tiny_cli_run, tmp_path):
    from qkspectra.workflow.runner import NO_MODEL

    geometry = qkspectra.load_geometry(tiny_cli_run / "geometry.json")
    by_path = qkspectra.run(tiny_cli_run / "geometry.json", **FAST)
    by_object = qkspectra.run(geometry, **FAST)
    assert by_path == by_object and by_path.out_dir is None and by_path.record["extraction"] == "given"
    expected = orjson.loads((tiny_cli_run / "analysis.json").read_bytes())
    assert "functional" not in by_path.document  # the test needs the model
    assert {key for key in expected if expected[key] != by_path.document.get(key)} == {"functional", "verdict"}
    assert by_path.document.keys() == expected.keys() - {"functional"}
    layers = by_path.verdict.layers
    assert layers.functional.code == "n/a" and layers.functional.evidence == f"No functional evidence: {NO_MODEL}."
    assert layers.operator.evidence == expected["verdict"]["layers"]["operator"]["evidence"]  # the factors beside it
    with pytest.raises(QkspectraError, match=r"^max_tokens is an extraction option; run was given a geometry"):
        qkspectra.run(geometry, max_tokens=64)
    with pytest.raises(QkspectraError, match=r"^tokenizer goes with a model in memory; run was given a geometry$"):
        qkspectra.run(geometry, object())


def test_analyze_takes_a_geometry_file_and_returns_one_type():
    by_path = qkspectra.analyze(GOLDEN, anchor="best")
    by_string = qkspectra.analyze(str(GOLDEN), anchor="best")
    assert isinstance(by_path, qkspectra.Analysis) and isinstance(by_string, qkspectra.Analysis)
    np.testing.assert_array_equal(by_path.rescale.T, qkspectra.analyze(load_geometry(GOLDEN), "best").rescale.T)
    every = qkspectra.analyze_all(GOLDEN, groups=2)
    np.testing.assert_array_equal(every["best"].rescale.residual, by_path.rescale.residual)
    for strategy in ("last", "middle", "best", "group", 0, -1, np.int64(2)):
        assert type(qkspectra.analyze(GOLDEN, strategy)) is qkspectra.Analysis


def test_tables_hold_the_documents_figures(tiny_in_memory):
    pandas = pytest.importorskip("pandas")
    r, document = tiny_in_memory, tiny_in_memory.document
    L, H = r.geometry.num_layers, r.geometry.num_heads
    heads, layers, strategies = r.heads(), r.layers(), r.strategy_table()
    assert isinstance(heads, pandas.DataFrame) and heads.shape[0] == L * H and layers.shape[0] == L
    assert list(heads["layer"]) == [layer for layer in range(L) for _ in range(H)] and list(heads["head"][:H]) == list(range(H))
    for name, s in document["strategies"].items():
        np.testing.assert_array_equal(heads[f"T_{name}"].to_numpy().reshape(L, H), s["rescale"]["T"])
        np.testing.assert_array_equal(heads[f"residual_{name}"].to_numpy().reshape(L, H), s["rescale"]["residual"])
        assert list(heads[f"fitted_{name}"][::H]) == [a != layer for layer, a in enumerate(s["anchor"]["layers"])]
        np.testing.assert_array_equal(heads[f"operator_residual_{name}"].to_numpy().reshape(L, H), document["operator"][name]["residual"])
        np.testing.assert_array_equal(heads[f"functional_kl_operator_{name}"].to_numpy().reshape(L, H),
                                      document["functional"][name]["operator"]["per_head_kl"])
        np.testing.assert_array_equal(layers[f"mean_T_{name}"], s["rescale"]["per_layer"]["mean_T"])
        assert strategies.loc[name, "mean_residual_fitted"] == s["rescale"]["mean_residual_fitted"]
        assert strategies.loc[name, "seed_verdict"] == s["verdict"]["code"]
    np.testing.assert_array_equal(heads["entropy"].to_numpy().reshape(L, H), r.geometry.entropy)
    static = r.geometry.document["static"]
    np.testing.assert_array_equal(heads["op_norm"].to_numpy().reshape(L, H), [row["operator_norm_per_head"] for row in static])
    assert {"normalized_entropy", "sink_mass", "stable_rank", "effective_rank", "rank_k_operator_last"} <= set(heads.columns)
    report_columns = ["anchor_layers", "num_anchor_layers", "num_fitted_layers", "mean_residual_fitted", "mean_residual",
                      "max_residual", "frac_below_0_10_fitted", "frac_below_0_20_fitted", "corr_T_entropy",
                      "single_spectrum_mean_residual", "seed_verdict"]
    assert list(strategies.index) == list(document["strategies"]) and list(strategies.columns[:11]) == report_columns
    for column in [*heads.columns, *layers.columns, *strategies.columns]:
        assert f"`{re.sub(r'_(last|middle|best|group)$', '_{strategy}', column)}`" in TABLES_DOC, column


def test_run_options_are_the_command_lines_one_to_one():
    from qkspectra.cli.run import run as command

    python_names = {"no_fold_ln": "fold_ln", "no_functional": "functional"}  # the flags that turn a default off
    cli = {python_names.get(name, name): p.default for name, p in inspect.signature(command).parameters.items()}
    ours = {name: p.default for name, p in inspect.signature(qkspectra.run).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD and name != "tokenizer"}
    assert ours.keys() == cli.keys()
    for name, default in cli.items():
        if name in python_names.values():
            assert ours[name] is (not default), name
        elif name != "model":
            assert ours[name] == default, name


@pytest.mark.parametrize(
    "call, kind, message",
    [
        (lambda: qkspectra.run("minilm", null_draw=5), QkspectraTypeError,
         r"^run\(\) has no option 'null_draw'; did you mean 'null_draws'\? its options: out, fold_ln, .*, scheduler$"),
        (lambda: qkspectra.run("minilm", colour="red"), QkspectraTypeError, r"^run\(\) has no option 'colour'; its options: out, "),
        (lambda: qkspectra.run("minilm", seed="0"), QkspectraTypeError, r"^seed must be a whole number, got '0'$"),
        (lambda: qkspectra.run("minilm", null_draws=0), QkspectraError, r"^null_draws 0: must be between 1 and 100000$"),
        (lambda: qkspectra.run(GOLDEN, out=3), QkspectraTypeError, r"^out must be a string or a path, got 3$"),
        (lambda: qkspectra.run("minilm", "minilm-run"), QkspectraTypeError,
         r"^tokenizer must be a tokenizer object, got the string 'minilm-run'; the run folder is out=\.\.\.$"),
        (lambda: qkspectra.analyze(42), QkspectraTypeError, r"^geometry must be a Geometry or a geometry file's path, got int$"),
        (lambda: qkspectra.analyze(GOLDEN, anchor=1.5), QkspectraTypeError, r"^anchor must be last, middle, best, group or a layer index"),
        (lambda: qkspectra.analyze(GOLDEN, anchor="best", groups="2"), QkspectraTypeError, r"^groups must be a whole number or None"),
        (lambda: qkspectra.analyze(GOLDEN.with_name("none.json")), QkspectraError, r"none\.json: no such file$"),
        (lambda: qkspectra.load_run(GOLDEN.parent), QkspectraError, r"golden: no analysis\.json here; a run folder holds"),
        (lambda: qkspectra.load_run(GOLDEN), QkspectraError, r"minilm_like\.json: not a folder"),
        (lambda: qkspectra.load_sweep(GOLDEN.parent), QkspectraError, r"golden: no sweep\.json here"),
    ],
)
def test_bad_calls_raise_value_or_type_errors(call, kind, message):
    with pytest.raises(kind, match=message) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, QkspectraError)
    assert isinstance(info.value, TypeError) == (kind is QkspectraTypeError)
    assert "\n" not in str(info.value)


def test_the_command_line_prints_a_type_error_as_one_line(monkeypatch, cli):
    def wrong_type(*args, **kwargs):
        raise QkspectraTypeError("out must be a string or a path, got 3")

    monkeypatch.setattr("qkspectra.geometry.load_geometry", wrong_type)
    assert cli(["analyze", str(GOLDEN)]) == (2, "", "qkspectra: error: out must be a string or a path, got 3\n")


def test_displays_are_short(tiny_in_memory):
    g = tiny_in_memory.geometry
    a = qkspectra.analyze(g, "group")
    for shown in (g, a, tiny_in_memory):
        text = repr(shown)
        assert "\n" not in text and len(text) < 250 and "[" not in text, text
        html = shown._repr_html_()
        assert html.startswith("<div") and "<script" not in html and len(html) < 20_000
    assert repr(g).startswith("<Geometry ") and "3 layers × 4 heads" in repr(g) and "max rank 8" in repr(g)
    assert repr(a).startswith("<Analysis ") and "anchor group" in repr(a) and "(spectral layer only)" in repr(a) and "seed" not in repr(a)


def test_an_analysis_carries_the_one_verdict_not_the_seeds():
    from pathlib import Path

    path = Path(__file__).parent / "data" / "golden" / "minilm_like.json"
    a = qkspectra.analyze(path)
    assert a.verdict.overall == "partial" and a.verdict.layers["spectral"].code == "partial"  # never "supported" alone
    assert a.verdict.layers["spectral_vs_null"].code == a.verdict.layers["operator"].code == "n/a"
    assert a.verdict_code == "supported"  # the seed's rule on its all-layer residual, kept for reproduction
    assert "verdict partial" in repr(a) and "supported" not in repr(a) and "supported" not in a._repr_html_()
    assert {a.verdict.overall for a in qkspectra.analyze_all(path).values()} == {"partial"}
