"""The GPU path, checked against the CPU: run only where torch sees a CUDA device (skipped elsewhere).

``scripts/gpu_check.sh`` runs these with the GPU benchmarks in one command. Each test compares
what the GPU computes with the CPU's figures for the same input:

* the operator fits' large products on CUDA against numpy (float64 both: 1e-10);
* the corpus pass on CUDA in bfloat16 against the CPU in float32 on the bundled MiniLM
  (entropies within 0.02 nats: bfloat16 keeps 8 bits of mantissa in the model's activations);
* the functional test on CUDA in float32 against the CPU on a tiny Llama (1e-4 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

import qkspectra  # noqa: E402


def test_operator_products_on_cuda_equal_numpy(monkeypatch):
    import qkspectra.factored as factored

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 512, 256))
    b = rng.standard_normal((8, 256, 512))
    factored.product_device.cache_clear()
    monkeypatch.setenv("QKSPECTRA_OPERATOR_DEVICE", "cuda:0")
    try:
        assert factored.product_device() == "cuda:0"
        on_gpu = factored.large_product(a, b)
    finally:
        factored.product_device.cache_clear()
    np.testing.assert_allclose(on_gpu, a @ b, rtol=0, atol=1e-10)


def test_corpus_pass_in_bfloat16_on_cuda_is_close_to_the_cpu():
    options = dict(max_tokens=2048, seq_len=128)
    cpu = qkspectra.extract_geometry("minilm", device="cpu", dtype="float32", **options)
    gpu = qkspectra.extract_geometry("minilm", device="cuda", dtype="bfloat16", **options)
    np.testing.assert_allclose(gpu.singular_values, cpu.singular_values, rtol=1e-10)  # the static pass: float64 from the weights
    assert np.abs(gpu.entropy - cpu.entropy).max() < 0.02
    assert gpu.metadata["corpus_device"].startswith("cuda") and gpu.metadata["corpus_dtype"] == "bfloat16"


def test_functional_test_on_cuda_equals_the_cpu():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qkspectra.models.bundled import bundled_model_path

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=30522)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("minilm"))
    model = LlamaForCausalLM(config).eval()
    options = dict(max_tokens=1024, seq_len=64, functional_tokens=512)
    cpu = qkspectra.run(model, tokenizer, **options)
    gpu = qkspectra.run(model.to("cuda"), tokenizer, **options)
    for name, entry in cpu.document["functional"].items():
        if isinstance(entry, dict) and isinstance(entry.get("operator"), dict):
            expected = entry["operator"]["relative_delta_loss"]
            assert gpu.document["functional"][name]["operator"]["relative_delta_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert gpu.verdict.overall == cpu.verdict.overall
