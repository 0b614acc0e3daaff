"""The extraction engine: a model's QK-metric spectra (static) and attention entropy (dynamic) as a geometry.

``run_extraction`` reads the static part (the query/key tensors and norm gains, layer by
layer) and, unless ``static_only``, runs the model on a corpus for the dynamic part;
``extract_to_files`` writes the geometry JSON and streams the per-head factors beside it.

The schema and the factors' convention: docs/method/extraction.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qkspectra.version import __version__
from qkspectra.atomic import atomic_write_json, refuse_overwriting_inputs
from qkspectra.errors import QkspectraError, option
from qkspectra.extract.corpus import DEFAULT_MAX_TOKENS
from qkspectra.extract.factors_file import FactorSink, FactorsFileWriter

if TYPE_CHECKING:
    from qkspectra.models.in_memory import InMemoryModel
    from qkspectra.models.subject import Subject

FACTORS_SUFFIX = ".factors.safetensors"
FACTOR_CONVENTION = (
    "W_Q[l,h] @ W_K[l,h // (H / H_kv)].T is the metric s * W_Q^h W_K^h^T (norm gain folded if fold_ln); "
    "sqrt(s) is multiplied into each of W_Q, W_K, b_Q, b_K, so logit = (x W_Q + b_Q) . (y W_K + b_K) before positions"
)
POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions")
POSITION_BUCKETS = ("entropy_by_position_per_head[h][b]: mean entropy of the queries at 1-based positions "
                    "2^b .. 2^(b+1) - 1 of their window (1, 2-3, 4-7, ...); log_visible_keys_by_position[b]: "
                    "the mean log of the number of keys those queries see (the entropy of uniform attention); "
                    "entropy_without_first_by_position_per_head[h][b]: the mean entropy without the window's first "
                    "position of the queries of bucket b that see at least two keys (null where none does)")


MAX_TOKENS_LIMIT = 10**12  # far beyond any corpus pass; keeps every count a 64-bit integer


@dataclass(frozen=True)
class ExtractOptions:
    fold_ln: bool = True  # fold the gain of the norm feeding attention into W_Q and W_K
    static_only: bool = False  # skip the corpus pass (no "dynamic" rows)
    corpus: str | None = None  # .txt file, folder of .txt, .jsonl; None: the default corpus
    seq_len: int | None = None  # tokens per window; None: min(512, the model's maximum)
    max_tokens: int = DEFAULT_MAX_TOKENS  # corpus budget in tokens
    window_per_line: bool = False  # one window per non-blank line instead of fixed windows
    batch_size: int | None = None  # windows per forward pass; None: as many as fit in memory
    device: str = "auto"  # where the model runs: auto, cpu, cuda, cuda:N, mps
    dtype: str | None = None  # the model's dtype: float32, bfloat16, float16; None: float32 on the CPU, bfloat16 on a GPU
    quiet: bool = False  # no progress bars


@dataclass(frozen=True, eq=False)
class Extraction:
    geometry: dict  # the geometry document (see the module docstring)
    factors: dict[str, np.ndarray] | None  # W_Q (L, H, d_model, d_head), W_K (L, H_kv, ...), b_Q, b_K; None if streamed


def nan_as_null(values: Any) -> list[float | None]:
    """A 1-D array as a list, NaN as None: the document holds null, in memory as in the file."""
    return [None if x != x else x for x in values.tolist()]


def geometry_document(model: str | InMemoryModel, *, options: ExtractOptions = ExtractOptions()) -> dict:
    """The geometry document (a dict) of ``model`` (bundled name, model folder, .gguf file or a model in memory); factors are not kept."""
    return run_extraction(model, options=options, factor_sink=lambda index, layer: None).geometry


def extract_to_files(model: str | InMemoryModel | Subject, out: str | Path, *, options: ExtractOptions = ExtractOptions()) -> tuple[Path, Path]:
    """Write the geometry JSON to ``out`` and stream the factors to ``<stem>.factors.safetensors``.

    The factors file is renamed into place only once the whole extraction has succeeded, then the
    JSON is written (atomically); on any error neither appears. Returns both paths.
    """
    from qkspectra.models.subject import subject_of

    out = output_path(out)
    subject = subject_of(model, progress=not options.quiet)
    refuse_overwriting_inputs_of(subject.model, options, [out, factors_path(out)])
    extraction = run_extraction(subject, options=options, factors_file=factors_path(out))
    try:
        atomic_write_json(out, extraction.geometry)
    except BaseException:
        factors_path(out).unlink(missing_ok=True)  # no factors file without its geometry
        raise
    return out, factors_path(out)


def run_extraction(
    model: str | InMemoryModel | Subject,
    *,
    options: ExtractOptions = ExtractOptions(),
    factors_file: str | Path | None = None,
    factor_sink: FactorSink | None = None,
) -> Extraction:
    """Static spectra and (unless ``static_only``) attention entropy of ``model``, with metadata.

    ``model``: a bundled name, a model folder or .gguf file, or a model in memory (``InMemoryModel``,
    read where it is and left as it was), or a ``Subject`` already opened on one. The factors are kept in memory (``Extraction.factors``)
    unless ``factors_file`` is given (they are streamed there and the file committed when
    everything else succeeded) or ``factor_sink`` is (it receives each layer's ``AttentionLayer``
    as used for the spectra).
    """
    from qkspectra.extract.spectra import layer_factors, static_spectra
    from qkspectra.models.subject import subject_of
    from qkspectra.models.transformer_lens import TransformerLensModel

    check_options(options)
    progress = not options.quiet
    subject = subject_of(model, progress=progress)
    if subject.in_memory:  # read and run where it is, in its dtype: other options refused before any work
        from qkspectra.models.in_memory import check_placement

        check_placement(subject.model, options.device, options.dtype)
    source, adapter, tensors = subject.source, subject.adapter, subject.tensors()
    transformer_lens = isinstance(source, TransformerLensModel)

    with contextlib.ExitStack() as stack:
        corpus = seq_len = None
        if not options.static_only:
            from qkspectra.extract.corpus import default_seq_len, load_windows, model_max_length

            check_position_limit(source.config, options.seq_len)
            torch_model, tokenizer = stack.enter_context(corpus_model(source, options, progress=progress))
            sized = source if transformer_lens else torch_model  # what says the longest window the model takes
            if not options.window_per_line:
                seq_len = options.seq_len if options.seq_len is not None else default_seq_len(sized)
            corpus = load_windows(tokenizer, corpus=options.corpus, seq_len=seq_len, max_tokens=options.max_tokens,
                                  window_per_line=options.window_per_line, max_length=model_max_length(sized))
            adapter.check_sequence_length(max(map(len, corpus.windows)))

        first_layer = adapter.layer(tensors, 0)
        qk_norm = qk_norm_metadata(first_layer, static_only=corpus is None)
        norm_rms = None
        if qk_norm is not None and corpus is not None:
            from qkspectra.extract.linearised_norm import measure_norm_rms

            norm_rms = measure_norm_rms(torch_model, corpus.windows, adapter, tensors, progress=progress)

        from tqdm.auto import tqdm

        writer = None
        if factors_file is not None:
            writer = stack.enter_context(
                FactorsFileWriter(factors_file, adapter.num_layers, factors_metadata(source.model_id, options.fold_ln)))

            def stream_factors(index: int, layer) -> None:
                writer.write_layer(index, layer_factors(layer))

            factor_sink = stream_factors
        bar = stack.enter_context(
            tqdm(total=adapter.num_layers, unit="layer", desc="static spectra", disable=not progress, leave=False))
        static = static_spectra(adapter, tensors, fold_ln=options.fold_ln, on_layer=lambda _: bar.update(),
                                factor_sink=factor_sink, norm_rms=norm_rms)
        bar.close()

        geometry = {"num_layers": adapter.num_layers, "num_heads": adapter.num_heads, "static": static.rows}
        metadata = {
            "model": source.model_id,
            "model_source": source.description,
            "model_type": adapter.model_type,
            "adapter": adapter.describe(),
            "num_layers": adapter.num_layers,
            "num_heads": adapter.num_heads,
            "num_kv_heads": adapter.num_kv_heads,
            "d_model": adapter.d_model,
            "d_head": adapter.d_head,
            "scale": static.scales[0] if len(set(static.scales)) == 1 else static.scales,
            "fold_ln": options.fold_ln,
            "norm_folded_per_layer": static.norm_folded,
            "qk_biases": static.qk_biases,
            "positions": adapter.describe_positions(),
            "rotary": None if adapter.rotary is None else asdict(adapter.rotary),
            "qk_norm": qk_norm,
            "qk_clip": qk_clip_metadata(first_layer),
            "dtype": static.checkpoint_dtype,
            "computation_dtype": "float64",
            "factors_convention": FACTOR_CONVENTION,
            "qkspectra_version": __version__,
        }
        if transformer_lens:
            metadata["transformer_lens"] = source.processing_metadata()
        if corpus is not None:
            if transformer_lens:
                from qkspectra.extract.transformer_lens_capture import transformer_lens_entropy

                stats = transformer_lens_entropy(torch_model, corpus, adapter, batch_size=options.batch_size,
                                                 progress=progress)
            else:
                from qkspectra.extract.entropy import attention_entropy

                stats = attention_entropy(torch_model, corpus, batch_size=options.batch_size, progress=progress,
                                          adapter=adapter)
            if stats.mean_entropy.shape != (adapter.num_layers, adapter.num_heads):
                raise QkspectraError(
                    f"attention entropy has shape {stats.mean_entropy.shape}, expected "
                    f"({adapter.num_layers}, {adapter.num_heads})"
                )
            geometry["dynamic"] = [
                {
                    "mean_attention_entropy_per_head": stats.mean_entropy[layer].tolist(),
                    "mean_normalized_entropy_per_head": stats.mean_normalized_entropy[layer].tolist(),
                    "mean_sink_mass_per_head": stats.mean_sink_mass[layer].tolist(),
                    "entropy_by_position_per_head": stats.entropy_by_position[layer].tolist(),
                    "log_visible_keys_by_position": stats.log_keys_by_position[layer].tolist(),
                    # null where no query sees two keys
                    "mean_attention_entropy_without_first_per_head": nan_as_null(stats.mean_entropy_without_first[layer]),
                    "entropy_without_first_by_position_per_head":
                        [nan_as_null(row) for row in stats.entropy_without_first_by_position[layer]],
                }
                for layer in range(adapter.num_layers)
            ]
            metadata.update(
                corpus=corpus.description,
                corpus_sha256=corpus.sha256,
                seq_len=seq_len,
                window_per_line=options.window_per_line,
                max_tokens=options.max_tokens,
                num_windows=stats.num_windows,
                num_tokens=stats.num_tokens,
                corpus_device=str(next(torch_model.parameters()).device),
                corpus_dtype=str(next(torch_model.parameters()).dtype).removeprefix("torch."),
                entropy_dtype="float32",
                position_buckets=POSITION_BUCKETS,
                queries_by_position=stats.queries_by_position.tolist(),
            )
        if static.norm_rms is not None:
            metadata["qk_norm"].update(rms_query=static.norm_rms.query.tolist(), rms_key=static.norm_rms.key.tolist())
        if writer is not None:
            metadata["factors_file"] = writer.commit().name
    geometry["metadata"] = metadata
    return Extraction(geometry=geometry, factors=static.factors)


def qk_norm_metadata(layer, *, static_only: bool) -> dict | None:
    """How the metric of heads with query/key norms was linearised (None for models without them)."""
    from qkspectra.extract.linearised_norm import RMS_SOURCES

    if not layer.has_qk_norm:
        return None
    norm = layer.q_norm or layer.k_norm
    after = layer.qk_norm_after_rotary
    return {
        "over": "each head" if norm.over == "head" else "the whole projection",
        "kind": "LayerNorm" if norm.centred else "RMSNorm",
        "metric": "s * (W_Q / r_Q) diag(g_q * g_k) (W_K / r_K)^T, r the RMS of what the norm normalises",
        "rms": RMS_SOURCES["isotropic" if static_only else "corpus"],
        "order": "after the rotary embedding" if after else "before the rotary embedding",
        **({"position": "the form of query and key at position 0; elsewhere the gains act on rotated "
                        "coordinates (the same form at any offset only where g_q * g_k is equal on each rotary pair)"}
           if after else {}),
        # rms_query (L, H) and rms_key (L, H_kv): the values used, added after the static pass
    }


def qk_clip_metadata(layer) -> dict | None:
    """The clip of each query and key coordinate (``clip_qkv``), None for models without one."""
    if layer.clip is None:
        return None
    return {
        "bound": layer.clip,
        "where": "after the query/key norms" if layer.clip_after_qk_norm else "after the projections",
        "metric": "the bilinear form where no coordinate is clipped; entropies are the clipped model's own",
    }


@contextlib.contextmanager
def corpus_model(source, options: ExtractOptions, *, progress: bool) -> Iterator[tuple[Any, Any]]:
    """(torch model with SDPA attention, tokenizer) for the corpus pass: loaded from the source's folder
    on the device and in the dtype of ``options``, or the model in memory where it lives, in its own
    dtype, put back as it was afterwards."""
    from qkspectra.models.in_memory import InMemoryModel, untouched
    from qkspectra.models.transformer_lens import TransformerLensModel

    if isinstance(source, TransformerLensModel):  # run as it is (modes put back by its corpus pass)
        source.check_tokenizer()
        yield source.model, source.tokenizer
    elif isinstance(source, InMemoryModel):
        source.check_tokenizer()
        with untouched(source.model) as model:
            yield model, source.tokenizer
    else:
        from qkspectra.models import load_model
        from qkspectra.models.device import resolve_placement

        placement = resolve_placement(options.device, options.dtype)
        yield load_model(source, attn_implementation="sdpa", progress=progress, placement=placement)


def check_options(options: ExtractOptions) -> None:
    """Reject impossible option values before any model is read."""
    from qkspectra.models.device import check_placement_names

    check_placement_names(options.device, options.dtype)
    if options.seq_len is not None and options.seq_len < 2:
        raise QkspectraError(f"{option('seq_len')} must be at least 2, got {options.seq_len}")
    if not 1 <= options.max_tokens <= MAX_TOKENS_LIMIT:
        raise QkspectraError(f"{option('max_tokens')} must be between 1 and {MAX_TOKENS_LIMIT}, got {options.max_tokens}")
    if options.seq_len is not None and options.seq_len > MAX_TOKENS_LIMIT:
        raise QkspectraError(f"{option('seq_len')} must be at most {MAX_TOKENS_LIMIT}, got {options.seq_len}")
    if options.batch_size is not None and options.batch_size > MAX_TOKENS_LIMIT:
        raise QkspectraError(f"{option('batch_size')} must be at most {MAX_TOKENS_LIMIT}, got {options.batch_size}")
    if options.window_per_line and options.seq_len is not None:
        raise QkspectraError(f"{option('seq_len')} and {option('window_per_line')} exclude each other: with "
                             f"{option('window_per_line')} each line "
                             "is one window, cut only at the model's maximum length")
    if options.seq_len is not None and options.max_tokens < options.seq_len:
        raise QkspectraError(f"{option('max_tokens')} ({options.max_tokens}) must be at least {option('seq_len')} ({options.seq_len})")
    if options.batch_size is not None and options.batch_size < 1:
        raise QkspectraError(f"{option('batch_size')} must be at least 1, got {options.batch_size}")
    if options.corpus is not None and not Path(options.corpus).exists():
        raise QkspectraError(f"corpus {options.corpus} does not exist")


def check_position_limit(config, seq_len: int | None) -> None:
    """Refuse windows longer than the model's position table."""
    for field in POSITION_LIMIT_FIELDS:
        limit = getattr(config, field, None)
        if isinstance(limit, int) and seq_len is not None and seq_len > limit:
            raise QkspectraError(f"{option('seq_len')} {seq_len} exceeds the model's {field}={limit}")


