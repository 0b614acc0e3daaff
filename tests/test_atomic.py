"""Atomic writes: a refused write is one QkspectraError line naming the file, and leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkspectra.atomic import atomic_write_json
from qkspectra.cli import main
from qkspectra.errors import QkspectraError
from qkspectra.extract.factors_file import FactorsFileWriter

GOLDEN = Path(__file__).parent / "data" / "golden"


def test_a_file_in_place_of_the_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QkspectraError, match=r"cannot write .*x\.json: .*afile is a file, not a folder"):
        atomic_write_json(tmp_path / "afile" / "x.json", {})


def test_a_folder_in_place_of_the_file(tmp_path):
    with pytest.raises(QkspectraError, match="it is a folder"):
        atomic_write_json(tmp_path, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(QkspectraError, match="Permission denied"):
            atomic_write_json(tmp_path / "x.json", {})
    finally:
        tmp_path.chmod(0o755)


def test_factors_writer_refuses_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(QkspectraError, match="cannot write"):
        with FactorsFileWriter(tmp_path / "afile" / "g.factors.safetensors", 1, {}) as writer:
            writer.write_layer(0, {"W_Q": __import__("numpy").zeros((1, 2, 2))})


@pytest.mark.parametrize("command", [["analyze", str(GOLDEN / "deep.json"), "--quiet", "--json"], ["report", None, "--out"],
                                     ["plot", None, "--out"]])
def test_commands_report_a_refused_write_in_one_line(tmp_path, capsys, command):
    analysis = tmp_path / "analysis.json"
    main(["analyze", str(GOLDEN / "deep.json"), "--quiet", "--json", str(analysis)])
    (tmp_path / "afile").write_text("x")
    argv = [str(analysis) if part is None else part for part in command] + [str(tmp_path / "afile" / "sub")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "Traceback" not in err
