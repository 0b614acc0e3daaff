"""The comparison report of a sweep: ``sweep.html`` (self-contained, offline), ``sweep.md`` and the plots,
from the sweep document (``sweep.json``). Rendering only: every figure is already in the document.

The page is typeset as the run's report is (``typeset``): the same style sheet, security
policy, image check, tables and figures. The models table comes first, verdict layers first,
each model's name linking to its own ``report.html``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qkspectra.atomic import atomic_write_text
from qkspectra.report.files import PLOTS_FOLDER, check_writable, write_images
from qkspectra.report.layout import Plot, Section, Table, fmt
from qkspectra.report.sweep_readers import (
    HEADLINE,
    VERDICT_COLUMNS,
    describe_sweep,
    headline_figures,
    label_columns,
    numeric_labels,
    plot_name,
    verdict_codes,
)
from qkspectra.report.typeset import (escape, fragment_css, html_block, html_nav, html_page, html_sections, markdown_block,
                                      markdown_sections, text_table)

CAPTIONS = {
    "sweep_schedules": "Mean temperature T over heads (anchor: the last layer) against relative depth layer / (L - 1), "
    "one line per model.",
    "sweep_verdicts": "The layered verdict of every model: overall, then each layer (supported / partial / rejected / n/a).",
}
AGAINST_CAPTION = "Each key figure of the models table against the label {label}."
SWEEP_CSS = """
td.code-supported { background: #e8f6ec; } td.code-partial { background: #fff5e0; }
td.code-rejected { background: #fdeceb; } td.code-n\\/a { color: #8a93a3; }
td.failed { color: #cc3b30; font-weight: 600; }
"""


def _headline_text(x: Any) -> str:
    """A headline figure: three significant digits for floats."""
    return "n/a" if x is None else format(x, ".3g") if isinstance(x, float) else fmt(x)


def models_table(document: Mapping[str, Any]) -> Table:
    """Models by figures: name, status, the verdict layers, the headline figures, the labels, the model."""
    labels = label_columns(document)
    rows = []
    for m in document["models"]:
        figures = headline_figures(m)
        rows.append((m["name"], m["status"], *verdict_codes(m), *(_headline_text(v) for v in figures.values()),
                     *(fmt(m["labels"].get(label)) for label in labels), m["model"]))
    columns = ("model name", "status", *(c.replace("_", " ") for c in VERDICT_COLUMNS), *HEADLINE, *labels, "model")
    return Table(columns, tuple(rows))


def sweep_sections(document: Mapping[str, Any], figures: Sequence[str]) -> list[Section]:
    """Everything after the models table, laid out once for both pages."""
    models = document["models"]
    failed = [m for m in models if m["status"] != "ok"]
    sections = []
    against = {plot_name(label): label for label in numeric_labels(document)}
    plots = [Plot(name, CAPTIONS.get(name) or AGAINST_CAPTION.format(label=against.get(name, name))) for name in figures]
    if plots:
        sections.append(Section("Plots", tuple(plots), "plots"))
    if failed:
        sections.append(Section("Failures", (Table(("model name", "model", "error"),
                                                   tuple((m["name"], m["model"], m["error"] or "") for m in failed)),), "failures"))
    timing_keys = list(dict.fromkeys(k for m in models for k in (m.get("timings") or {})))
    timings = Table(("model name", "run", *timing_keys),
                    tuple((m["name"], m.get("run") or "failed", *(fmt((m.get("timings") or {}).get(k), 1) for k in timing_keys))
                          for m in models))
    engine = document["engine"]
    settings = [(f"option {k}", fmt(v)) for k, v in document["settings"]["options"].items()]
    rows = [
        ("engine", engine["name"]), ("cluster", fmt(engine.get("cluster"))), ("scheduler", engine["scheduler"]), ("workers", fmt(engine["workers"])),
        *((f"{k} version", v) for k, v in engine["versions"].items()),
        ("dask version", engine["dask_version"]), ("distributed version", engine["distributed_version"]),
        ("groups", fmt(document["settings"]["groups"])), ("functional test", fmt(document["settings"]["functional"])),
        *settings, ("started", document["started"]), ("finished", document["finished"]), ("wall time (s)", fmt(document["wall_s"], 1)),
    ]
    sections.append(Section("Timings (s)", (timings,), "timings"))
    sections.append(Section("Engine and settings", (Table(("", ""), tuple(rows)),), "engine"))
    return sections


def _models_html(document: Mapping[str, Any], table: Table) -> str:
    """The models table, each name linking to the model's report.html, each verdict cell coloured by its code."""
    code_columns = range(2, 2 + len(VERDICT_COLUMNS))
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    body = []
    for m, row in zip(document["models"], table.rows):
        cells = []
        for i, cell in enumerate(row):
            if i == 0 and m["status"] == "ok":
                cells.append(f'<td><a href="{escape(m["run_dir"])}/report.html">{escape(cell)}</a></td>')
            elif i in code_columns:
                cells.append(f'<td class="code-{escape(cell)}">{escape(cell)}</td>')
            elif i == 1 and cell != "ok":
                cells.append(f'<td class="failed">{escape(cell)}</td>')
            else:
                cells.append(f'<td class="text">{escape(cell)}</td>' if i == len(row) - 1 else f"<td>{escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table-wrap"><table id="models"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def render_sweep_html(document: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """sweep.html: one self-contained page (inline CSS, images as data URIs, no network request)."""
    sections = sweep_sections(document, list(images))
    title = "qkspectra sweep"
    nav = '<a href="#models">Models</a>' + html_nav(sections)
    models = f'<section id="models-section"><h2>Models</h2>\n{_models_html(document, models_table(document))}</section>'
    body = html_sections(sections, images)
    return html_page(title, describe_sweep(document), nav, f"{models}\n{body}", SWEEP_CSS)


def render_sweep_markdown(document: Mapping[str, Any], figures: Sequence[str]) -> str:
    """sweep.md: the same tables and numbers; names link to each model's report.md, images are plots/NAME.png."""
    table = models_table(document)
    linked = tuple(
        ((f"[{row[0]}]({m['run_dir']}/report.md)" if m["status"] == "ok" else row[0]), *row[1:])
        for m, row in zip(document["models"], table.rows)
    )
    out = ["# qkspectra sweep", "", describe_sweep(document), "", "## Models", "",
           markdown_block(Table(table.columns, linked)), *markdown_sections(sweep_sections(document, figures))]
    return "\n".join(out) + "\n"


def render_sweep_html_summary(document: Mapping[str, Any]) -> str:
    """The models table as an HTML fragment (a sweep's display in Jupyter), styled as the page, without links."""
    table = models_table(document)
    return (f'<div class="qkspectra"><style>{fragment_css("qkspectra")}{SWEEP_CSS}</style>'
            f'<p>{escape("qkspectra sweep: " + describe_sweep(document))}</p>{html_block(table, {})}</div>')


def render_sweep_summary(document: Mapping[str, Any]) -> str:
    """Terminal text after a sweep: name, status, verdict layers and the headline figures, one line per model."""
    table = models_table(document)
    keep = 2 + len(VERDICT_COLUMNS) + len(HEADLINE)
    rows = [r[:keep] for r in table.rows]
    return "\n".join(text_table(table.columns[:keep], rows)) + "\n"


def sweep_paths(out_dir: Path) -> list[Path]:
    """The sweep's own files in out_dir (the plots of numeric labels besides)."""
    return [out_dir / "sweep.json", out_dir / "sweep.html", out_dir / "sweep.md",
            *(out_dir / PLOTS_FOLDER / f"{name}.png" for name in CAPTIONS)]


def check_sweep_outputs(out_dir: Path) -> None:
    """QkspectraError, before anything runs, if a folder or a file stands where a sweep file must go."""
    check_writable(sweep_paths(out_dir))


def write_sweep_report(document: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """out_dir/plots/sweep_*.png, out_dir/sweep.html and out_dir/sweep.md, each written atomically; name -> path."""
    from qkspectra.report.plots import png_bytes
    from qkspectra.report.sweep_plots import sweep_figures

    out_dir = Path(out_dir)
    figures = sweep_figures(document, title=describe_sweep(document))
    images = {name: png_bytes(fig) for name, fig in figures.items()}
    page, markdown = render_sweep_html(document, images), render_sweep_markdown(document, list(images))
    paths = write_images(images, out_dir)
    paths["html"] = atomic_write_text(out_dir / "sweep.html", page)
    paths["markdown"] = atomic_write_text(out_dir / "sweep.md", markdown)
    return paths
