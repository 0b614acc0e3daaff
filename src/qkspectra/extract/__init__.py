"""Extraction: a model's QK-metric spectra (static) and attention entropy (dynamic), as a geometry.

The engine is ``extraction``; the steps are ``spectra`` (the static pass), ``corpus``, ``capture``
and ``entropy`` with ``streamed_entropy`` (the corpus pass), ``linearised_norm`` (norm gains folded, q/k norms linearised) and ``factors_file``.
"""

from qkspectra.extract.extraction import (
    ExtractOptions,
    Extraction,
    extract_to_files,
    factors_path,
    geometry_document,
    run_extraction,
    write_outputs,
)

__all__ = ["ExtractOptions", "Extraction", "extract_to_files", "factors_path", "geometry_document", "run_extraction",
           "write_outputs"]
