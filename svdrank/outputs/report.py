"""The optional HTML report of `svdrank plot --html`: one self-contained file.

The summary table of every plan and each figure as an inline PNG, so the file
can be attached to a pull request or a CI run and opened anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

from svdrank.types import RankPlan


def summary_table_html(plans: Sequence[RankPlan]) -> str:
    """Render each plan's totals as an HTML table: parameters, share of full tuning, energy."""
    rows = "".join(
        f"<tr><td>{html.escape(p.rule.label)}</td><td>{p.params:,}</td>"
        f"<td>{p.params / p.full_params:.2%}</td><td>{p.energy:.2%}</td></tr>"
        for p in plans
        if p.full_params
    )
    return (
        "<table><tr><th>plan</th><th>LoRA parameters</th><th>of full fine-tuning</th>"
        f"<th>energy kept</th></tr>{rows}</table>"
    )


def html_report(figures: Mapping[str, Figure], summary: str) -> str:
    """Render one self-contained HTML page: the summary table and every figure as an inline PNG."""
    sections = []
    for stem, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        sections.append(
            f'<h2>{html.escape(stem)}</h2>\n<img alt="{html.escape(stem)}" '
            f'src="data:image/png;base64,{encoded}">'
        )
    body = "\n".join(sections)
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>svdrank report</title>'
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "img{max-width:100%}td,th{padding:2px 10px;text-align:right}</style></head><body>\n"
        f"<h1>svdrank report</h1>\n{summary}\n{body}\n</body></html>\n"
    )
    return page
