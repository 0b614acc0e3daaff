"""Typesetting of a laid-out page (``layout``) as HTML, Markdown and terminal text, for runs and sweeps.

HTML pages are self-contained: inline CSS, images as data URIs, a content security policy that
forbids every network request, and a script that records whether every image decoded.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence

from qkspectra.report.files import PLOTS_FOLDER
from qkspectra.report.layout import Paragraph, Plot, Section, Table

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #f6f7f9;
       margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.2rem 1.5rem 3rem; background: #fff; }
h1 { font-size: 1.5rem; margin: 0.2rem 0; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #dde1e7; padding-bottom: 0.2rem; }
.subtitle { color: #555e6d; margin: 0 0 0.8rem; }
nav { font-size: 0.9rem; margin-bottom: 1rem; }
nav a { margin-right: 0.8rem; color: #2f5fa5; }
p.verdict-supported, p.verdict-partial, p.verdict-rejected { padding: 0.6rem 0.9rem; border-radius: 6px;
       font-weight: 600; border-left: 6px solid; }
p.verdict-supported { background: #e8f6ec; border-color: #2e9a4d; }
p.verdict-partial { background: #fff5e0; border-color: #e09b1a; }
p.verdict-rejected { background: #fdeceb; border-color: #cc3b30; }
p.note { color: #6b5a00; background: #fffbe6; padding: 0.3rem 0.6rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e6e9ee; text-align: right; white-space: nowrap; }
th { background: #f0f2f5; }
td:first-child, th:first-child, th.text { text-align: left; }
td.text { text-align: left; white-space: normal; max-width: 40rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e6e9ee; }
figcaption { font-size: 0.88rem; color: #555e6d; }
"""

# Runs in the page: records whether every image decoded, for the browser test and for readers.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.dataset.imagesTotal = String(images.length);
  document.body.dataset.imagesBroken = String(broken.length);
  document.body.dataset.imagesOk = broken.length === 0 ? "true" : "false";
});
"""

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def escape(text: str) -> str:
    """Text as HTML, quotes included."""
    return html.escape(text, quote=True)


def _numeric(cell: str) -> bool:
    """A figure (or n/a, or blank): right-aligned in tables."""
    return cell.lstrip("+-").replace(".", "", 1).replace("e-", "", 1).isdigit() or cell in ("n/a", "")


def _numeric_columns(table: Table) -> list[bool]:
    """Which columns hold figures only (right-aligned); the first column is always a label."""
    return [i > 0 and all(_numeric(row[i]) for row in table.rows) for i in range(len(table.columns))]


def html_block(block: Paragraph | Table | Plot, images: Mapping[str, bytes]) -> str:
    """One block as HTML; a plot's image is inlined from images (plot name -> PNG bytes)."""
    if isinstance(block, Paragraph):
        cls = f' class="{escape(block.style)}"' if block.style else ""
        return f"<p{cls}>{escape(block.text)}</p>"
    if isinstance(block, Table):
        cls = ["" if n else ' class="text"' for n in _numeric_columns(block)]
        head = "".join(f"<th{c}>{escape(name)}</th>" for c, name in zip(cls, block.columns)) if any(block.columns) else ""
        body = "".join("<tr>" + "".join(f"<td{c}>{escape(cell)}</td>" for c, cell in zip(cls, row)) + "</tr>" for row in block.rows)
        thead = f"<thead><tr>{head}</tr></thead>" if head else ""
        return f'<div class="table-wrap"><table>{thead}<tbody>{body}</tbody></table></div>'
    data = base64.b64encode(images[block.name]).decode("ascii")
    return (
        f'<figure id="fig-{escape(block.name)}"><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
        f"<figcaption>{escape(block.caption)}</figcaption></figure>"
    )


def html_nav(sections: Sequence[Section]) -> str:
    """Links to every section, for a page's <nav>."""
    return "".join(f'<a href="#{escape(s.anchor)}">{escape(s.title)}</a>' for s in sections)


def html_sections(sections: Sequence[Section], images: Mapping[str, bytes]) -> str:
    """Every section as HTML; images: plot name -> PNG bytes."""
    return "\n".join(
        f'<section id="{escape(s.anchor)}"><h2>{escape(s.title)}</h2>\n' + "\n".join(html_block(b, images) for b in s.blocks) + "</section>"
        for s in sections
    )


def html_page(title: str, subtitle: str, nav: str, body: str, css: str = "") -> str:
    """A self-contained page: inline CSS (the report's, then ``css``), the image check, no network request.
    nav and body are HTML already escaped; title and subtitle are text."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}{css}</style>\n<script>{IMAGE_CHECK}</script>\n</head>\n"
        f'<body>\n<main>\n<h1>{escape(title)}</h1>\n<p class="subtitle">{escape(subtitle)}</p>\n'
        f"<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


# The page's rules a fragment needs (verdict paragraphs, tables), scoped to the fragment.
FRAGMENT_SELECTORS = ("p.verdict", "p.note", ".table-wrap", "table", "th", "td")


def fragment_css(scope: str) -> str:
    """The page's CSS rules a fragment needs (FRAGMENT_SELECTORS), each selector scoped to the class ``scope``."""
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", CSS)
    return "".join(", ".join(f".{scope} {part.strip()}" for part in selectors.split(",")) + f" {{{body}}}"
                   for selectors, body in rules if selectors.strip().startswith(FRAGMENT_SELECTORS))


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_block(block: Paragraph | Table | Plot) -> str:
    """One block as Markdown; a plot is referenced as plots/NAME.png."""
    if isinstance(block, Paragraph):
        if block.style and block.style.startswith("verdict-"):
            return f"**{block.text}**"
        return f"> {block.text}" if block.style == "note" else block.text
    if isinstance(block, Table):
        columns = [(_md_cell(c) or " ") for c in block.columns]
        rule = "|".join("---:" if numeric else "---" for numeric in _numeric_columns(block))
        lines = ["| " + " | ".join(columns) + " |", f"|{rule}|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    return f"![{block.name}]({PLOTS_FOLDER}/{block.name}.png)\n\n*{block.caption}*"


def markdown_sections(sections: Sequence[Section]) -> list[str]:
    """Every section as Markdown lines: a heading, then each block after a blank line."""
    out: list[str] = []
    for s in sections:
        out += ["", f"## {s.title}"]
        for block in s.blocks:
            out += ["", markdown_block(block)]
    return out


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A table as terminal lines: columns padded to their widest cell, trailing blanks stripped."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines
