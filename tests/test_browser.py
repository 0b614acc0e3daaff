"""report.html in a real browser (headless Chromium): every image decodes, the verdict is on the page.

The page's own script records on load whether every image decoded (``data-images-ok`` on
<body>); Chromium's --dump-dom prints the DOM after that. A screenshot is kept in tmp_path.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qkspectra.geometry import load_geometry
from qkspectra.analysis.document import build_analysis_document
from qkspectra.report.run_page import write_report

GOLDEN = Path(__file__).parent / "data" / "golden" / "minilm_like.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--virtual-time-budget=10000",
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install chromium; `make test` does it when run as root)"
)


def chromium(page: Path, profile: Path, *args: str) -> str:
    done = subprocess.run(
        [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    geometry = load_geometry(GOLDEN)
    document = build_analysis_document(geometry)
    return document, write_report(document, geometry, folder)


def test_every_image_loads_and_the_verdict_is_shown(report, tmp_path):
    document, files = report
    dom = chromium(files.html, tmp_path / "profile", "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images-ok="true"' in body, body
    assert f'data-images-total="{len(files.plots)}"' in body and 'data-images-broken="0"' in body
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    assert document["verdict"]["text"] in text
    if document["verdict"].get("summary"):
        assert document["verdict"]["summary"] in text


def test_screenshot_of_the_report(report, tmp_path):
    _, files = report
    shot = tmp_path / "report.png"
    chromium(files.html, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
