"""Extraction: a model's QK-metric spectra (static) and attention entropy (dynamic), as a geometry.

The engine is ``extraction``; the steps are ``spectra`` (the static pass), ``corpus``, ``capture``
and ``entropy`` (the corpus pass), ``linearised_norm`` (heads with q/k norms) and ``factors_file``.
"""

from qkspectra.extract.extraction import (
    ExtractOptions,
    Extraction,
    extract_geometry,
    extract_to_files,
    factors_path,
    run_extraction,
    write_outputs,
)

__all__ = ["ExtractOptions", "Extraction", "extract_geometry", "extract_to_files", "factors_path", "run_extraction",
           "write_outputs"]
