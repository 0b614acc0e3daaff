"""The report of a run: ``report.html`` (self-contained), ``report.md`` and the plots, from ``analysis.json``.

The content is laid out once (``sections.report_sections``); ``render_html`` and
``render_markdown`` only typeset it, so both carry the same numbers. ``write_report`` renders
the plots (matplotlib, imported only then) and writes every file of a report folder atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkspectra.atomic import atomic_write_text
from qkspectra.geometry import Geometry
from qkspectra.report.files import PLOTS_FOLDER, check_writable, write_images
from qkspectra.report.layout import Paragraph, Table
from qkspectra.report.readers import describe_run, model_name
from qkspectra.report.sections import FIGURE_CAPTIONS, comparison_section, report_sections, verdict_section
from qkspectra.report.typeset import (
    escape,
    fragment_css,
    html_block,
    html_nav,
    html_page,
    html_sections,
    markdown_sections,
    text_table,
)


def render_html(document: Mapping[str, Any], images: Mapping[str, bytes], notes: Sequence[str] = ()) -> str:
    """report.html: one self-contained page (inline CSS, images as data URIs, no network request).

    images: plot name -> PNG bytes, in report order.
    """
    sections = report_sections(document, list(images), notes)
    title = f"qkspectra report: {model_name(document)}"
    return html_page(title, describe_run(document), html_nav(sections), html_sections(sections, images))


def render_markdown(document: Mapping[str, Any], figures: Sequence[str], notes: Sequence[str] = ()) -> str:
    """report.md: the same sections and numbers; images referenced as plots/NAME.png."""
    sections = report_sections(document, figures, notes)
    out = [f"# qkspectra report: {model_name(document)}", "", describe_run(document), *markdown_sections(sections)]
    return "\n".join(out) + "\n"


def render_summary(document: Mapping[str, Any]) -> str:
    """Terminal text after a run: the strategy table, then the verdict(s)."""
    sections = [comparison_section(document), verdict_section(document)]
    out: list[str] = []
    for s in sections:
        out += ["", f"=== {s.title} ==="]
        for block in s.blocks:
            if isinstance(block, Table):
                out += ["  " + line for line in text_table(block.columns, block.rows)]
            elif isinstance(block, Paragraph):
                out.append(f"  {block.text}")
    return "\n".join(out) + "\n"


def render_html_summary(document: Mapping[str, Any]) -> str:
    """The verdict and the strategy table as an HTML fragment (a run's display in Jupyter), styled as the page."""
    sections = [verdict_section(document), comparison_section(document)]
    body = "".join(f"<h3>{escape(s.title)}</h3>" + "".join(html_block(b, {}) for b in s.blocks) for s in sections)
    return (f'<div class="qkspectra"><style>{fragment_css("qkspectra")}</style>'
            f'<p>{escape("qkspectra: " + describe_run(document))}</p>{body}</div>')


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    plots: dict[str, Path]  # name -> PNG file
    html: Path | None
    markdown: Path | None
    notes: tuple[str, ...]  # what was left out and why


def render_plots(document: Mapping[str, Any], geometry: Geometry | None) -> tuple[dict[str, bytes], tuple[str, ...]]:
    """Every plot the inputs allow, as PNG bytes in report order, and a note per plot left out."""
    from qkspectra.report.plots import png_bytes, report_figures

    figure_set = report_figures(document, geometry, title=describe_run(document))
    images = {name: png_bytes(fig) for name, fig in figure_set.figures.items()}
    notes = tuple(f"plot {name} left out: {reason}" for name, reason in figure_set.skipped.items())
    return images, notes


def report_paths(out_dir: Path, *, pages: bool = True) -> list[Path]:
    """Every file a report (or, without ``pages``, a set of plots) may write in ``out_dir``."""
    plots = [out_dir / PLOTS_FOLDER / f"{name}.png" for name in FIGURE_CAPTIONS]
    return plots + ([out_dir / "report.html", out_dir / "report.md"] if pages else [])


def write_plots(document: Mapping[str, Any], geometry: Geometry | None, out_dir: str | Path) -> ReportFiles:
    """out_dir/plots/NAME.png for every plot."""
    check_writable(report_paths(Path(out_dir), pages=False))
    images, notes = render_plots(document, geometry)
    return ReportFiles(write_images(images, Path(out_dir)), None, None, notes)


def write_report(document: Mapping[str, Any], geometry: Geometry | None, out_dir: str | Path) -> ReportFiles:
    """out_dir/plots/*.png, out_dir/report.html and out_dir/report.md, each written atomically."""
    out_dir = Path(out_dir)
    check_writable(report_paths(out_dir))
    images, notes = render_plots(document, geometry)
    page, markdown = render_html(document, images, notes), render_markdown(document, list(images), notes)
    paths = write_images(images, out_dir)  # only once everything has rendered
    html_path = atomic_write_text(out_dir / "report.html", page)
    md_path = atomic_write_text(out_dir / "report.md", markdown)
    return ReportFiles(paths, html_path, md_path, notes)
