"""The operator dashboard's pages: the portfolio table and one model's operational history.

Server-rendered HTML with inline CSS and SVG only (no scripts: the dashboard's
Content-Security-Policy allows none). Every string that came from a user — model
names, reasons, actors, detector names — goes through ``html.escape``.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from projections.status import ModelStatus
from projections.timeline import TimelineItem
from server.report_charts import GRID, INK, LOWERED, MUTED, RAISED, fmt, performance_chart
from server.report_html import CSS
from server.status_command import format_age

EXTRA_CSS = """
main{max-width:1180px}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:13px;color:#fff}
.learning{background:#2f8a4c}.paused{background:#c2571a}.rollout{background:#2563a8}
nav{font-size:14px;margin-bottom:8px}nav a{color:#2563a8}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.kpi{background:#f3f6f9;padding:8px 14px;border-radius:6px;min-width:120px}
.kpi b{display:block;font-size:20px}.kpi span{color:#6b7785;font-size:13px}.kpi span.state{color:#fff;font-size:15px}
td.n,th.n{white-space:nowrap}
"""
# Marker colour of each timeline kind (the SVG strip and the table share it).
KIND_COLOURS = {
    "gate": "#b7791f",
    "drift": LOWERED,
    "rollback": "#7b3fa0",
    "pause": "#52606d",
    "resume": "#2f8a4c",
    "rebaseline": RAISED,
    "rollout": "#1c7c8c",
    "registered": INK,
    "other": MUTED,
}
TIMELINE_LANES = ("gate", "drift", "rollback", "pause", "rollout")
MAX_TIMELINE_ROWS = 200


def page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    """A whole dashboard page around ``body`` (already escaped HTML)."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"{refresh}<title>{escape(title)}</title><style>{CSS}{EXTRA_CSS}</style></head>\n<body><main>\n"
        f"{body}\n</main></body></html>\n"
    )


def render_portfolio(rows: Sequence[ModelStatus], *, refresh_s: int = 15) -> str:
    """``/``: every model's status in one table, linking to each model's page."""
    head = (
        "<tr><th>model</th><th>state</th><th class='n'>version</th><th class='n'>serving</th>"
        "<th class='n'>lag (labels)</th><th class='n'>oldest</th><th class='n'>recent loss</th>"
        "<th>drift</th><th>rollout</th><th class='n'>accepted</th><th class='n'>rejected</th>"
        "<th class='n'>rollbacks</th></tr>"
    )
    body = "".join(_portfolio_row(r) for r in rows) or "<tr><td colspan='12'>No models are registered.</td></tr>"
    paused = sum(r.state == "paused" for r in rows)
    rolling = sum(r.state == "rollout" for r in rows)
    lagging = sum(r.lag_labels for r in rows)
    summary = (
        f'<p class="sub">{len(rows)} model(s): {len(rows) - paused - rolling} learning, {paused} paused, '
        f"{rolling} in rollout · {lagging} label(s) waiting to be learned · refreshed every {refresh_s} s · "
        '<a href="/api/status">JSON</a></p>'
    )
    return page(
        "learnledger — model portfolio",
        f"<h1>Model portfolio</h1>\n{summary}\n<div class='wide'><table>{head}{body}</table></div>",
        refresh_s=refresh_s,
    )


def _portfolio_row(r: ModelStatus) -> str:
    link = f'<a href="{model_url(r.name)}">{escape(r.name)}</a>'
    reason = f"<br><span class='note'>{escape(r.pause_reason)}</span>" if r.paused and r.pause_reason else ""
    return (
        f"<tr><td>{link}</td><td>{state_badge(r.state)}{reason}</td><td class='n'>{r.version}</td>"
        f"<td class='n'>{r.serving_version}</td><td class='n'>{r.lag_labels}</td>"
        f"<td class='n'>{format_age(r.lag_oldest_s)}</td><td class='n'>{_loss(r.recent_loss)}</td>"
        f"<td>{escape(drift_text(r))}</td><td>{escape(rollout_text(r))}</td>"
        f"<td class='n'>{r.updates_applied}</td><td class='n'>{r.updates_rejected}</td>"
        f"<td class='n'>{r.rollbacks}</td></tr>"
    )


def render_model(
    status: ModelStatus,
    timeline: Sequence[TimelineItem],
    performance: dict[str, Any],
    losses: Sequence[dict[str, Any]],
    recent_predictions: Sequence[str],
) -> str:
    """``/models/<name>``: state, charts over versions, the timeline, and links to the reports.

    Args:
        status: the model's status row.
        timeline: its operational facts, oldest first.
        performance: ``PerformanceSeries.to_json()`` of the model.
        losses: ``projections.status.loss_series`` of its accepted updates.
        recent_predictions: ids of recent decisions to offer explanations for.
    """
    name = status.name
    kpis = "".join(
        f'<div class="kpi"><b>{value}</b><span>{label}</span></div>'
        for value, label in (
            (state_badge(status.state), "state"),
            (status.version, "head version"),
            (status.serving_version, "serving version"),
            (_lag(status), "labels waiting to be learned"),
            (_loss(status.recent_loss), f"recent loss (last {status.recent_updates} updates)"),
            (f"{status.updates_applied} / {status.updates_rejected}", "updates accepted / rejected"),
            (status.rollbacks, "rollbacks"),
            (escape(drift_text(status)), "drift detections"),
        )
    )
    paused = (
        f'<p class="bad">Learning is paused: {escape(status.pause_reason or "no reason given")}</p>'
        if status.paused
        else ""
    )
    sections = [
        f'<nav><a href="/">← portfolio</a></nav><h1>Model “{escape(name)}”</h1>',
        f'<p class="sub">{escape(status.kind)} · <a href="{model_url(name)}/report">regulator report</a> · '
        f'<a href="/api/status">status JSON</a></p>',
        f'<div class="kpis">{kpis}</div>{paused}',
        "<h2>Rollout</h2>" + _rollout(status),
        f"<h2>{escape(str(performance.get('metric', 'accuracy')).capitalize())} over versions</h2>"
        + performance_chart(
            performance.get("points", []),
            str(performance.get("metric", "accuracy")),
            status.serving_version,
            mark_text=f"serving (version {status.serving_version})",
        ),
        "<h2>Loss over versions</h2><p class='note'>Mean loss of the served state on each batch it then learned "
        "from (loss before the update).</p>"
        + (
            performance_chart(losses, "loss", status.version, mark_text=f"head (version {status.version})")
            if losses
            else "<p>No accepted update yet.</p>"
        ),
        "<h2>Timeline</h2>" + timeline_chart(timeline, status.version) + _timeline_table(timeline),
        "<h2>Explanations</h2>" + _explanations(recent_predictions),
    ]
    return page(f"learnledger — model {name}", "\n".join(sections))


def _rollout(s: ModelStatus) -> str:
    if s.rollout is None:
        return "<p>No rollout in progress: one version serves all traffic.</p>"
    r = s.rollout
    return (
        f"<p class='summary'>Candidate version <b>{r['candidate_version']}</b> serves <b>{r['fraction']:.0%}</b> "
        f"of traffic (stage {r['stage']}); champion version <b>{r['champion_version']}</b> serves the rest. "
        "Learning waits until the rollout completes or is aborted.</p>"
    )


def timeline_chart(items: Sequence[TimelineItem], head_version: int, *, width: int = 1100) -> str:
    """An SVG strip over model versions: one lane per kind, one marker per fact."""
    lanes = [k for k in TIMELINE_LANES if any(_lane(i.kind) == k for i in items)]
    if not lanes:
        return "<p>No gate refusal, drift, rollback, pause or rollout is recorded.</p>"
    left, right, top, lane_h = 90, 20, 10, 26
    height = top + lane_h * len(lanes) + 34
    span = max(head_version - 1, 1)

    def px(version: int) -> float:
        return left + (version - 1) / span * (width - left - right)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="operational events over model versions">'
    ]
    for n, lane in enumerate(lanes):
        y = top + n * lane_h + lane_h / 2
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" stroke="{GRID}"/>')
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end" fill="{MUTED}" font-size="12">{lane}</text>')
        for item in (i for i in items if _lane(i.kind) == lane):
            colour = KIND_COLOURS.get(item.kind, MUTED)
            parts.append(
                f'<circle cx="{px(item.version):.1f}" cy="{y}" r="6" fill="{colour}">'
                f"<title>v{item.version} {escape(item.detail)}</title></circle>"
            )
    axis = top + lane_h * len(lanes) + 16
    for k in range(6):
        version = 1 + span * k / 5
        parts.append(
            f'<text x="{px(round(version)):.1f}" y="{axis}" text-anchor="middle" fill="{MUTED}" '
            f'font-size="12">{version:.0f}</text>'
        )
    parts.append(
        f'<text x="{left + (width - left - right) / 2}" y="{axis + 16}" text-anchor="middle" fill="{MUTED}" '
        'font-size="12">model version</text></svg>'
    )
    return "\n".join(parts)


def _lane(kind: str) -> str:
    return "pause" if kind == "resume" else "rollout" if kind == "rebaseline" else kind


def _timeline_table(items: Sequence[TimelineItem]) -> str:
    shown = list(reversed(items))[:MAX_TIMELINE_ROWS]  # newest first
    rows = "".join(
        f"<tr class='event-{escape(i.kind)}'><td class='n'>{i.version}</td><td class='n'>"
        f"{escape(i.time.isoformat(timespec='seconds'))}</td>"
        f"<td><span style='color:{KIND_COLOURS.get(i.kind, MUTED)}'>●</span> {escape(i.kind)}</td>"
        f"<td>{escape(i.detail)}{_figures(i)}{_explain_link(i)}</td><td>{escape(i.actor)}</td></tr>"
        for i in shown
    )
    more = f"<p class='note'>Newest {MAX_TIMELINE_ROWS} of {len(items)} shown.</p>" if len(items) > len(shown) else ""
    return (
        "<table><tr><th class='n'>version</th><th class='n'>time</th><th>kind</th><th>what happened</th>"
        f"<th>actor</th></tr>{rows}</table>{more}"
    )


def _figures(item: TimelineItem) -> str:
    if not item.figures:
        return ""
    text = ", ".join(f"{k} = {fmt(v)}" for k, v in item.figures)
    return f"<br><span class='note'>{escape(text)}</span>"


def _explain_link(item: TimelineItem) -> str:
    if item.prediction_id is None:
        return ""
    return f' · <a href="{explain_url(str(item.prediction_id))}">explain the decision it fired at</a>'


def _explanations(prediction_ids: Sequence[str]) -> str:
    links = "".join(f'<li><a href="{explain_url(p)}">{escape(p)}</a></li>' for p in prediction_ids)
    recent = (
        f"<p>Decisions of the latest batch the model learned from:</p><ul>{links}</ul>"
        if links
        else "<p>No decision has been learned from yet.</p>"
    )
    form = (
        '<form method="get" action="/predictions/explain"><label>Explain any decision: '
        '<input name="id" size="40" placeholder="prediction id"></label> <button>explain</button></form>'
    )
    return recent + form


def state_badge(state: str) -> str:
    """A coloured badge for ``learning``, ``paused`` or ``rollout``."""
    return f'<span class="state {escape(state)}">{escape(state)}</span>'


def drift_text(s: ModelStatus) -> str:
    """``0``, or the count and the last detector with its version."""
    if not s.drift_detections:
        return "0"
    return f"{s.drift_detections} (last: {s.last_drift_detector} at v{s.last_drift_version})"


def rollout_text(s: ModelStatus) -> str:
    """``-``, or the candidate, its stage and traffic share."""
    if s.rollout is None:
        return "-"
    r = s.rollout
    return f"v{r['candidate_version']} at stage {r['stage']} ({r['fraction']:.0%})"


def model_url(name: str) -> str:
    """The path of a model's page (names are restricted, but quote anyway)."""
    return f"/models/{quote(name, safe='')}"


def explain_url(prediction_id: str) -> str:
    """The path of a decision's explanation page."""
    return f"/predictions/{quote(prediction_id, safe='')}/explain"


def error_page(status: int, message: str) -> str:
    """A minimal error page (the message is escaped)."""
    return page(f"learnledger — {status}", f"<h1>{status}</h1><p>{escape(message)}</p><p><a href='/'>portfolio</a></p>")


def _lag(s: ModelStatus) -> str:
    return f"{s.lag_labels} (oldest {format_age(s.lag_oldest_s)})" if s.lag_labels else "0"


def _loss(value: float | None) -> str:
    return "-" if value is None else fmt(value)
