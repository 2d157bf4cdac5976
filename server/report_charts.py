"""Inline SVG charts for the HTML reports: no scripts, no external assets, print-friendly."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

RAISED = "#2563a8"
LOWERED = "#c2571a"
INK = "#1f2933"
MUTED = "#6b7785"
GRID = "#d9dee4"
MAX_BARS = 15


def contribution_chart(contributions: Sequence[dict[str, Any]], *, width: int = 760) -> str:
    """Horizontal bars around zero: one per feature, largest first (at most ``MAX_BARS``).

    Args:
        contributions: ``{"feature", "value", "contribution"}`` mappings, ranked.
        width: the SVG's width in pixels.
    """
    rows = list(contributions)[:MAX_BARS]
    if not rows:
        return "<p>No features.</p>"
    label_w, value_w, row_h, top = 230, 70, 30, 28
    plot_w = width - label_w - 2 * value_w
    zero = label_w + value_w + plot_w / 2
    scale = (plot_w / 2) / (max(abs(float(r["contribution"])) for r in rows) or 1.0)
    height = top + row_h * len(rows) + 12
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Contribution of each input">',
        f'<text x="{zero - 8}" y="16" text-anchor="end" fill="{LOWERED}" font-size="13">◀ lowered</text>',
        f'<text x="{zero + 8}" y="16" fill="{RAISED}" font-size="13">raised ▶</text>',
    ]
    for i, row in enumerate(rows):
        y = top + i * row_h
        c = float(row["contribution"])
        length = abs(c) * scale
        x = zero if c >= 0 else zero - length
        colour = RAISED if c >= 0 else LOWERED
        label = f"{row['feature']} = {fmt(float(row['value']))}"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 19}" text-anchor="end" fill="{INK}" font-size="14">{escape(label)}</text>'
        )
        parts.append(
            f'<rect x="{x:.1f}" y="{y + 5}" width="{max(length, 1.0):.1f}" height="{row_h - 10}" '
            f'fill="{colour}" rx="2"/>'
        )
        text_x, anchor = (x + length + 5, "start") if c >= 0 else (x - 5, "end")
        parts.append(
            f'<text x="{text_x:.1f}" y="{y + 19}" text-anchor="{anchor}" fill="{MUTED}" font-size="12">{c:+.3f}</text>'
        )
    parts.append(f'<line x1="{zero}" y1="{top - 4}" x2="{zero}" y2="{height - 8}" stroke="{INK}" stroke-width="1"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def performance_chart(
    points: Sequence[dict[str, Any]],
    metric: str,
    marked_version: int,
    *,
    width: int = 760,
    height: int = 280,
    mark_text: str | None = None,
) -> str:
    """A line over model versions with the decision's version marked.

    Args:
        points: ``{"first_version", "last_version", "labeled", "value"}`` bins, in order.
        metric: ``accuracy`` (plotted on 0..1) or an error measure (0..max).
        marked_version: the version to mark with a dashed line.
        mark_text: the mark's label (default: "this decision (version V)").
    """
    if not points:
        return "<p>No labeled decisions are recorded yet, so there is no accuracy to show.</p>"
    left, right, top, bottom = 56, 20, 20, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    first = min(marked_version, *(int(p["first_version"]) for p in points))
    last = max(marked_version, *(int(p["last_version"]) for p in points))
    span = max(last - first, 1)
    y_max = 1.0 if metric == "accuracy" else max(float(p["value"]) for p in points) * 1.1 or 1.0

    def px(version: float) -> float:
        return left + (version - first) / span * plot_w

    def py(value: float) -> float:
        return top + plot_h - value / y_max * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(metric)} over model versions">'
    ]
    for k in range(6):
        value = y_max * k / 5
        y = py(value)
        label = f"{value:.0%}" if metric == "accuracy" else fmt(value)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}" font-size="12">{label}</text>'
        )
    for k in range(6):
        version = first + span * k / 5
        parts.append(
            f'<text x="{px(version):.1f}" y="{height - bottom + 18}" text-anchor="middle" fill="{MUTED}" '
            f'font-size="12">{version:.0f}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" fill="{MUTED}" font-size="12">'
        "model version</text>"
    )
    coords = [((int(p["first_version"]) + int(p["last_version"])) / 2, float(p["value"])) for p in points]
    path = " ".join(f"{px(v):.1f},{py(a):.1f}" for v, a in coords)
    parts.append(f'<polyline points="{path}" fill="none" stroke="{RAISED}" stroke-width="2"/>')
    for (v, a), p in zip(coords, points, strict=True):
        hit = int(p["first_version"]) <= marked_version <= int(p["last_version"])
        r, fill = (6, LOWERED) if hit else (3, RAISED)
        parts.append(f'<circle cx="{px(v):.1f}" cy="{py(a):.1f}" r="{r}" fill="{fill}"/>')
    mx = px(marked_version)
    parts.append(
        f'<line x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + plot_h}" stroke="{LOWERED}" '
        'stroke-width="2" stroke-dasharray="6 4"/>'
    )
    anchor = "end" if mx > left + plot_w * 0.7 else "start"
    offset = -6 if anchor == "end" else 6
    parts.append(
        f'<text x="{mx + offset:.1f}" y="{top + 14}" text-anchor="{anchor}" fill="{LOWERED}" font-size="13" '
        f'font-weight="bold">{escape(mark_text or f"this decision (version {marked_version})")}</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def fmt(value: float) -> str:
    """A number for people: four significant digits, scientific only when huge or tiny."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"
