"""qkspectra: test the annealing-schedule hypothesis on transformer attention heads."""

__version__ = "0.1.0"
