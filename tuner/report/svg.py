"""Line charts as inline SVG: no plotting library, no script, nothing fetched, so a report stays one file."""

from __future__ import annotations

import math
from html import escape

Series = list[tuple[float, float]]

WIDTH, HEIGHT = 520, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 40
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float, step: float) -> str:
    """A tick label with just enough decimals to tell neighbouring ticks `step` apart."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.2e}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{decimals}f}"


def _text(x: float, y: float, text: str, anchor: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" class="tick" text-anchor="{anchor}">{escape(text)}</text>'


def line_chart(title: str, series: dict[str, Series], x_label: str = "step") -> str:
    """An SVG chart of each named series (points drawn as a line, single points as dots), with a legend."""
    points = [point for values in series.values() for point in values if math.isfinite(point[1])]
    if not points:
        return ""
    x_ticks = nice_ticks(min(x for x, _ in points), max(x for x, _ in points))
    y_ticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="18" class="title">{escape(title)}</text>',
    ]
    for tick in y_ticks:
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" class="grid"/>'
        )
        parts.append(_text(LEFT - 6, py(tick) + 4, _label(tick, y_ticks[1] - y_ticks[0]), "end"))
    for tick in x_ticks:
        parts.append(_text(px(tick), TOP + plot_h + 16, _label(tick, x_ticks[1] - x_ticks[0]), "middle"))
    parts.append(_text(LEFT + plot_w / 2, HEIGHT - 6, x_label, "middle"))
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        if len(finite) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in finite if len(finite) <= 30 else []:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        legend_x, legend_y = LEFT + max(150, 7 * len(title) + 24) + (index % 3) * 110, 9 + (index // 3) * 12
        parts.append(f'<rect x="{legend_x}" y="{legend_y}" width="12" height="4" fill="{colour}"/>')
        parts.append(_text(legend_x + 16, legend_y + 7, name, "start"))
    parts.append("</svg>")
    return "\n".join(parts)
