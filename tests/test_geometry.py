"""Loading and validating geometry files: every bad input is one line, exit 2, no output."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from qkspectra.cli import main
from qkspectra.errors import QkspectraError
from qkspectra.geometry import load_geometry, parse_geometry


def good_doc(L: int = 3, H: int = 2, K: int = 3) -> dict:
    rng = np.random.default_rng(0)
    sigma = np.sort(rng.uniform(0.1, 2.0, (L, H, K)), axis=-1)[..., ::-1]
    return {
        "num_layers": L,
        "num_heads": H,
        "static": [{"metric_singvals_per_head": sigma[i].tolist()} for i in range(L)],
        "dynamic": [{"mean_attention_entropy_per_head": rng.uniform(0.5, 3.0, H).tolist()} for i in range(L)],
    }


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_round_trip_values(tmp_path):
    doc = good_doc()
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    g = load_geometry(path)
    assert g.singular_values.shape == (3, 2, 3)
    assert g.singular_values[1, 0].tolist() == doc["static"][1]["metric_singvals_per_head"][0]
    assert g.entropy[2].tolist() == doc["dynamic"][2]["mean_attention_entropy_per_head"]


def test_ragged_spectra_are_zero_padded():
    doc = good_doc(L=2, H=2, K=3)
    doc["static"][0]["metric_singvals_per_head"][1] = [5.0]
    g = parse_geometry(doc)
    assert g.singular_values.shape == (2, 2, 3)
    assert g.singular_values[0, 1].tolist() == [5.0, 0.0, 0.0]


def test_no_dynamic_section_is_allowed():
    doc = good_doc()
    del doc["dynamic"]
    assert parse_geometry(doc).entropy is None


def test_integer_values_and_extra_keys_are_accepted():
    doc = good_doc(L=1, H=1, K=2)
    doc["static"][0]["metric_singvals_per_head"] = [[2, 1]]
    doc["static"][0]["operator_norm_per_head"] = [2]
    doc["metadata"] = {"model": "x"}
    g = parse_geometry(doc)
    assert g.singular_values.dtype == np.float64 and g.metadata == {"model": "x"}


def _set(doc: dict, path: list, value) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()
SV = "metric_singvals_per_head"
ENT = "mean_attention_entropy_per_head"

# (name, document change, expected message fragment)
BAD_DOCS = [
    ("missing num_layers", (["num_layers"], _DELETE), "num_layers: missing"),
    ("missing static", (["static"], _DELETE), "static: missing"),
    ("num_layers disagrees", (["num_layers"], 4), "static: 3 rows, but num_layers is 4"),
    ("num_heads disagrees", (["num_heads"], 3), "static[0].metric_singvals_per_head: 2 heads, but num_heads is 3"),
    ("num_layers string", (["num_layers"], "3"), 'num_layers: expected a positive whole number, found a string "3"'),
    ("num_layers bool", (["num_layers"], True), "num_layers: expected a positive whole number, found a boolean"),
    ("num_layers zero", (["num_layers"], 0), "num_layers: expected a positive whole number, found 0"),
    ("row not object", (["static", 1], [1, 2]), "static[1]: expected an object, found a list"),
    ("row missing key", (["static", 1, SV], _DELETE), f"static[1].{SV}: missing"),
    ("empty list of heads", (["static", 2, SV], []), f"static[2].{SV}: empty list of heads"),
    ("wrong head count", (["static", 2, SV], [[1.0]]), f"static[2].{SV}: 1 heads, but num_heads is 2"),
    ("empty spectrum", (["static", 0, SV, 1], []), f"static[0].{SV}[1]: empty spectrum"),
    ("spectrum not list", (["static", 0, SV, 1], 3.0), f"static[0].{SV}[1]: expected a list of singular values, found a number 3.0"),
    ("string value", (["static", 1, SV, 0, 2], "0.5"), f'static[1].{SV}[0][2]: expected a number, found a string "0.5"'),
    ("boolean value", (["static", 1, SV, 1, 0], True), f"static[1].{SV}[1][0]: expected a number, found a boolean"),
    ("null value", (["static", 1, SV, 1, 0], None), f"static[1].{SV}[1][0]: expected a number, found null"),
    ("nested value", (["static", 1, SV, 1, 0], [[1.0]]), f"static[1].{SV}[1][0]: expected a number, found a list"),
    ("negative", (["static", 2, SV, 1, 2], -0.4), f"static[2].{SV}[1][2]: negative singular value -0.4"),
    ("not descending", (["static", 0, SV, 0], [1.0, 2.0, 0.5]), f"static[0].{SV}[0][1]: singular values not in descending order"),
    ("huge int", (["static", 0, SV, 0, 0], 10**400), f"static[0].{SV}[0][0]: number too large"),
    ("overflowing square", (["static", 1, SV, 0, 0], 1e300), f"static[1].{SV}[0][0]: singular value 1e+300 too large"),
    ("everything tiny", (["static"], [{SV: [[3e-9, 1e-9], [2e-9, 0.0]]}] * 3), "static: the largest singular value is 3e-09"),
    ("dynamic too short", (["dynamic"], [{ENT: [1.0, 1.0]}]), "dynamic: 1 rows, but num_layers is 3"),
    ("dynamic wrong heads", (["dynamic", 1, ENT], [1.0]), f"dynamic[1].{ENT}: 1 heads, but num_heads is 2"),
    ("dynamic string", (["dynamic", 2, ENT, 1], "x"), f'dynamic[2].{ENT}[1]: expected a number, found a string "x"'),
    ("dynamic negative", (["dynamic", 0, ENT, 0], -1.0), f"dynamic[0].{ENT}[0]: negative entropy -1"),
    ("metadata not object", (["metadata"], [1]), "metadata: expected an object, found a list"),
]


@pytest.mark.parametrize("name,change,message", BAD_DOCS, ids=[b[0] for b in BAD_DOCS])
def test_bad_document_exits_2_with_json_path(name, change, message, tmp_path, capsys):
    doc = _set(good_doc(), *change)
    path = tmp_path / "geometry.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out.json"
    code, stdout, stderr = run_cli(["analyze", str(path), "--json", str(out)], capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{path}: {message}" in stderr
    assert stdout == ""
    assert list(tmp_path.iterdir()) == [path]  # no output, no temporary file left


# (name, raw file content, expected message fragment)
BAD_FILES = [
    ("empty", b"", "empty file"),
    ("whitespace", b"  \n", "empty file"),
    ("truncated", json.dumps(good_doc()).encode()[:-30], "not valid JSON: "),
    ("not json", b"num_layers = 3\n", "not valid JSON: Expecting value at line 1 column 1"),
    ("top-level list", b"[1, 2]", "expected a JSON object at the top level, found a list"),
    ("binary", b"\xff\xfe\x00garbage", "not"),
    ("absurd nesting", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("5000-digit integer", b'{"num_layers": ' + b"9" * 5000 + b"}", "not a geometry file"),
    ("NaN", json.dumps(good_doc()).replace('"mean_attention_entropy_per_head": [', '"mean_attention_entropy_per_head": [NaN, ', 1).encode(), "dynamic[0].mean_attention_entropy_per_head"),
    ("Infinity", json.dumps(good_doc()).replace('"mean_attention_entropy_per_head": [', '"mean_attention_entropy_per_head": [Infinity, ', 1).encode(), "dynamic[0].mean_attention_entropy_per_head"),
]


@pytest.mark.parametrize("name,raw,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_exits_2(name, raw, message, tmp_path, capsys):
    path = tmp_path / "geometry.json"
    path.write_bytes(raw)
    out = tmp_path / "out.json"
    code, stdout, stderr = run_cli(["analyze", str(path), "--json", str(out)], capsys)
    assert code == 2, stderr
    assert stderr.startswith("qkspectra: error: ") and stderr.count("\n") == 1
    assert f"{path}: " in stderr and message in stderr
    assert list(tmp_path.iterdir()) == [path]


def test_nan_names_its_json_path(tmp_path):
    doc = good_doc()
    text = json.dumps(doc).replace(repr(doc["static"][1][SV][0][1]), "NaN", 1)
    path = tmp_path / "g.json"
    path.write_text(text)
    with pytest.raises(QkspectraError, match=r"static\[1\]\.metric_singvals_per_head\[0\]\[1\]: not a finite number: nan"):
        load_geometry(path)


def test_missing_file_and_folder(tmp_path, capsys):
    code, _, err = run_cli(["analyze", str(tmp_path / "nope.json")], capsys)
    assert code == 2 and "nope.json: no such file" in err
    code, _, err = run_cli(["analyze", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--anchor", "first"], "--anchor 'first': choose last, middle, best, group, all or a layer index"),
        (["--anchor", "3"], "--anchor 3: the geometry has 3 layers (valid indices -3 to 2)"),
        (["--anchor", "-4"], "--anchor -4: the geometry has 3 layers"),
        (["--anchor", "group", "--groups", "4"], "--groups 4: must be between 1 and the number of layers (3)"),
        (["--anchor", "group", "--groups", "0"], "--groups 0: must be between 1"),
        (["--anchor", "last", "--groups", "2"], "--groups goes with --anchor group or --anchor all"),
    ],
)
def test_bad_options_exit_2(args, message, tmp_path, capsys):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(good_doc()))
    out = tmp_path / "out.json"
    code, _, err = run_cli(["analyze", str(path), "--json", str(out), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def position_doc() -> dict:
    """good_doc with entropy by position bucket (3 buckets) in every dynamic row."""
    doc = good_doc()
    for row in doc["dynamic"]:
        row["entropy_by_position_per_head"] = [[0.0, 0.5, 1.0], [0.0, 0.2, 0.4]]
        row["log_visible_keys_by_position"] = [0.0, 0.9, 1.7]
    return doc


def test_entropy_by_position_is_read_and_checked():
    g = parse_geometry(position_doc())
    assert g.entropy_by_position.shape == (3, 2, 3) and g.log_keys_by_position.shape == (3, 3)
    assert parse_geometry(good_doc()).entropy_by_position is None
    bad = [
        ((["dynamic", 1, "entropy_by_position_per_head", 0, 2], -1.0),
         "dynamic[1].entropy_by_position_per_head[0][2]: not a finite entropy >= 0: -1"),
        ((["dynamic", 2, "entropy_by_position_per_head", 1], [0.1, 0.2]),
         "dynamic[2].entropy_by_position_per_head[1]: expected a list of 3 position buckets, found a list"),
        ((["dynamic", 1, "entropy_by_position_per_head"], _DELETE), "dynamic[1].entropy_by_position_per_head: missing"),
        ((["dynamic", 0, "log_visible_keys_by_position"], [0.0]),
         "dynamic[0].log_visible_keys_by_position: expected a list of 3 numbers, found a list"),
        ((["dynamic", 0, "entropy_by_position_per_head", 0, 0], "x"),
         'dynamic[0].entropy_by_position_per_head[0][0]: expected a number, found a string "x"'),
    ]
    for change, message in bad:
        with pytest.raises(QkspectraError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_geometry(_set(position_doc(), *change))


def without_first_doc() -> dict:
    """position_doc with the entropy without the first position, overall and by bucket (null at position 1)."""
    doc = position_doc()
    for row in doc["dynamic"]:
        row["mean_attention_entropy_without_first_per_head"] = [1.5, 0.25]
        row["entropy_without_first_by_position_per_head"] = [[None, 0.5, 1.2], [None, 0.0, 0.4]]
    return doc


def test_entropy_without_first_is_read_with_nulls_as_nan_and_checked():
    g = parse_geometry(without_first_doc())
    assert g.entropy_without_first.shape == (3, 2) and g.entropy_without_first[1].tolist() == [1.5, 0.25]
    assert g.entropy_without_first_by_position.shape == (3, 2, 3)
    assert np.isnan(g.entropy_without_first_by_position[:, :, 0]).all()
    assert g.entropy_without_first_by_position[2, 0, 2] == 1.2
    assert parse_geometry(position_doc()).entropy_without_first is None  # older files
    assert parse_geometry(position_doc()).entropy_without_first_by_position is None
    doc = _set(without_first_doc(), ["dynamic", 0, "mean_attention_entropy_without_first_per_head", 1], None)
    assert np.isnan(parse_geometry(doc).entropy_without_first[0, 1])  # no query of the layer sees two keys
    alone = good_doc()  # the by-position key without entropy_by_position_per_head
    for row in alone["dynamic"]:
        row["entropy_without_first_by_position_per_head"] = [[None, 0.5], [None, 0.1]]
    assert parse_geometry(alone).entropy_without_first_by_position.shape == (3, 2, 2)
    key, by_position = "mean_attention_entropy_without_first_per_head", "entropy_without_first_by_position_per_head"
    bad = [
        ((["dynamic", 1, key, 0], -0.5), f"dynamic[1].{key}[0]: not a finite entropy >= 0 or null: -0.5"),
        ((["dynamic", 2, key], [1.0]), f"dynamic[2].{key}: 1 heads, but num_heads is 2"),
        ((["dynamic", 1, key], _DELETE), f"dynamic[1].{key}: missing"),
        ((["dynamic", 0, key, 1], "x"), f'dynamic[0].{key}[1]: expected a number or null, found a string "x"'),
        ((["dynamic", 0, key, 0], float("inf")), f"dynamic[0].{key}[0]: not a finite entropy >= 0 or null: inf"),
        ((["dynamic", 2, by_position, 1], [0.1, 0.2]),
         f"dynamic[2].{by_position}[1]: expected a list of 3 position buckets, found a list"),
        ((["dynamic", 1, by_position, 0, 2], -1.0), f"dynamic[1].{by_position}[0][2]: not a finite entropy >= 0 or null: -1"),
        ((["dynamic", 0, by_position, 1, 1], True), f"dynamic[0].{by_position}[1][1]: expected a number or null, found a boolean"),
        ((["dynamic", 2, by_position], _DELETE), f"dynamic[2].{by_position}: missing"),
        ((["dynamic", 1, by_position], 3.0), f"dynamic[1].{by_position}: expected a list of 2 heads, found a number"),
    ]
    for change, message in bad:
        with pytest.raises(QkspectraError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_geometry(_set(without_first_doc(), *change))


def test_extracted_rows_with_nulls_load(tmp_path):
    """The writer's NaN becomes null in the file (orjson) and NaN again on reading."""
    from qkspectra.atomic import atomic_write_json

    doc = without_first_doc()
    doc["dynamic"][0]["entropy_without_first_by_position_per_head"][0][0] = float("nan")
    atomic_write_json(tmp_path / "g.json", doc)
    assert "NaN" not in (tmp_path / "g.json").read_text()
    assert np.isnan(load_geometry(tmp_path / "g.json").entropy_without_first_by_position[0, 0, 0])
