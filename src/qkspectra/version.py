"""qkspectra's version (also in pyproject.toml), written into every document it produces."""

__version__ = "0.1.0"
