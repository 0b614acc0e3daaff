"""Speed of the static pass (factored spectra) against loading the weights and against dense SVD.

On SmolLM2 (30 layers x 9 heads, d_model 576, d_head 64; the cached safetensors copy of the
bundled GGUF, converted first if needed) this prints

  load     reading every tensor the static pass reads (q/k weights, norm gains) from the
           safetensors file into float64 arrays (the raw float32 read is shown too);
  static   the whole static pass: the same reads plus norm folding, thin QR of every factor,
           SVD of every d_head x d_head core and the summaries (target: at most 1.5x load);
           also shown with the float32 factors kept, as for the factors file, and with
           Householder QR for every factor instead of the Gram (CholeskyQR) route;
  floor    the two steps no factored method avoids, timed alone on the same factors: the
           d_head x d_head Gram products W^T W of the 360 distinct factors and the SVDs of the
           270 d_head x d_head cores (what the 1.5x-load target leaves room for);
  dense    the baseline: form each head's d_model x d_model metric from the loaded factors
           and take numpy's SVD of it (singular values only), for ``--dense-heads`` heads
           (default all 270), extrapolated to all heads when fewer are timed
           (target: dense / static >= 50).

Everything runs on one thread (OPENBLAS_NUM_THREADS=1 unless already set; the static pass runs
torch on one thread by itself). With ``--repeats`` > 1 the three are timed alternately and
medians reported.

    python benchmarks/bench_static.py [--repeats 3] [--dense-heads 270]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from qkspectra import factored  # noqa: E402
from qkspectra.threads import single_blas_thread, single_threaded_torch  # noqa: E402
from qkspectra.models.adapters.base import fold_norm  # noqa: E402
from qkspectra.extract.spectra import static_spectra  # noqa: E402
from qkspectra.models import resolve_model  # noqa: E402
from qkspectra.models.adapters import adapter_for  # noqa: E402
from qkspectra.models.tensors import SINGLE_FILE, StateDictSource, open_tensors  # noqa: E402

STATIC_TARGET = 1.5
DENSE_TARGET = 50.0


class RecordingSource(StateDictSource):
    """Serves tensors from a real source and remembers which names were asked for."""

    def __init__(self, source):
        self.source, self.asked = source, []
        super().__init__({})

    def names(self):
        return self.source.names()

    def get(self, name):
        self.asked.append(name)
        return self.source.get(name)


def time_load(path, names: list[str]) -> tuple[float, float]:
    """(seconds to read the tensors as stored, seconds to read them into float64 arrays).

    The first copies each tensor out of the memory-mapped file (``get_tensor`` alone maps
    without reading); the second is what the static pass needs.
    """
    with single_threaded_torch():
        start = time.perf_counter()
        with safe_open(path, framework="pt") as weights:
            stored = [weights.get_tensor(name).clone() for name in names]
        stored_seconds = time.perf_counter() - start
        del stored
        start = time.perf_counter()
        with safe_open(path, framework="pt") as weights:
            converted = [weights.get_tensor(name).to(torch.float64).numpy() for name in names]
        del converted
    return stored_seconds, time.perf_counter() - start


def time_static(adapter, folder, *, keep_factors: bool, householder: bool = False) -> float:
    """Seconds for the static pass; without ``keep_factors`` the factors are dropped, as in ``extract.extraction.geometry_document``.

    ``householder``: every factor takes Householder QR (the Gram route's condition limit set to 0).
    """
    spread = factored.GRAM_CONDITION_LIMIT
    factored.GRAM_CONDITION_LIMIT = 0.0 if householder else spread
    try:
        start = time.perf_counter()
        static_spectra(adapter, open_tensors(folder), fold_ln=True,
                       factor_sink=None if keep_factors else (lambda index, layer: None))
        return time.perf_counter() - start
    finally:
        factored.GRAM_CONDITION_LIMIT = spread


def time_floor(layers) -> tuple[float, float]:
    """(seconds for every Gram product W^T W, seconds for every core SVD), each batched per layer as in the pass."""
    factors = [(layer.W_Q, layer.W_K) for layer in layers]  # the distinct factors (shared keys once)
    cores = [factored.r_factors(W_Q) @ np.repeat(factored.r_factors(W_K), len(W_Q) // len(W_K), axis=0).swapaxes(-1, -2)
             for W_Q, W_K in factors]  # per layer (H, k, k)
    with single_threaded_torch(), single_blas_thread():  # as in the static pass
        start = time.perf_counter()
        for W_Q, W_K in factors:
            np.matmul(W_Q.swapaxes(-1, -2), W_Q)
            np.matmul(W_K.swapaxes(-1, -2), W_K)
        gram = time.perf_counter() - start
        start = time.perf_counter()
        for core in cores:
            np.linalg.svd(core, compute_uv=False)
        return gram, time.perf_counter() - start


def time_dense(layers, heads: list[tuple[int, int]]) -> float:
    """Seconds to form and SVD the d_model x d_model metric of each (layer, head) in ``heads``."""
    start = time.perf_counter()
    for layer_index, head in heads:
        layer = layers[layer_index]
        metric = layer.scale * layer.W_Q[head] @ layer.W_K[head].T  # (d_model, d_model)
        np.linalg.svd(metric, compute_uv=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-heads", type=int, default=0, help="heads timed densely (0: all)")
    args = parser.parse_args()

    source = resolve_model("smollm2", progress=True)
    adapter = adapter_for(source.config)
    recorder = RecordingSource(open_tensors(source.folder))
    folded = [fold_norm(adapter.layer(recorder, index)) for index in range(adapter.num_layers)]  # shared keys once
    layers = [layer.per_query_head() for layer in folded]
    all_heads = [(layer, head) for layer in range(adapter.num_layers) for head in range(adapter.num_heads)]
    step = max(1, len(all_heads) // args.dense_heads) if args.dense_heads else 1
    sampled = all_heads[::step]
    path = source.folder / SINGLE_FILE

    raw, load, static, with_factors, householder, gram, core_svd, dense = [], [], [], [], [], [], [], []
    for _ in range(args.repeats):
        raw_seconds, load_seconds = time_load(path, recorder.asked)
        raw.append(raw_seconds)
        load.append(load_seconds)
        static.append(time_static(adapter, source.folder, keep_factors=False))
        with_factors.append(time_static(adapter, source.folder, keep_factors=True))
        householder.append(time_static(adapter, source.folder, keep_factors=False, householder=True))
        gram_seconds, svd_seconds = time_floor(folded)
        gram.append(gram_seconds)
        core_svd.append(svd_seconds)
        dense.append(time_dense(layers, sampled) * len(all_heads) / len(sampled))

    raw_s, load_s, static_s, factors_s, householder_s, gram_s, svd_s, dense_s = (
        statistics.median(x) for x in (raw, load, static, with_factors, householder, gram, core_svd, dense))
    print(f"model: {source.description}")
    print(f"  {adapter.num_layers} layers x {adapter.num_heads} heads ({adapter.num_kv_heads} kv), "
          f"d_model {adapter.d_model}, d_head {adapter.d_head}; {len(recorder.asked)} tensors read; "
          f"medians of {args.repeats} alternating runs, one thread; load average {os.getloadavg()[0]:.1f}")
    print(f"load q/k weights + norm gains, as stored (float32) : {raw_s * 1e3:9.1f} ms")
    print(f"load q/k weights + norm gains, as float64          : {load_s * 1e3:9.1f} ms")
    print(f"static extraction (factored, all heads)            : {static_s * 1e3:9.1f} ms  "
          f"= {static_s / load_s:.2f}x float64 load, {static_s / raw_s:.1f}x float32 read "
          f"(target <= {STATIC_TARGET}x load)")
    print(f"  the same, keeping the float32 factors in memory  : {factors_s * 1e3:9.1f} ms")
    print(f"  the same, Householder QR for every factor        : {householder_s * 1e3:9.1f} ms")
    print(f"floor: Gram products of the factors alone          : {gram_s * 1e3:9.1f} ms")
    print(f"floor: SVDs of the {len(all_heads)} d_head x d_head cores alone   : {svd_s * 1e3:9.1f} ms")
    print(f"  a pass doing nothing but the load, these products and these SVDs: "
          f"{(load_s + gram_s + svd_s) / load_s:.2f}x float64 load")
    timed = "all heads" if len(sampled) == len(all_heads) else f"{len(sampled)} heads timed, extrapolated"
    print(f"dense per-head SVD of the d_model x d_model metric  : {dense_s * 1e3:9.1f} ms  ({timed})")
    print(f"ratio dense / static: {dense_s / static_s:.0f}x (target >= {DENSE_TARGET:.0f}x)")


if __name__ == "__main__":
    main()
