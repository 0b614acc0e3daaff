"""GGUF files read tensor by tensor (``models.gguf_tensors``): the same values as transformers'
whole-model load, only the attention tensors dequantised, truncated files said in one line."""

from __future__ import annotations

import numpy as np
import pytest

from qkspectra.errors import QkspectraError
from qkspectra.extract.spectra import static_spectra
from qkspectra.models.adapters import adapter_for
from qkspectra.models.gguf_tensors import GGUFTensorSource, legacy_config_dict, read_gguf, read_layout
from qkspectra.models.gguf_write import write_decoder_gguf
from qkspectra.models.tensors import StateDictSource

MIXED = {"attn_q.weight": "Q8_0", "attn_k.weight": "F16", "ffn_up.weight": "Q8_0"}


def mixed_types(name: str) -> str:
    return next((kind for suffix, kind in MIXED.items() if name.endswith(suffix)), "F32")


def singular_values(adapter, tensors) -> np.ndarray:
    return np.array([row["metric_singvals_per_head"] for row in static_spectra(adapter, tensors).rows])


def transformers_state_dict(path):
    """The whole model as transformers dequantises it (the cached path's values)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    return model.state_dict()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("types", [lambda name: "F32", mixed_types], ids=["f32", "q8_0-f16"])
def test_streamed_static_spectra_equal_the_whole_model_load(tmp_path, arch, types):
    path = write_decoder_gguf(tmp_path / f"{arch}.gguf", arch=arch, tensor_type=types)
    model = read_gguf(path)
    adapter = adapter_for(model.config)
    streamed = GGUFTensorSource(model)
    whole = StateDictSource(transformers_state_dict(path))
    assert streamed.names() <= whole.names()
    for name in sorted(streamed.names()):
        if ".self_attn." in name or "norm" in name:
            np.testing.assert_array_equal(streamed.get(name), whole.get(name), err_msg=name)
    np.testing.assert_array_equal(singular_values(adapter, GGUFTensorSource(model)), singular_values(adapter, whole))


def test_the_static_pass_dequantises_only_query_key_tensors_and_norms(tmp_path):
    path = write_decoder_gguf(tmp_path / "qwen2.gguf", arch="qwen2", num_layers=3, tensor_type=mixed_types)
    model = read_gguf(path)
    source = GGUFTensorSource(model)
    static_spectra(adapter_for(model.config), source)
    read = set(source.dequantised)
    assert read == {f"blk.{i}.{leaf}" for i in range(3) for leaf in
                    ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias", "attn_norm.weight")}
    assert len(source.dequantised) == len(read)  # each once


def test_config_from_the_metadata_equals_transformers(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    for arch in ("llama", "qwen2"):
        path = write_decoder_gguf(tmp_path / f"{arch}.gguf", arch=arch, tied=arch == "qwen2")
        assert legacy_config_dict(read_layout(path)) == load_gguf_checkpoint(str(path), return_tensors=False)["config"]


def test_a_truncated_gguf_says_so_with_its_sizes(tmp_path, cli):
    path = write_decoder_gguf(tmp_path / "cut.gguf", tensor_type=mixed_types)
    whole = path.stat().st_size
    path.write_bytes(path.read_bytes()[:whole - 1000])
    with pytest.raises(QkspectraError) as caught:
        read_layout(path)
    assert str(caught.value) == f"GGUF file {path} is truncated: {whole - 1000} bytes, its tensors need {whole} bytes"
    status, out, err = cli(["extract", str(path), "--static-only", "--quiet", "--output", str(tmp_path / "g.json")])
    assert status == 2 and "is truncated" in err and f"{whole} bytes" in err
    assert len(err.strip().splitlines()) == 1


def test_a_gguf_cut_inside_its_header_cannot_be_read(tmp_path):
    path = write_decoder_gguf(tmp_path / "head.gguf")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(QkspectraError, match="cannot read GGUF file .* truncated or corrupt"):
        read_layout(path)


def test_static_only_extract_reads_a_gguf_without_converting_it(tmp_path, cli, model_cache, monkeypatch):
    from qkspectra.models import gguf_cache

    monkeypatch.setattr(gguf_cache, "_convert", lambda *a, **k: pytest.fail("the whole model was dequantised"))
    path = write_decoder_gguf(tmp_path / "tiny.gguf", arch="qwen2", tensor_type=mixed_types)
    status, out, err = cli(["extract", str(path), "--static-only", "--quiet", "--output", str(tmp_path / "g.json")])
    assert status == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_bundled_gguf_streamed_equals_the_cached_copy(name):
    from qkspectra.models import resolve_model
    from qkspectra.models.tensors import open_tensors

    source = resolve_model(name, progress=False)
    adapter = adapter_for(source.config)
    streamed = GGUFTensorSource(read_gguf(source.gguf_file))
    np.testing.assert_array_equal(singular_values(adapter, streamed), singular_values(adapter, open_tensors(source.folder)))


@pytest.mark.slow
def test_a_bfloat16_run_caches_the_whole_model_in_bfloat16(smollm2_source):
    from safetensors import safe_open

    folder = smollm2_source.weights_folder("bfloat16")
    assert folder.name.endswith("-bfloat16") and folder != smollm2_source.folder
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"BF16"}
    assert (folder / "model.safetensors").stat().st_size < 0.6 * (smollm2_source.folder / "model.safetensors").stat().st_size
