"""Inline SVG bar charts drawn on the server (no JavaScript, no external assets)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 240
TOP, BOTTOM, SIDE = 44, 40, 8
MAX_BAR = 64  # px: one or two bars stay bars, not walls
MAX_LABELS = 16  # more bars than this: label every n-th one


def _bar(label: str, value: int, x: float, width: float, height: float,
         fmt: Callable[[int], str], show_label: bool) -> str:
    """Return one bar, its value on top and (maybe) its label below."""
    y = round(HEIGHT - BOTTOM - height, 1)
    cx = round(x + width / 2, 1)
    text = escape(fmt(value))
    out = (f'<rect class="bar" x="{round(x, 1)}" y="{y}" width="{round(width, 1)}" '
           f'height="{round(height, 1)}" fill="#3b82f6"><title>{escape(label)}: {text}</title>'
           "</rect>")
    if value:
        out += (f'<text x="{cx}" y="{round(y - 4, 1)}" font-size="10" '
                f'text-anchor="middle">{text}</text>')
    if show_label:
        out += (f'<text x="{cx}" y="{HEIGHT - BOTTOM + 14}" font-size="10" '
                f'text-anchor="middle">{escape(label)}</text>')
    return out


def bar_chart(title: str, bars: Sequence[tuple[str, int]],
              fmt: Callable[[int], str] = str) -> Markup:
    """Return an <svg> with a title and one bar per (label, value); values are non-negative."""
    n = max(1, len(bars))
    peak = max((v for _, v in bars), default=0) or 1
    slot = (WIDTH - SIDE * 2) / n
    width = min(MAX_BAR, max(2.0, slot * 0.7))
    usable = HEIGHT - TOP - BOTTOM
    step = -(-n // MAX_LABELS)
    parts = [f'<svg class="chart" role="img" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">',
             f"<title>{escape(title)}</title>",
             f'<text x="{SIDE}" y="18" font-size="13" font-weight="600">{escape(title)}</text>',
             f'<line x1="{SIDE}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - SIDE}" '
             f'y2="{HEIGHT - BOTTOM}" stroke="#999"/>']
    for i, (label, value) in enumerate(bars):
        x = SIDE + i * slot + (slot - width) / 2
        height = usable * max(value, 0) / peak
        show = i % step == 0 or i == n - 1
        parts.append(_bar(label, value, x, width, height, fmt, show))
    if not bars:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                     'fill="#6b7280">没有数据</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
