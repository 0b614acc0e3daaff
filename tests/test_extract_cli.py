"""``qkspectra extract`` end to end: outputs, options, and one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModel, AutoTokenizer, BertConfig, GPT2Config, MistralConfig

from qkspectra.models.bundled import bundled_model_path


def tiny_folder(path, config):
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    return path


def test_static_only_minilm_writes_schema_metadata_and_factors(tmp_path, cli):
    out = tmp_path / "geometry.json"
    status, stdout, stderr = cli(["extract", "-o", str(out), "--static-only", "--quiet"])
    assert (status, stdout, stderr) == (0, "", "")
    geometry = json.loads(out.read_text())
    assert (geometry["num_layers"], geometry["num_heads"]) == (6, 12)
    assert "dynamic" not in geometry
    assert len(geometry["static"]) == 6
    row = geometry["static"][0]
    assert np.shape(row["metric_singvals_per_head"]) == (12, 32)
    for key in ("operator_norm", "frobenius_norm", "stable_rank", "effective_rank"):
        assert len(row[f"{key}_per_head"]) == 12
    metadata = geometry["metadata"]
    assert metadata["model"] == "minilm" and metadata["model_type"] == "bert"
    assert (metadata["d_model"], metadata["d_head"], metadata["num_kv_heads"]) == (384, 32, 12)
    assert metadata["fold_ln"] is True and metadata["scale"] == pytest.approx(32**-0.5)
    assert metadata["factors_file"] == "geometry.factors.safetensors"
    import qkspectra

    assert metadata["qkspectra_version"] == qkspectra.__version__
    factors = load_file(tmp_path / "geometry.factors.safetensors")
    assert factors["W_Q"].shape == factors["W_K"].shape == (6, 12, 384, 32)
    assert factors["b_Q"].shape == factors["b_K"].shape == (6, 12, 32)
    # The factors carry the scale: W_Q W_K^T is the metric whose spectrum the JSON holds.
    metric = factors["W_Q"][3, 5].astype(np.float64) @ factors["W_K"][3, 5].T.astype(np.float64)
    np.testing.assert_allclose(np.linalg.svd(metric, compute_uv=False)[:32],
                               geometry["static"][3]["metric_singvals_per_head"][5], rtol=1e-4, atol=1e-6)


def test_no_fold_ln_is_recorded_and_changes_spectra(tmp_path, cli):
    folded, raw = tmp_path / "folded.json", tmp_path / "raw.json"
    assert cli(["extract", "minilm", "-o", str(folded), "--static-only", "-q"])[0] == 0
    assert cli(["extract", "minilm", "-o", str(raw), "--static-only", "--no-fold-ln", "-q"])[0] == 0
    folded, raw = json.loads(folded.read_text()), json.loads(raw.read_text())
    assert raw["metadata"]["fold_ln"] is False and raw["metadata"]["norm_folded_per_layer"] == [False] * 6
    assert raw["static"][0]["metric_singvals_per_head"] != folded["static"][0]["metric_singvals_per_head"]


def test_dynamic_pass_on_a_small_corpus(tmp_path, cli):
    text = tmp_path / "corpus.txt"
    text.write_text("The cat sat on the mat while the dog slept by the door. " * 40)
    out = tmp_path / "geometry.json"
    status, _, stderr = cli(["extract", "-o", str(out), "--corpus", str(text), "--seq-len", "32",
                             "--max-tokens", "128", "-q"])
    assert (status, stderr) == (0, "")
    geometry = json.loads(out.read_text())
    assert len(geometry["dynamic"]) == 6
    entropies = np.array([row["mean_attention_entropy_per_head"] for row in geometry["dynamic"]])
    assert entropies.shape == (6, 12)
    assert np.all((entropies >= 0) & (entropies <= np.log(32) + 1e-9))
    metadata = geometry["metadata"]
    assert (metadata["seq_len"], metadata["num_windows"], metadata["num_tokens"]) == (32, 4, 128)
    assert len(metadata["corpus_sha256"]) == 64 and "corpus.txt" in metadata["corpus"]
    assert (metadata["corpus_device"], metadata["corpus_dtype"], metadata["entropy_dtype"]) == ("cpu", "float32", "float32")
    assert metadata["queries_by_position"] == [4, 8, 16, 32, 64, 4]  # positions 1, 2-3, ..., 32-63 (only 32)
    assert np.shape(geometry["dynamic"][0]["entropy_by_position_per_head"]) == (12, 6)
    assert np.shape(geometry["dynamic"][0]["entropy_without_first_by_position_per_head"]) == (12, 6)

    half = tmp_path / "bfloat16.json"
    status, _, stderr = cli(["extract", "-o", str(half), "--corpus", str(text), "--seq-len", "32",
                             "--max-tokens", "128", "--device", "cpu", "--dtype", "bfloat16", "-q"])
    assert (status, stderr) == (0, "")
    geometry = json.loads(half.read_text())
    assert geometry["metadata"]["corpus_dtype"] == "bfloat16"
    half_entropies = np.array([row["mean_attention_entropy_per_head"] for row in geometry["dynamic"]])
    np.testing.assert_allclose(half_entropies, entropies, atol=0.03)  # MiniLM: bfloat16 within 0.012 nats (docs/extraction.md)


def test_tiny_sharded_folder_static_only(tmp_path, cli):
    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    AutoModel.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50)).save_pretrained(
        folder, max_shard_size="20KB")
    out = tmp_path / "g.json"
    assert cli(["extract", str(folder), "-o", str(out), "--static-only", "-q"])[0] == 0
    geometry = json.loads(out.read_text())
    assert (geometry["num_layers"], geometry["num_heads"]) == (2, 4)
    assert geometry["metadata"]["model_type"] == "gpt2"


def test_progress_goes_to_stderr_and_quiet_silences_it(tmp_path, cli):
    status, stdout, stderr = cli(["extract", "-o", str(tmp_path / "g.json"), "--static-only"])
    assert status == 0 and stdout == ""
    assert "static spectra" in stderr and "wrote" in stderr


def corrupt_folder(tmp_path):
    folder = tiny_folder(tmp_path / "corrupt", GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def garbage_gguf(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


def truncated_gguf(tmp_path):
    """The bundled GGUF cut inside its header block (the reader fails with struct.error there)."""
    path = tmp_path / "garbage-truncated.gguf"
    with open(bundled_model_path("smollm2"), "rb") as f:
        path.write_bytes(f.read(500_000))
    return path


def truncated_shard_folder(tmp_path):
    """A sharded checkpoint whose second shard lost its tail; a tokenizer so that the corpus pass loads the model."""
    folder = tmp_path / "sharded"
    AutoModel.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=30522)).save_pretrained(
        folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(bundled_model_path("minilm")).save_pretrained(folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return folder


def config_only_folder(tmp_path, content):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(content))
    return folder


ERRORS = {
    "missing-path": (lambda p: ["/no/such/model"], "neither a bundled model"),
    "no-config": (lambda p: [str(p)], "has no config.json"),
    "corrupt-weights": (lambda p: [str(corrupt_folder(p))], "corrupt or truncated"),
    "no-weights": (lambda p: [str(config_only_folder(p, {"model_type": "gpt2"}))], "has no model.safetensors"),
    "not-a-gguf": (lambda p: [str(garbage_gguf(p))], "cannot read GGUF file"),
    "truncated-gguf": (lambda p: [str(truncated_gguf(p))], "cannot read GGUF file"),
    "truncated-shard": (lambda p: [str(truncated_shard_folder(p)), "--max-tokens", "64"], "cannot load the weights"),
    "unsupported-type": (lambda p: [str(config_only_folder(p, {"model_type": "t5"}))], "model type 't5' cannot be read"),
    "empty-corpus": (lambda p: ["--corpus", str(p / "empty.txt")], "holds no text"),
    "missing-corpus": (lambda p: ["--corpus", str(p / "nope.txt")], "does not exist"),
    "seq-len-1": (lambda p: ["--seq-len", "1"], "--seq-len must be at least 2"),
    "max-tokens-below-seq-len": (lambda p: ["--seq-len", "64", "--max-tokens", "32"], "must be at least --seq-len"),
    "seq-len-with-window-per-line": (lambda p: ["--seq-len", "64", "--window-per-line"], "exclude each other"),
    "seq-len-beyond-positions": (lambda p: ["--seq-len", "1024"], "exceeds the model's max_position_embeddings=512"),
    "missing-device": (lambda p: ["--device", "cuda:63"], "--device cuda:63: this machine has"),
    "unknown-device": (lambda p: ["--device", "gpu"], "--device 'gpu' is not one of"),
    "unknown-dtype": (lambda p: ["--dtype", "float8"], "--dtype 'float8' is not one of"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, model_cache, cli):
    (tmp_path / "empty.txt").write_text("  \n\n")
    arguments, message = ERRORS[case]
    out_dir = tmp_path / "out"
    argv = ["extract", *arguments(tmp_path), "-o", str(out_dir / "g.json"), "-q"]
    capsys.readouterr()  # drop what building the fixture folders printed
    status, stdout, stderr = cli(argv)
    assert status == 2
    assert stderr.startswith("qkspectra: error: ") and stderr.count("\n") == 1 and message in stderr
    assert not out_dir.exists()
    assert not [p for p in model_cache.iterdir() if p.name.lstrip(".").startswith("garbage")]  # nothing half-converted


def test_a_fault_in_a_later_layer_leaves_no_file_and_no_folder(tmp_path, capsys, cli):
    """NaN weights in layer 1 are found after layer 0's factors were streamed: nothing may remain, not even folders."""
    model = AutoModel.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    with torch.no_grad():
        model.h[1].attn.c_attn.weight[3, 5] = float("nan")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    capsys.readouterr()
    status, _, stderr = cli(["extract", str(folder), "-o", str(tmp_path / "out" / "sub" / "g.json"), "--static-only", "-q"])
    assert status == 2 and "layer 1: the checkpoint's query/key weights are not all finite" in stderr
    assert not (tmp_path / "out").exists()


