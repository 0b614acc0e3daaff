"""Shared test fixtures."""

from __future__ import annotations

import os

# One BLAS thread for numpy (set before numpy is imported): the test problems are small, and on a
# two-core machine shared with other work OpenBLAS's spinning threads make them many times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Every test session converts GGUF models into its own cache, never the user's."""
    folder = tmp_path_factory.mktemp("qkspectra-cache")
    previous = os.environ.get("QKSPECTRA_CACHE")
    os.environ["QKSPECTRA_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["QKSPECTRA_CACHE"]
    else:
        os.environ["QKSPECTRA_CACHE"] = previous


@pytest.fixture(scope="session")
def minilm_source():
    from qkspectra.models import resolve_model

    return resolve_model("minilm", progress=False)


@pytest.fixture(scope="session")
def smollm2_source(model_cache):
    """SmolLM2 resolved once per session (the first resolution dequantises the GGUF, ~20 s)."""
    from qkspectra.models import resolve_model

    return resolve_model("smollm2", progress=False)


@pytest.fixture
def fail_on_the_second_call(monkeypatch):
    """``patch(cls, name)`` makes ``cls.name`` raise RuntimeError("interrupted") on its second call (the first runs
    as before); returns the list of calls made so far."""

    def patch(cls, name: str) -> list:
        original, calls = getattr(cls, name), []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, failing)
        return calls

    return patch


@pytest.fixture
def cli(capsys):
    """Run ``qkspectra ARGV`` in-process; returns (exit status, stdout, stderr)."""
    from qkspectra.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            main(argv)
            status = 0
        except SystemExit as e:
            status = e.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
