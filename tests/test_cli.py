"""The command line's contract for bad input: one line on stderr, exit status 2, nothing written.

(Each command's own checks are tested with the command; these are the cases every command shares.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "--groups", "x", "g.json"], "Invalid value for '--groups'"),
        (["analyze", "--bogus", "g.json"], "No such option: --bogus"),
        (["analyze"], "Missing argument"),
        (["extract", "minilm", "-o"], "Option '-o' requires an argument"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(argv, message, cli):
    status, out, err = cli(argv)
    assert status == 2 and out == ""
    assert err.startswith("qkspectra: error: ") and err.count("\n") == 1 and message in err


def test_paths_the_system_refuses_are_one_line(tmp_path, cli):
    too_long = tmp_path / ("x" * 300) / "geometry.json"
    status, _, err = cli(["analyze", str(too_long)])
    assert status == 2 and err.count("\n") == 1
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    status, _, err = cli(["report", str(tmp_path / "loop")])
    assert status == 2 and err.count("\n") == 1


@pytest.mark.parametrize(
    ("null_draws", "seed"), [("99999999999999999999", "0"), ("3000000000", "0"), ("5", "99999999999999999999")]
)
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, null_draws, seed, cli):
    out = tmp_path / "a.json"
    argv = ["analyze", str(GOLDEN / "minilm_like.json"), "--null", "--null-draws", null_draws, "--seed", seed,
            "--json", str(out), "-q"]
    status, _, err = cli(argv)
    assert status == 2 and err.count("\n") == 1 and "must be between" in err
    assert not out.exists()


def test_an_output_never_overwrites_its_own_input(tmp_path, cli):
    geometry = tmp_path / "g.json"
    shutil.copy(GOLDEN / "minilm_like.json", geometry)
    before = geometry.read_bytes()
    for target in (geometry, tmp_path / "sub" / ".." / "g.json"):
        status, _, err = cli(["analyze", str(geometry), "--json", str(target), "-q"])
        assert status == 2 and "would overwrite an input" in err
    assert geometry.read_bytes() == before


def test_extract_never_overwrites_the_corpus_or_the_model(tmp_path, cli):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text.\n")
    status, _, err = cli(["extract", "minilm", "--corpus", str(corpus), "-o", str(corpus), "-q"])
    assert status == 2 and "would overwrite an input" in err and corpus.read_text() == "Some text.\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    status, _, err = cli(["extract", str(model), "--static-only", "-o", str(model / "config.json"), "-q"])
    assert status == 2 and "would overwrite an input" in err
    assert (model / "config.json").read_text() == '{"model_type": "bert"}'


def test_writing_to_a_device_leaves_the_device_alone(cli):
    status, _, err = cli(["analyze", str(GOLDEN / "minilm_like.json"), "--json", "/dev/null", "-q"])
    assert (status, err) == (0, "")
    assert Path("/dev/null").is_char_device()


def test_report_and_plot_never_overwrite_the_analysis_they_read(tmp_path, cli):
    shutil.copy(GOLDEN / "minilm_like.json", tmp_path / "g.json")
    analysis = ["analyze", str(tmp_path / "g.json"), "--anchor", "all", "--json", str(tmp_path / "report.md"), "-q"]
    assert cli(analysis)[0] == 0
    before = (tmp_path / "report.md").read_bytes()
    status, _, err = cli(["report", str(tmp_path / "report.md"), "-q"])
    assert status == 2 and "would overwrite an input" in err and (tmp_path / "report.md").read_bytes() == before
    assert not (tmp_path / "report.html").exists()


def test_outputs_inside_a_model_folder_may_be_rewritten_but_its_files_never(tmp_path, capsys, cli):
    from transformers import AutoModel, GPT2Config

    model = tmp_path / "model"
    AutoModel.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50)).save_pretrained(model)
    capsys.readouterr()
    for _ in range(2):  # the second run rewrites its own outputs
        assert cli(["extract", str(model), "--static-only", "-o", str(model / "g.json"), "-q"])[0] == 0
    status, _, err = cli(["extract", str(model), "--static-only", "-o", str(model / "model.safetensors"), "-q"])
    assert status == 2 and "would overwrite an input" in err


def test_an_output_behind_a_symbolic_link_loop_is_one_line(tmp_path, cli):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    status, _, err = cli(["analyze", str(GOLDEN / "minilm_like.json"), "--json", str(tmp_path / "loop"), "-q"])
    assert status == 2 and err.count("\n") == 1


def test_plot_reads_an_analysis_named_like_a_page_it_does_not_write(tmp_path, cli):
    shutil.copy(GOLDEN / "minilm_like.json", tmp_path / "g.json")
    analysis = ["analyze", str(tmp_path / "g.json"), "--anchor", "all", "--json", str(tmp_path / "report.html"), "-q"]
    assert cli(analysis)[0] == 0
    assert cli(["plot", str(tmp_path / "report.html"), "-q"])[0] == 0
    assert (tmp_path / "plots" / "schedule.png").is_file()


@pytest.mark.parametrize("argv", [["analyze", str(GOLDEN / "minilm_like.json"), "--json", "{}/new/", "-q"],
                                  ["extract", "minilm", "--static-only", "-o", "{}/new/", "-q"]])
def test_an_output_file_named_like_a_folder_is_refused(tmp_path, argv, cli):
    status, _, err = cli([a.format(tmp_path) for a in argv])
    assert status == 2 and "names a folder; give a file name" in err
    assert not (tmp_path / "new").exists()
