"""A line chart as a standalone SVG string: enough for a loss curve, with no plotting library."""

import math
from html import escape


def label(x, y, text, anchor="middle", size=12, rotate=False) -> str:
    turn = f' transform="rotate(-90 {x} {y})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-family="sans-serif" font-size="{size}" '
            f'fill="#333"{turn}>{escape(str(text))}</text>')


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")


def line_chart_svg(series: dict, title: str = "", xlabel: str = "", ylabel: str = "", width: int = 640,
                   height: int = 360) -> str:
    """One polyline per entry of `series` ({name: (xs, ys)}, a legend when there are several), with min/max tick labels
    on both axes. A NaN or infinite point is left out, as a gap in its line. Needs at least one finite point."""
    left, right, top, bottom = 64, 16, 32, 44  # margins for the labels
    finite = [[(x, y) for x, y in zip(*xy) if math.isfinite(x) and math.isfinite(y)] for xy in series.values()]
    xs = [x for points in finite for x, _ in points]
    ys = [y for points in finite for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)  # a single point still gets a scale

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    lines = []
    for i, (name, (x_list, y_list)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        runs = [[]]  # the stretches between non-finite points
        for x, y in zip(x_list, y_list):
            if math.isfinite(x) and math.isfinite(y):
                runs[-1].append(f"{px(x):.1f},{py(y):.1f}")
            elif runs[-1]:
                runs.append([])
        lines += [f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="1.5"/>' for run in runs if run]
        lines += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"/>'
                  for x, y in finite[i] if len(x_list) <= 60]
        if len(series) > 1:
            lines.append(label(width - right - 8, top + 16 * (i + 1), name, anchor="end").replace('fill="#333"', f'fill="{color}"'))
    middle = (top + height - bottom) / 2
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<path d="M{left},{top} V{height - bottom} H{width - right}" fill="none" stroke="#888"/>',
        *lines,
        label(width / 2, 20, title, size=14),
        label(left - 6, py(y1) + 4, f"{y1:.4g}", anchor="end"),
        label(left - 6, py(y0) + 4, f"{y0:.4g}", anchor="end"),
        label(px(x0), height - bottom + 16, f"{x0:g}"),
        label(px(x1), height - bottom + 16, f"{x1:g}"),
        label((left + width - right) / 2, height - 8, xlabel),
        label(14, middle, ylabel, rotate=True),
        "</svg>",
    ]) + "\n"
