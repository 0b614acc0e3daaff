"""Entry points of the functional test: the ``functional`` section of the analysis document.

``functional_evidence`` loads the model and the corpus windows and checks the checkpoint against the
geometry; ``reconstruction_effects`` writes each strategy's reconstructions (spectral, operator,
operator rank-k, and the control: each head's own operator) into the model one layer at a time and
compares each rewritten model with the original (``passes``). See docs/method/functional_test.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from qkspectra.threads import single_blas_thread
from qkspectra.analysis.factors import check_against_geometry
from qkspectra.analysis.operator_fit import OperatorFitter
from qkspectra.analysis.reconstruction.layers import (
    REFUSED_MODEL_TYPES,
    LayerwiseFactors,
    ModelLayers,
    geometry_norm_rms,
    original_layers,
    writable_check,
)
from qkspectra.analysis.reconstruction.passes import ForwardPasses, release_freed_memory
from qkspectra.analysis.reconstruction.targets import rank_k_correction, spectral_target
from qkspectra.analysis.reconstruction.transformer_lens_passes import TransformerLensPasses
from qkspectra.analysis.reconstruction.writing import LayerWriter, expand_kv_heads_in_place
from qkspectra.analysis.seed import Anchor, scalar_rescale
from qkspectra.errors import QkspectraError
from qkspectra.extract.corpus import DEFAULT_FUNCTIONAL_TOKENS
from qkspectra.extract.extraction import ExtractOptions
from qkspectra.extract.linearised_norm import NormRMS
from qkspectra.geometry import Geometry
from qkspectra.models.adapters import AttentionAdapter
from qkspectra.models.device import Placement
from qkspectra.models.supported import ENCODER_MODEL_TYPES
from qkspectra.models.transformer_lens import is_transformer_lens

if TYPE_CHECKING:
    from qkspectra.models.in_memory import InMemoryModel
    from qkspectra.models.subject import Subject


def reconstruction_effects(model: nn.Module, windows: list[list[int]], singular_values: np.ndarray,
                           anchors: dict[str, Anchor], rank_k_section: dict[str, Any] | None, *,
                           fold_ln: bool = True, norm_rms: NormRMS | None = None,
                           progress: bool = False, layers: ModelLayers | None = None) -> dict[str, Any]:
    """The ``functional`` section for a loaded model and token windows.

    The model runs in its own dtype, on its own device, with transformers' SDPA attention (switched
    to for each pass by ``AttentionCapture``; a TransformerLens model with its own, ``TransformerLensPasses``).
    It is modified in place: key/value heads expanded, query/key weights overwritten
    (the original's outputs are recorded first).
    singular_values: (L, H, K) the geometry's spectra (spectral reconstruction and spectral T).
    rank_k_section: the ``rank_k`` section, for each strategy's operator-level k; None skips
    ``operator_rank_k`` (then None in the output). norm_rms: the q/k norm RMS the geometry's
    linearised metric used (its metadata), for models with q/k norms; None: isotropic input.
    layers: the model's layers as stored, read from its checkpoint with ``writable_check``
    (``functional_evidence``); None: a snapshot of the model's own (``original_layers``).
    Returns {strategy: {"spectral": R, "operator": R, "operator_rank_k": R}, "control": R}.
    """
    from tqdm.auto import tqdm

    if layers is None:
        _, layers = original_layers(model)
    factors = LayerwiseFactors(layers, fold_ln=fold_ln, norm_rms=norm_rms)
    L, H = factors.num_layers, factors.num_heads
    if singular_values.shape[:2] != (L, H):
        raise QkspectraError(f"the geometry has {singular_values.shape[:2]} layers x heads, the model {(L, H)}")
    model.eval()
    adapter = expand_kv_heads_in_place(model, layers.adapter)
    writer = LayerWriter(model, adapter, fold_ln=fold_ln, norm_rms=norm_rms)

    runner = (TransformerLensPasses if is_transformer_lens(model) else ForwardPasses)(model, adapter, windows)
    passes = 2 + len(anchors) * (2 + (rank_k_section is not None))  # at most: duplicates are run once
    with tqdm(total=passes * runner.num_queries, unit="tok", desc="functional test", disable=not progress,
              leave=False) as bar:
        # every strategy's operator T first: the fitter's layers are not held through the passes
        fitter = OperatorFitter(factors)
        operator_Ts = {name: np.stack([fit.T for fit in fitter.fit_all(anchor.layers)]) for name, anchor in anchors.items()}
        del fitter
        release_freed_memory()
        reference = runner.reference(bar.update)
        original_loss = sum(batch.loss_sum for batch in reference) / max(runner.num_predicted, 1)

        cache: dict[tuple, dict] = {}

        def effects_of(key: tuple, target: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> dict:
            """target(layer) -> that layer's (X, Y) (H, d_model, d_head); written one layer at a time."""
            if key not in cache:
                with single_blas_thread():
                    for index in range(L):
                        writer.write(index, layers[index], *target(index))
                release_freed_memory()
                cache[key] = runner.compare(reference, original_loss, bar.update).as_dict()
            else:
                bar.update(runner.num_queries)
            return cache[key]

        def own(index: int) -> tuple[np.ndarray, np.ndarray]:
            return factors.layer(index).W_Q, factors.layer(index).W_K

        section: dict[str, Any] = {"control": effects_of(("control",), own)}
        for name, anchor in anchors.items():
            a = anchor.layers  # (L,)
            spectral_T, _ = scalar_rescale(singular_values, singular_values[a])  # (L, H)
            operator_T = operator_Ts[name]  # (L, H)

            def spectral(index: int) -> tuple[np.ndarray, np.ndarray]:
                return spectral_target(factors.layer(index), spectral_T[index, :, None] * singular_values[a[index]])

            def operator(index: int) -> tuple[np.ndarray, np.ndarray]:
                anchor_layer = factors.layer(a[index])
                return operator_T[index, :, None, None] * anchor_layer.W_Q, anchor_layer.W_K

            entry = {
                "spectral": effects_of(("spectral", a.tobytes()), spectral),
                "operator": effects_of(("operator", a.tobytes()), operator),
                "operator_rank_k": None,
                "num_anchor_layers": anchor.num_anchor_layers,
                "replaced_layers": anchor.num_fitted_layers,
            }
            if rank_k_section is not None:
                k = _operator_k(rank_k_section, name, (L, H))

                def rank_k(index: int) -> tuple[np.ndarray, np.ndarray]:
                    own_layer = factors.layer(index)
                    return rank_k_correction(own_layer.W_Q, own_layer.W_K, *operator(index), k[index])

                entry["operator_rank_k"] = effects_of(("operator_rank_k", a.tobytes(), k.tobytes()), rank_k)
            section[name] = entry
    return section


def _operator_k(rank_k_section: dict[str, Any], strategy: str, shape: tuple[int, int]) -> np.ndarray:
    entry = rank_k_section.get(strategy) or {}
    operator = entry.get("operator")
    if operator is None:
        raise QkspectraError(f"the rank_k section has no operator-level k for anchor {strategy!r}")
    k = np.asarray(operator["k"], dtype=int)
    if k.shape != shape:
        raise QkspectraError(f"rank_k.{strategy}.operator.k has shape {k.shape}, expected {shape}")
    return k


def load_functional_model(source, *, progress: bool = False, placement: Placement = Placement("cpu", "float32")):
    """(model, tokenizer) of a model's folder: a causal LM with its head, or the bare encoder, SDPA attention,
    in ``placement``."""
    from qkspectra.models import load_model

    causal = source.config.model_type not in ENCODER_MODEL_TYPES + tuple(REFUSED_MODEL_TYPES)
    return load_model(source, attn_implementation="sdpa", progress=progress, placement=placement,
                      model_class="AutoModelForCausalLM" if causal else "AutoModel")


@contextlib.contextmanager
def functional_model(subject: Subject, options: ExtractOptions) -> Iterator[tuple[nn.Module, Any, AttentionAdapter]]:
    """(model, tokenizer, adapter of its layers as stored) for the functional test to rewrite.

    A model in memory is rewritten where it lives, in its own dtype, and put back exactly afterwards
    (``in_memory.rewritten_in_place``); its layers are read with an adapter of a copy of its config
    (expanding key/value heads edits the model's config until it is put back); a TransformerLens model
    likewise (``transformer_lens.rewritten_in_place``), its query/key weights written into the projections
    it computes with. Otherwise the model is loaded from its folder on the device and in the dtype of ``options``.
    """
    from qkspectra.models import transformer_lens

    if isinstance(subject.model, transformer_lens.TransformerLensModel):
        from qkspectra.models.in_memory import check_placement

        check_placement(subject.model, options.device, options.dtype)
        reason = subject.adapter.unwritable()
        if reason is not None:
            raise QkspectraError(reason)
        with transformer_lens.rewritten_in_place(subject.model) as (model, tokenizer):
            yield model, tokenizer, subject.adapter
        return
    if subject.in_memory:
        from qkspectra.models.adapters import adapter_for
        from qkspectra.models.in_memory import check_placement, rewritten_in_place

        check_placement(subject.model, options.device, options.dtype)
        with rewritten_in_place(subject.model) as (model, tokenizer):
            yield model, tokenizer, adapter_for(copy.deepcopy(subject.model.config))
        return
    from qkspectra.models.device import resolve_placement

    placement = resolve_placement(options.device, options.dtype)
    yield (*load_functional_model(subject.source, progress=not options.quiet, placement=placement), subject.adapter)


def functional_evidence(model: str | InMemoryModel | Subject, geometry: Geometry, anchors: dict[str, Anchor],
                        rank_k_section: dict[str, Any] | None, options: ExtractOptions = ExtractOptions(quiet=True),
                        *, max_tokens: int = DEFAULT_FUNCTIONAL_TOKENS) -> dict[str, Any]:
    """The ``functional`` section: load the model, cut the corpus into windows, compare reconstructions.

    geometry must come from this model with the same ``options.fold_ln`` (its spectra are checked against
    the checkpoint's); anchors as for ``operator_evidence``; rank_k_section from ``rank_k_evidence`` with
    factors. options: the extraction's (its corpus and seq_len, the device and dtype the model runs in,
    quiet); max_tokens: the corpus tokens of the test. A model in memory is rewritten where it is and
    left as it was (``functional_model``).
    """
    from qkspectra.extract.corpus import default_seq_len, load_windows
    from qkspectra.models.subject import subject_of

    fold_ln, progress = options.fold_ln, not options.quiet
    release_freed_memory()  # what the analysis before freed, before the model comes in
    subject = subject_of(model, progress=progress)
    norm_rms = geometry_norm_rms(geometry)
    with functional_model(subject, options) as (torch_model, tokenizer, adapter):
        # the checkpoint (or the model in memory as it was), not its cast, one layer at a time: checked against
        # the geometry and for what can be written, then the original layers of the test (no copy of the model's)
        layers = ModelLayers(adapter, subject.tensors(), check=writable_check(subject.source.config.model_type))
        check_against_geometry(LayerwiseFactors(layers, fold_ln=fold_ln, norm_rms=norm_rms, cache_size=1), geometry)
        sized = subject.source if is_transformer_lens(torch_model) else torch_model  # says the longest window it takes
        windows = load_windows(tokenizer, corpus=options.corpus, seq_len=options.seq_len or default_seq_len(sized),
                               max_tokens=max_tokens, window_per_line=False).windows
        return reconstruction_effects(torch_model, windows, geometry.singular_values, anchors, rank_k_section,
                                      fold_ln=fold_ln, norm_rms=norm_rms, progress=progress, layers=layers)
