"""``report.html``: the report as one self-contained page (table, verdicts and plots inline,
the plots as data URIs; no script, font or style from the network), to open from a cluster's
file share or attach to a message."""

from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left;
         white-space: nowrap; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
ul.verdicts li { font-family: ui-monospace, monospace; font-size: 0.9em; margin: 0.2em 0; }
p.note { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.85em; }
"""


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>(no runs)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols)
                     + "</tr>" for r in rows)
    return f'<table id="results">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n' \
           "</tbody>\n</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem.replace("_", " "))
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def to_html(title: str, rows: list[dict[str, str]], verdicts: list[str], notes: list[str],
            plots: list[Path], method: str = "") -> str:
    """The page; ``method``: how the verdicts are held together (their correction)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if verdicts:
        parts.append("<h2>Verdicts</h2>\n"
                     + (f'<p class="note method">{html.escape(method)}</p>\n' if method else "")
                     + '<ul class="verdicts">'
                     + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>")
    parts += ["<h2>Results</h2>", _table(rows)]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [_image(p) for p in plots]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