def test_factors_beyond_float32_are_refused_not_written(tmp_path, capsys, cli):
    """Stored weights near float32's limit fold (with a LayerNorm bias) into biases beyond it."""
    model = AutoModel.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    with torch.no_grad():
        model.h[0].attn.c_attn.weight.fill_(3e38)
        model.h[0].ln_1.bias.fill_(1.0)
    folder = tmp_path / "huge-model"
    model.save_pretrained(folder)
    capsys.readouterr()
    status, _, stderr = cli(["extract", str(folder), "-o", str(tmp_path / "out" / "g.json"), "--static-only", "-q"])
    assert status == 2 and "layer 0: the query/key factors exceed float32's range" in stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_tokenizer_is_refused_for_the_corpus_pass(tmp_path, capsys, cli):
    folder = tiny_folder(tmp_path / "no-tokenizer", GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50))
    capsys.readouterr()
    status, _, stderr = cli(["extract", str(folder), "-o", str(tmp_path / "g.json"), "--max-tokens", "64", "-q"])
    assert status == 2 and "has no tokenizer" in stderr and stderr.count("\n") == 1
    assert cli(["extract", str(folder), "-o", str(tmp_path / "g.json"), "--static-only", "-q"])[0] == 0


def test_sliding_window_shorter_than_windows_is_refused(tmp_path, cli):
    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    folder = tiny_folder(tmp_path / "mistral", config)
    # Static spectra do not depend on the window: allowed.
    assert cli(["extract", str(folder), "-o", str(tmp_path / "s.json"), "--static-only", "-q"])[0] == 0
    AutoTokenizer.from_pretrained(bundled_model_path("minilm")).save_pretrained(folder)  # any tokenizer will do
    status, _, stderr = cli(["extract", str(folder), "-o", str(tmp_path / "d.json"), "--seq-len", "16",
                             "--max-tokens", "64", "-q"])
    assert status == 2 and "sliding_window=8, shorter than the sequence length 16" in stderr
    assert not (tmp_path / "d.json").exists()


