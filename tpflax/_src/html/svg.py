"""Inline SVG for the HTML report: stacked horizontal bar charts with byte axes.

No plotting library: a chart is a few rectangles and labels, and every
rectangle carries the exact number it draws (``data-bytes``) so a test or a
reader of the source can check it against the estimate.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tpflax._src.specs import fmt_bytes

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_STEPS = (0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)


def esc(text: object) -> str:
    """Text escaped for HTML and XML alike (attribute values included).

    >>> esc('params/<h>/"k"&1')
    'params/&lt;h&gt;/&quot;k&quot;&amp;1'
    """
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Bar:
    """One stacked bar: a label and ``(category, bytes)`` segments, drawn in order.

    Attributes:
        label: shown left of the bar.
        segments: ``(category, bytes)``; zero-byte segments are not drawn.
        attrs: extra ``data-*`` attributes set on every segment (e.g. ``{"bar": "per_device"}``).
    """

    label: str
    segments: tuple[tuple[str, float], ...]
    attrs: Mapping[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(v for _, v in self.segments)


def ticks(top: float) -> list[tuple[float, str]]:
    """Round byte values (1, 2, 2.5 or 5 times a power of ten, in binary units) from 0 to ``top``.

    >>> [t for _, t in ticks(5 * 2**30)]
    ['0', '1 GiB', '2 GiB', '3 GiB', '4 GiB', '5 GiB']
    >>> [t for _, t in ticks(2**20)]
    ['0', '0.2 MiB', '0.4 MiB', '0.6 MiB', '0.8 MiB', '1 MiB']
    """
    if top <= 0:
        return [(0, "0")]
    k = 0
    while top >= 1024 ** (k + 1) and k < len(_UNITS) - 1:
        k += 1
    unit = 1024 ** k
    step = next((s for s in _STEPS if top / unit / s <= 6), _STEPS[-1])  # at most 6 gridlines
    out = [(0, "0")]
    n = 1
    while n * step * unit <= top * 1.0001:
        out.append((n * step * unit, f"{n * step:g} {_UNITS[k]}"))
        n += 1
    return out


def bar_chart(bars: Sequence[Bar], colors: Mapping[str, str], *, kind: str, width: int = 760,
              label_width: int = 190) -> str:
    """Horizontal stacked bars on one shared byte scale, as an ``<svg>`` element.

    Args:
        bars: the bars, top to bottom.
        colors: fill per category.
        kind: the chart's name, set as ``data-chart`` on the svg.
        width: the drawing's width in user units (it scales to its container).
        label_width: room for the bar labels on the left.

    >>> svg = bar_chart([Bar("one device", (("params", 2048.0),))], {"params": "#4c78a8"}, kind="memory")
    >>> 'data-bytes="2048"' in svg and svg.startswith("<svg")
    True
    """
    top = max((b.total for b in bars), default=0.0)
    marks = ticks(top)
    scale_top = max(top, marks[-1][0]) or 1.0
    x0, x1 = label_width, width - 90
    bar_h, gap, y0 = 30, 16, 24
    height = y0 + len(bars) * (bar_h + gap) + 4

    def x(v: float) -> float:
        return x0 + (x1 - x0) * v / scale_top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{esc(kind)}" '
           f'viewBox="0 0 {width} {height}" width="100%" role="img">']
    for value, text in marks:
        out.append(f'<line x1="{x(value):.1f}" y1="{y0 - 6}" x2="{x(value):.1f}" y2="{height - 4}" '
                   'class="grid"/>')
        out.append(f'<text x="{x(value):.1f}" y="{y0 - 10}" class="tick">{esc(text)}</text>')
    for i, bar in enumerate(bars):
        y = y0 + i * (bar_h + gap)
        out.append(f'<text x="{x0 - 10}" y="{y + bar_h / 2 + 4:.1f}" class="barlabel">{esc(bar.label)}</text>')
        out += _segments(bar, y, bar_h, x, colors)
        out.append(f'<text x="{x(bar.total) + 8:.1f}" y="{y + bar_h / 2 + 4:.1f}" class="total" '
                   f'data-total="{bar.total:.0f}">{esc(fmt_bytes(bar.total))}</text>')
    out.append("</svg>")
    return "".join(out)


def _segments(bar: Bar, y: float, h: float, x, colors: Mapping[str, str]) -> list[str]:
    out = []
    at = 0.0
    extra = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in bar.attrs.items())
    for category, value in bar.segments:
        if value <= 0:
            continue
        left, right = x(at), x(at + value)
        w = max(right - left, 0.75)  # a sliver stays visible: tiny categories still show
        out.append(f'<g class="seg"><rect x="{left:.1f}" y="{y}" width="{w:.1f}" height="{h}" '
                   f'fill="{colors.get(category, "#999")}" data-category="{esc(category)}" '
                   f'data-bytes="{value:.0f}"{extra}><title>{esc(bar.label)}: {esc(category)} '
                   f'{esc(fmt_bytes(value))} ({value:.0f} bytes)</title></rect>')
        if w > 64:
            out.append(f'<text x="{left + w / 2:.1f}" y="{y + h / 2 + 4:.1f}" class="seglabel">'
                       f'{esc(fmt_bytes(value))}</text>')
        out.append("</g>")
        at += value
    return out


def legend(colors: Mapping[str, str], names: Sequence[str]) -> str:
    """An HTML legend: one swatch per category in ``names``.

    >>> legend({"params": "#4c78a8"}, ["params"])
    '<div class="legend"><span><i style="background:#4c78a8"></i>params</span></div>'
    """
    items = "".join(f'<span><i style="background:{colors.get(n, "#999")}"></i>{esc(n)}</span>' for n in names)
    return f'<div class="legend">{items}</div>'