def refuse_overwriting_inputs_of(model: str | InMemoryModel, options: ExtractOptions, outputs: list[Path]) -> None:
    """QkspectraError if any of ``outputs`` is the model's own file(s) or the corpus."""
    from qkspectra.models.source import model_input_paths

    from qkspectra.extract.corpus import corpus_files

    inputs = (model_input_paths(model) if isinstance(model, str) else []) + ([] if options.corpus is None else corpus_files(Path(options.corpus)))
    for output in outputs:
        refuse_overwriting_inputs(output, inputs)


def factors_path(out: Path) -> Path:
    """``geometry.json`` -> ``geometry.factors.safetensors`` beside it."""
    return out.with_name(out.stem + FACTORS_SUFFIX)


def factors_metadata(model_id: str, fold_ln: bool) -> dict[str, str]:
    return {"convention": FACTOR_CONVENTION, "model": model_id, "fold_ln": str(fold_ln).lower()}


def output_path(out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise QkspectraError(f"output {out} is a folder; give a file name such as {out / 'geometry.json'}")
    return out


def write_outputs(extraction: Extraction, out: str | Path) -> tuple[Path, Path]:
    """Write an extraction whose factors are in memory: the factors file, then the JSON; return both paths."""
    out = output_path(out)
    metadata = extraction.geometry["metadata"]
    factors = extraction.factors
    with FactorsFileWriter(factors_path(out), metadata["num_layers"],
                           factors_metadata(metadata["model"], metadata["fold_ln"])) as writer:
        for index in range(metadata["num_layers"]):
            writer.write_layer(index, {name: tensor[index] for name, tensor in factors.items()})
        factors_file = writer.commit()
    atomic_write_json(out, dict(extraction.geometry, metadata=dict(metadata, factors_file=factors_file.name)))
    return out, factors_file