def test_subprocess_error_is_one_line_on_stderr(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qkspectra", "extract", str(tmp_path / "missing.gguf"),
                             "-o", str(tmp_path / "g.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "neither a bundled model" in result.stderr


def test_streamed_factors_equal_in_memory_factors(tmp_path):
    from qkspectra.extract.extraction import ExtractOptions, extract_to_files, geometry_document, run_extraction, write_outputs

    options = ExtractOptions(static_only=True, quiet=True)
    streamed_json, streamed = extract_to_files("minilm", tmp_path / "streamed.json", options=options)
    in_memory = run_extraction("minilm", options=options)
    _, kept = write_outputs(in_memory, tmp_path / "kept.json")
    assert streamed.read_bytes() == kept.read_bytes()
    for name, tensor in load_file(streamed).items():
        np.testing.assert_array_equal(tensor, in_memory.factors[name])
    geometry = geometry_document("minilm", options=options)
    assert geometry["static"] == json.loads(streamed_json.read_text())["static"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept.factors.safetensors", "kept.json", "streamed.factors.safetensors", "streamed.json"]


def test_factors_file_appears_only_when_committed(tmp_path):
    from qkspectra.errors import QkspectraError
    from qkspectra.extract.factors_file import FactorsFileWriter

    layer = {"W_Q": np.ones((2, 4, 3)), "b_Q": np.zeros((2, 3))}
    with FactorsFileWriter(tmp_path / "f.safetensors", 2, {"model": "x"}) as writer:
        writer.write_layer(1, layer)
        with pytest.raises(QkspectraError, match=r"layers \[0\] were never written"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QkspectraError, match="has shape"):
        with FactorsFileWriter(tmp_path / "f.safetensors", 2, {}) as writer:
            writer.write_layer(0, layer)
            writer.write_layer(1, {"W_Q": np.ones((2, 4, 4)), "b_Q": np.zeros((2, 3))})
    assert list(tmp_path.iterdir()) == []
    with FactorsFileWriter(tmp_path / "f.safetensors", 2, {"model": "x"}) as writer:
        writer.write_layer(1, {"W_Q": 2 * np.ones((2, 4, 3)), "b_Q": np.ones((2, 3))})
        writer.write_layer(0, layer)
        writer.commit()
    loaded = load_file(tmp_path / "f.safetensors")
    np.testing.assert_array_equal(loaded["W_Q"][:, 0, 0, 0], [1, 2])
    np.testing.assert_array_equal(loaded["b_Q"][:, 0, 0], [0, 1])


def test_window_per_line_entropies_equal_the_models_own_maps(tmp_path, cli):
    """Acceptance: `extract --corpus FILE --window-per-line` against eager attention maps, line by line."""
    lines = [
        "Attention heads score queries against keys.",
        "",
        "A temperature schedule would make early layers softer and late layers sharper, or the other way round.",
        "Short line.",
        "The quick brown fox jumps over the lazy dog " * 6,
    ]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "geometry.json"
    status, _, stderr = cli(["extract", "minilm", "-o", str(out), "--corpus", str(corpus), "--window-per-line", "-q"])
    assert (status, stderr) == (0, "")
    ours = np.array([row["mean_attention_entropy_per_head"] for row in json.loads(out.read_text())["dynamic"]])  # (L, H)

    folder = bundled_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    dynamic = json.loads(out.read_text())["dynamic"]
    normalized = np.array([row["mean_normalized_entropy_per_head"] for row in dynamic])  # (L, H)
    sink = np.array([row["mean_sink_mass_per_head"] for row in dynamic])  # (L, H)
    without_first = np.array([row["mean_attention_entropy_without_first_per_head"] for row in dynamic])  # (L, H)
    total, total_normalized, total_sink, count = np.zeros((6, 12)), np.zeros((6, 12)), np.zeros((6, 12)), 0
    total_without_first = np.zeros((6, 12))
    with torch.no_grad():
        for line in filter(None, lines):
            ids = tokenizer(line, return_tensors="pt")["input_ids"]  # (1, seq), default special tokens
            maps = model(input_ids=ids, output_attentions=True).attentions  # L x (1, H, seq, seq)
            for layer, p in enumerate(maps):
                p = p[0].double()  # (H, query_pos, key_pos); every query sees all seq keys (seq > 1 here)
                entropy = torch.special.entr(p).sum(-1)  # (H, query_pos)
                total[layer] += entropy.sum(-1).numpy()  # summed over queries
                total_normalized[layer] += (entropy / np.log(ids.shape[1])).sum(-1).numpy()
                total_sink[layer] += p[..., 0].sum(-1).numpy()
                others = p[..., 1:] / p[..., 1:].sum(-1, keepdim=True)  # renormalised without the first position
                total_without_first[layer] += torch.special.entr(others).sum(-1).sum(-1).numpy()
            count += ids.shape[1]
    np.testing.assert_allclose(ours, total / count, atol=1e-4, rtol=0)
    np.testing.assert_allclose(normalized, total_normalized / count, atol=1e-4, rtol=0)
    np.testing.assert_allclose(sink, total_sink / count, atol=1e-4, rtol=0)
    np.testing.assert_allclose(without_first, total_without_first / count, atol=1e-4, rtol=0)


def test_window_per_line_cuts_lines_at_the_models_own_maximum(tmp_path, capsys, cli):
    """A model with a 64-position table behind a 512-token tokenizer: a long line becomes one 64-token window."""
    folder = tiny_folder(tmp_path / "short-bert", BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=37,
                                                              max_position_embeddings=64))
    AutoTokenizer.from_pretrained(bundled_model_path("minilm")).save_pretrained(folder)
    (tmp_path / "lines.txt").write_text("word " * 100 + "\nA short line.\n")
    out = tmp_path / "g.json"
    capsys.readouterr()  # drop what saving the folder printed
    status, _, stderr = cli(["extract", str(folder), "-o", str(out), "--corpus", str(tmp_path / "lines.txt"),
                             "--window-per-line", "--max-tokens", "1000", "-q"])
    assert (status, stderr) == (0, "")
    metadata = json.loads(out.read_text())["metadata"]
    assert (metadata["num_windows"], metadata["num_tokens"], metadata["seq_len"]) == (2, 64 + 6, None)


def test_analyze_uses_the_factors_file_beside_the_geometry(tmp_path, cli):
    out = tmp_path / "geometry.json"
    assert cli(["extract", "minilm", "-o", str(out), "--static-only", "--no-fold-ln", "-q"])[0] == 0
    status, stdout, stderr = cli(["analyze", str(out), "--json", str(tmp_path / "a.json")])
    assert (status, stderr) == (0, "")
    document = json.loads((tmp_path / "a.json").read_text())
    assert "=== Operator level (from the factors file) ===" in stdout
    # MiniLM, raw weights, anchor last, same head: the operators share almost nothing.
    assert 0.8 < document["operator"]["last"]["mean_residual"] < 0.9
    assert document["rank_k"]["last"]["operator"]["mean_k"] > 10
    assert document["verdict"]["layers"]["operator"]["code"] == "rejected"
    (tmp_path / "geometry.factors.safetensors").unlink()
    cli(["analyze", str(out), "--json", str(tmp_path / "b.json")])
    document = json.loads((tmp_path / "b.json").read_text())
    assert "operator" not in document
    assert document["verdict"]["layers"]["operator"]["code"] == "n/a"
    (tmp_path / "geometry.factors.safetensors").mkdir()  # a folder in its place is an error, not "no factors"
    status, _, stderr = cli(["analyze", str(out), "-q"])
    assert status == 2 and "geometry.factors.safetensors: the geometry names this as its factors file" in stderr
