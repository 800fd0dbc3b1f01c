"""Inline SVG bar charts drawn on the server (no JavaScript, no external assets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 220
TOP, BOTTOM, LEFT = 24, 40, 8


def bar_chart(title: str, bars: Sequence[tuple[str, int]],
              fmt: Callable[[int], str] = str) -> Markup:
    """Return an <svg> with one labelled bar per (label, value); values are non-negative."""
    n = max(1, len(bars))
    peak = max((v for _, v in bars), default=0) or 1
    slot = (WIDTH - LEFT * 2) / n
    bar_w = max(2.0, slot * 0.7)
    usable = HEIGHT - TOP - BOTTOM
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">',
             f"<title>{escape(title)}</title>",
             f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - LEFT}" '
             f'y2="{HEIGHT - BOTTOM}" stroke="#999"/>']
    for i, (label, value) in enumerate(bars):
        h = round(usable * max(value, 0) / peak, 1)
        x = round(LEFT + i * slot + (slot - bar_w) / 2, 1)
        y = HEIGHT - BOTTOM - h
        cx = round(x + bar_w / 2, 1)
        parts.append(f'<rect class="bar" x="{x}" y="{y}" width="{round(bar_w, 1)}" '
                     f'height="{h}" fill="#3b82f6"><title>{escape(label)}: '
                     f"{escape(fmt(value))}</title></rect>")
        if value:
            parts.append(f'<text x="{cx}" y="{y - 4}" font-size="10" text-anchor="middle">'
                         f"{escape(fmt(value))}</text>")
        parts.append(f'<text x="{cx}" y="{HEIGHT - BOTTOM + 14}" font-size="10" '
                     f'text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
