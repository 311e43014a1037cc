"""Inline SVG charts for the run report: score histograms and precision-recall curves.

Plain strings of SVG, no script, no external font or stylesheet, every text escaped; colours are
``#rrggbb``. Used by :mod:`cryosam_ray.report`.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

_FONT = 'font-family="sans-serif" font-size="11"'
_AXIS = "#555"
_GRID = "#ddd"


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """(r, g, b) 0-255 -> ``#rrggbb``."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _num(value: float) -> str:
    """A short, locale-free label for an axis tick."""
    if not math.isfinite(value):
        return "-"
    return f"{value:.3g}"


def histogram_svg(values: dict[str, np.ndarray], colours: dict[str, str], *, bins: int = 20,
                  label: str = "score", width: int = 420, row_height: int = 56) -> str:
    """Histograms of ``values`` per class, one row each, sharing bin edges (the range of every
    finite value of every class) so that rows compare.

    Args:
        values: class -> (N,) float values; NaN and infinite values are counted apart
            ("n without score") and left out of the bars.
        colours: class -> ``#rrggbb``.
        bins: number of bins.
        label: what the x axis measures.

    Returns:
        An ``<svg>`` element as a string (``role="img"``, with a ``<title>``).
    """
    finite = {c: np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for c, v in values.items()}
    every = np.concatenate([v for v in finite.values()] + [np.zeros(0)])
    lo, hi = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    left, right, top = 110, 12, 8
    plot_w = width - left - right
    height = top + row_height * max(1, len(values)) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" class="chart"><title>{escape(label)} per class, histogram</title>']
    for i, (cls, vals) in enumerate(finite.items()):
        y0 = top + i * row_height
        base = y0 + row_height - 14
        counts, _ = np.histogram(vals, edges)
        peak = max(1, int(counts.max()) if counts.size else 1)
        n_missing = int(np.asarray(values[cls]).size - vals.size)
        name = escape(str(cls))
        out.append(f'<text x="{left - 6}" y="{base - 18}" text-anchor="end" {_FONT}>{name}</text>')
        note = f"n = {vals.size}, peak {peak}" + (f", {n_missing} without {escape(label)}" if n_missing else "")
        out.append(f'<text x="{left - 6}" y="{base - 4}" text-anchor="end" {_FONT} fill="#666">{note}</text>')
        out.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="{_AXIS}"/>')
        bar_w = plot_w / bins
        for j, count in enumerate(counts):
            if not count:
                continue
            h = (row_height - 20) * count / peak
            out.append(f'<rect x="{left + j * bar_w + 0.5:.1f}" y="{base - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                       f'height="{h:.1f}" fill="{escape(colours.get(cls, "#888"))}">'
                       f'<title>{name}: {count} in [{_num(edges[j])}, {_num(edges[j + 1])})</title></rect>')
    axis_y = top + row_height * max(1, len(values)) + 12
    out.append(f'<text x="{left}" y="{axis_y}" {_FONT}>{_num(lo)}</text>')
    out.append(f'<text x="{left + plot_w}" y="{axis_y}" text-anchor="end" {_FONT}>{_num(hi)}</text>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{axis_y + 14}" text-anchor="middle" {_FONT}>'
               f'{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def pr_curve_svg(curves: dict[str, tuple[list[float], list[float]]], colours: dict[str, str], *,
                 notes: dict[str, str] | None = None, size: int = 320) -> str:
    """Precision (y) against recall (x), one polyline per class, both axes 0 to 1.

    Args:
        curves: class -> (recall, precision), points in rank order.
        colours: class -> ``#rrggbb``.
        notes: class -> text after its name in the legend (e.g. its AP).

    Returns:
        An ``<svg>`` element as a string, with a legend of the classes.
    """
    left, bottom, pad = 44, 36, 12
    plot = size - left - pad
    legend_h = 16 * len(curves)
    height = pad + plot + bottom + legend_h
    width = size

    def px(r: float, p: float) -> str:
        return f"{left + r * plot:.1f},{pad + (1 - p) * plot:.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" class="chart"><title>precision-recall curve per class</title>']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" y1="{pad + (1 - t) * plot:.1f}" x2="{left + plot}" '
                   f'y2="{pad + (1 - t) * plot:.1f}" stroke="{_GRID}"/>')
        out.append(f'<line x1="{left + t * plot:.1f}" y1="{pad}" x2="{left + t * plot:.1f}" y2="{pad + plot}" '
                   f'stroke="{_GRID}"/>')
        out.append(f'<text x="{left - 4}" y="{pad + (1 - t) * plot + 4:.1f}" text-anchor="end" {_FONT}>{t:g}</text>')
        out.append(f'<text x="{left + t * plot:.1f}" y="{pad + plot + 14}" text-anchor="middle" {_FONT}>{t:g}</text>')
    out.append(f'<rect x="{left}" y="{pad}" width="{plot}" height="{plot}" fill="none" stroke="{_AXIS}"/>')
    out.append(f'<text x="{left + plot / 2:.0f}" y="{pad + plot + 28}" text-anchor="middle" {_FONT}>recall</text>')
    out.append(f'<text x="12" y="{pad + plot / 2:.0f}" text-anchor="middle" {_FONT} '
               f'transform="rotate(-90 12 {pad + plot / 2:.0f})">precision</text>')
    for i, (cls, (recall, precision)) in enumerate(curves.items()):
        colour = escape(colours.get(cls, "#888"))
        points = [(float(r), float(p)) for r, p in zip(recall, precision) if math.isfinite(r) and math.isfinite(p)]
        if points:
            path = " ".join(px(r, p) for r, p in [(0.0, points[0][1])] + points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
                       f'<title>{escape(str(cls))}</title></polyline>')
        y = pad + plot + bottom + 16 * i + 4
        out.append(f'<rect x="{left}" y="{y}" width="12" height="3" fill="{colour}"/>')
        label = escape(str(cls) + (f" {notes[cls]}" if notes and cls in notes else "")
                       + ("" if points else " (no picks)"))
        out.append(f'<text x="{left + 18}" y="{y + 5}" {_FONT}>{label}</text>')
    out.append("</svg>")
    return "".join(out)
