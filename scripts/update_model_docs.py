"""Rewrite the list of supported model types in docs/models.md from the adapter registry and the verified generic types.

    python scripts/update_model_docs.py [docs/models.md]

The list sits between the markers of ``qkspectra.models.supported``; ``tests/test_generic.py``
fails while docs/models.md is not current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qkspectra.atomic import atomic_write_text
from qkspectra.models.supported import replace_models_section

if __name__ == "__main__":
    page = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "models.md")
    atomic_write_text(page, replace_models_section(page.read_text()))
