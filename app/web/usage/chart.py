"""The usage page's chart: spending by China day as an inline SVG sized for a phone."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from app.core.config import units_to_yuan

WIDTH, HEIGHT = 360, 200
TOP, BOTTOM, SIDE = 30, 24, 6
LABEL_EVERY = 7  # a date under the last bar and every 7th before it


def _bar(i: int, slot: float, day: str, units: int, peak: int) -> str:
    """Return one day's bar, its date and amount in a tooltip."""
    usable = HEIGHT - TOP - BOTTOM
    height = max(round(usable * units / peak, 1), 1.0) if units else 0.0
    x = round(SIDE + i * slot + slot * 0.15, 1)
    label = f"{int(day[4:6])}月{int(day[6:])}日"
    return (f'<rect class="bar" x="{x}" y="{round(HEIGHT - BOTTOM - height, 1)}" '
            f'width="{round(slot * 0.7, 1)}" height="{height}" fill="#16a34a">'
            f"<title>{escape(label)}：{units_to_yuan(units)} 元</title></rect>")


def _label(i: int, n: int, slot: float, day: str) -> str:
    """Return the date under a bar (m/d); the last one ends at the chart's edge."""
    cx = round(SIDE + i * slot + slot / 2, 1)
    x, anchor = (WIDTH - SIDE, "end") if i == n - 1 else (cx, "middle")
    return (f'<text x="{x}" y="{HEIGHT - 8}" font-size="10" text-anchor="{anchor}" '
            f'fill="#6b7280">{int(day[4:6])}/{int(day[6:])}</text>')


def spending_chart(days: Sequence[tuple[str, int]]) -> Markup:
    """Return an <svg> with one bar per (yyyymmdd, units) and the busiest day's amount."""
    n = max(1, len(days))
    peak = max((units for _, units in days), default=0)
    slot = (WIDTH - SIDE * 2) / n
    title = f"每日消费（元），最高 {units_to_yuan(peak)}" if peak else "每日消费（元）"
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" preserveAspectRatio="xMidYMid meet">',
             f"<title>{escape(title)}</title>",
             f'<text x="{SIDE}" y="16" font-size="12" fill="#374151">{escape(title)}</text>',
             f'<line x1="{SIDE}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - SIDE}" '
             f'y2="{HEIGHT - BOTTOM}" stroke="#9ca3af"/>']
    for i, (day, units) in enumerate(days):
        if peak:
            parts.append(_bar(i, slot, day, units, peak))
        if (n - 1 - i) % LABEL_EVERY == 0:
            parts.append(_label(i, n, slot, day))
    if not peak:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                     'font-size="12" fill="#6b7280">这段时间没有消费</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
