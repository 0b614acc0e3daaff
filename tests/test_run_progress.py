"""`qkspectra run` says what each stage is doing, with progress for the long ones (--quiet: see test_run)."""

from __future__ import annotations

from test_operator_fit_streamed import random_llama_checkpoint

from qkspectra.extract.extraction import ExtractOptions
from qkspectra.workflow.runner import RunSettings, run


def test_run_reports_each_stage_and_the_operator_fits_progress(tmp_path):
    random_llama_checkpoint(tmp_path / "llama", layers=3)
    messages, steps = [], []
    result = run(str(tmp_path / "llama"), tmp_path / "out", RunSettings(ExtractOptions(static_only=True, quiet=True),
                 functional=False), say=messages.append, progress=lambda *step: steps.append(step))
    assert [m.split(" ")[0] for m in messages] == ["extracting", "analysing:", "writing"]
    assert ("summarising layers", 3, 3) in steps
    pairs = {stage: total for stage, _, total in steps}["fitting layer pairs"]
    assert steps[-1] == ("fitting layer pairs", pairs, pairs)
    assert result.document["operator"]["last"]["residual"][2] == [0.0] * 4  # the anchor layer against itself


def test_run_command_prints_its_stages(tmp_path, cli):
    random_llama_checkpoint(tmp_path / "llama", layers=2)
    status, stdout, stderr = cli(["run", str(tmp_path / "llama"), "--static-only", "--no-functional",
                                  "--out", str(tmp_path / "out")])
    assert status == 0 and "=== Verdict ===" in stdout
    assert "qkspectra: extracting" in stderr and "qkspectra: analysing: operator-level fits" in stderr
