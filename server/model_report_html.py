"""The model-level report as a self-contained HTML page, in the explanation report's style.

Inline CSS and SVG only (``server.report_html``'s stylesheet and ``server.report_charts``),
so the page can be mailed, archived or printed to PDF as it is. Input: the mapping
``projections.model_report.model_report`` returns.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from server.report_charts import GRID, INK, MUTED, RAISED, fmt, performance_chart
from server.report_html import CSS

EXTRA_CSS = "td.n,th.n{white-space:nowrap}.wide{overflow-x:auto}"


def render_model_report_html(report: dict[str, Any]) -> str:
    """The whole page for one model report mapping (every table open, so it prints as is).

    Args:
        report: ``model_report(...)``'s mapping.
    """
    sections = [
        _header(report),
        _versions(report),
        _changes(report),
        _operations(report),
        _envelope(report),
        _performance(report),
        _attestation(report),
        _glossary(),
    ]
    title = f"Model report — {report['model']}, {_day(report['period']['from'])} to {_day(report['period']['to'])}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body><main>\n"
        + "\n".join(sections)
        + "\n</main></body></html>\n"
    )


def _header(r: dict[str, Any]) -> str:
    s, period = r["summary"], r["period"]
    value = (
        f" Of the {s['labeled']} decisions whose outcome was reported later, the {s['metric']} was "
        f"<b>{_value(s['metric'], s['value'])}</b>."
        if s["labeled"]
        else " No outcome has been reported for any of them yet."
    )
    changes = (
        f"In the period the model learned in {s['updates_applied']} steps, refused {s['updates_rejected']}, "
        f"was rolled back {s['rollbacks']} time(s) and paused {s['pauses']} time(s)."
    )
    return (
        f"<h1>What model “{escape(r['model'])}” did, and how it changed</h1>\n"
        f'<p class="sub">From {_when(period["from"])} to {_when(period["to"])} · '
        f"registered {_when(r['registered_at'])} by {escape(r['registered_by'])} · "
        f"now at version {r['head_version']}</p>\n"
        f'<p class="summary">In this period <b>{s["versions_served"]}</b> version(s) of the model served '
        f"<b>{s['predictions']}</b> decisions.{value} {changes}</p>"
    )


def _versions(r: dict[str, Any]) -> str:
    metric = r["summary"]["metric"]
    rows = "".join(
        f"<tr><td class='n'>{v['version']}</td><td>{escape(v['created_by'])}<br><span class='note'>"
        f"{_when(v['created_at'])}, by {escape(v['actor'])}</span></td>"
        f"<td>{_served(v)}</td><td class='n'>{v['predictions']}</td><td class='n'>{v['labeled']}</td>"
        f"<td class='n'>{_value(metric, v['value']) if v['labeled'] else '–'}</td>"
        f"<td class='n'>{_num(v['update_norm'])}</td><td class='n'>{_num(v['max_abs_weight_change'])}</td></tr>"
        for v in r["versions"]
    )
    return (
        "<h2>Which versions served</h2>\n"
        "<p>Every version that served a decision in the period, or was created in it. A new version is made by "
        "every recorded change: a learning step, a rollback, a pause or a resume. The last two columns are the "
        "size of the change that made the version, recomputed by replaying the recorded history: the overall "
        "size of the change to the parameters (‖Δθ‖) and the largest change to a single weight (max |Δw|).</p>\n"
        f"<details open><summary>{len(r['versions'])} versions</summary><div class='wide'><table>"
        "<tr><th class='n'>version</th><th>how it came to be</th><th>served</th><th class='n'>decisions</th>"
        f"<th class='n'>with outcome</th><th class='n'>{escape(metric)}</th><th class='n'>‖Δθ‖</th>"
        f"<th class='n'>max |Δw|</th></tr>{rows}</table></div></details>"
    )


def _changes(r: dict[str, Any]) -> str:
    points = [(v["version"], v["update_norm"]) for v in r["versions"] if v["update_norm"] is not None]
    return (
        "<h2>How much each change moved the model</h2>\n"
        "<p>The size of the change to the parameters (‖Δθ‖) at each version; a rollback shows as the jump back.</p>\n"
        + update_norm_chart(points)
    )


def _operations(r: dict[str, Any]) -> str:
    out = ["<h2>Who intervened, and why</h2>"]
    ops = r["operations"]
    if ops:
        rows = "".join(
            f"<tr><td class='n'>{o['version']}</td><td>{o['kind']}"
            + (f" to version {o['to_version']}" if o["to_version"] else "")
            + f"</td><td>{_when(o['time'])}</td><td>{escape(o['actor'])}</td><td>{escape(o['reason'])}</td></tr>"
            for o in ops
        )
        out.append(
            "<table><tr><th class='n'>version</th><th>action</th><th>when</th><th>who</th><th>reason</th></tr>"
            f"{rows}</table>"
        )
    else:
        out.append("<p>Nobody paused, resumed or rolled back the model in this period.</p>")
    rejected = r["gate"]["rejected"]
    if rejected:
        rows = "".join(
            f"<tr><td class='n'>{g['version']}</td><td>{_when(g['time'])}</td><td>{escape(g['reason'])}</td>"
            f"<td class='n'>{g['examples']}</td></tr>"
            for g in rejected
        )
        out.append(
            f"<p>The learning gate refused {len(rejected)} step(s); the model did not change:</p><table>"
            "<tr><th class='n'>version</th><th>when</th><th>reason</th><th class='n'>examples</th></tr>"
            f"{rows}</table>"
        )
    else:
        out.append(f"<p>The learning gate refused no step in this period ({escape(r['gate']['note'])}).</p>")
    out.append(f'<p class="note">Drift: {escape(r["drift"])}.</p>')
    return "\n".join(out)


def _envelope(r: dict[str, Any]) -> str:
    e = r["envelope"]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in e["hyperparameters"].items())
    return (
        "<h2>The declared change envelope</h2>\n"
        f"<p>{escape(e['note'])}</p>\n"
        f"<table>{rows}<tr><th>largest ‖Δθ‖ in the period</th><td>{_num(e['max_update_norm'])}</td></tr>"
        f"<tr><th>largest |Δw| in the period</th><td>{_num(e['max_abs_weight_change'])}</td></tr></table>"
    )


def _performance(r: dict[str, Any]) -> str:
    perf = r["performance"]
    last = max((v["version"] for v in r["versions"] if v["predictions"]), default=r["head_version"])
    return (
        "<h2>How accurate the model has been</h2>\n<p>For each stretch of versions over the model's whole history, "
        f"the {escape(perf['metric'])} of its decisions against the outcomes reported later ({perf['labeled']} "
        "labeled decisions). Every decision was made before its outcome was known.</p>\n"
        + performance_chart(perf["points"], perf["metric"], last, mark_text=f"end of the period (version {last})")
    )


def _attestation(r: dict[str, Any]) -> str:
    t = r["attestation"]
    return (
        "<h2>What this report rests on</h2>\n"
        f"<p>The event log up to position <b>{t['log_position']}</b>; {escape(t['replay'])}.</p>\n"
        f"<table><tr><th>seal</th><td><code>{escape(t['seal'])}</code></td></tr>"
        f"<tr><th>coverage</th><td>{escape(t['seal_note'])}</td></tr></table>"
    )


def _glossary() -> str:
    return (
        '<h2>Words used here</h2>\n<p class="note"><b>Version</b>: every recorded change to the model is a new '
        "version. <b>‖Δθ‖</b>: the Euclidean length of the change to all parameters. <b>max |Δw|</b>: the largest "
        "change to one weight. <b>Gate</b>: the check a learning step must pass before it may serve. "
        "<b>Rollback</b>: making an earlier version's parameters current again, recorded as a new version.</p>"
    )


def update_norm_chart(points: list[tuple[int, float]], *, width: int = 760, height: int = 220) -> str:
    """Bars of ``‖Δθ‖`` over model versions (inline SVG)."""
    if not points:
        return "<p>No change to the parameters in the period.</p>"
    left, right, top, bottom = 56, 20, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    first, last = points[0][0], points[-1][0]
    span = max(last - first, 1)
    y_max = max(v for _, v in points) or 1.0
    bar = max(1.0, plot_w / (span + 1) * 0.8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'role="img" aria-label="size of each change over model versions">'
    ]
    for k in range(5):
        value = y_max * k / 4
        y = top + plot_h - value / y_max * plot_h
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}" font-size="12">{fmt(value)}</text>'
        )
    for version, value in points:
        x = left + (version - first) / span * (plot_w - bar)
        h = value / y_max * plot_h
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" '
            f'fill="{RAISED}"><title>version {version}: {fmt(value)}</title></rect>'
        )
    for k in range(6):
        tick = first + span * k / 5
        x = left + (tick - first) / span * (plot_w - bar) + bar / 2
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 18}" text-anchor="middle" fill="{MUTED}" font-size="12">'
            f"{tick:.0f}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" fill="{INK}" font-size="12">'
        "model version</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _served(v: dict[str, Any]) -> str:
    if not v["predictions"]:
        return "<span class='note'>served nothing in the period</span>"
    return f"{_when(v['first_prediction'])}<br>to {_when(v['last_prediction'])}"


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if metric == "accuracy" else fmt(value)


def _num(value: float | None) -> str:
    return "–" if value is None else fmt(value)


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%-d %b %Y %H:%M:%S %Z").replace("UTC+00:00", "UTC")


def _day(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%-d %B %Y")
