"""Rewrite the README's list of supported model types from the adapter registry and the verified generic types.

    python scripts/update_readme_models.py [README.md]

The list sits between the markers of ``qkspectra.models.supported``; ``tests/test_generic.py``
fails while the README is not current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qkspectra.atomic import atomic_write_text
from qkspectra.models.supported import replace_readme_section

if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "README.md")
    atomic_write_text(readme, replace_readme_section(readme.read_text()))
