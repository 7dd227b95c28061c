"""Which slice of a leaf each device holds, and the mesh picture that shows it.

A spec entry naming axes ``(a, b)`` splits its dim into ``size(a) * size(b)``
equal blocks; the device at mesh position ``pos`` holds block
``pos[a] * size(b) + pos[b]`` (the first axis named is the major one, as in
``jax.sharding.NamedSharding``). Axes the spec does not name hold replicas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from tpflax._src.html.svg import esc
from tpflax._src.mesh import MeshShape
from tpflax._src.specs import entries, entry_axes

# Distinct slices get distinct fills; replicas (same slice) share one.
PALETTE = ("#dbe9f6", "#fde2c8", "#d9f0d3", "#f9d5d3", "#e5dbf2", "#f6ecc2", "#d3eeec", "#ecd9e6",
           "#c6dbef", "#fdd0a2", "#c7e9c0", "#fcbba1")
MAX_CELLS = 1024


def device_slices(shape: Sequence[int], spec, mesh: MeshShape):
    """``[(mesh position, ((start, stop) per dim))]`` for every device, in row-major mesh order.

    >>> from tpflax._src.mesh import mesh_shape
    >>> [s for _, s in device_slices((8, 6), ("model", None), mesh_shape({"data": 2, "model": 2}))]
    [((0, 4), (0, 6)), ((4, 8), (0, 6)), ((0, 4), (0, 6)), ((4, 8), (0, 6))]
    """
    sizes = mesh.sizes
    spec = entries(spec, len(shape))
    out = []
    for pos in itertools.product(*(range(s) for _, s in mesh.axes)):
        at = dict(zip(mesh.names, pos, strict=True))
        ranges = []
        for dim, entry in zip(shape, spec, strict=True):
            axes = entry_axes(entry)
            n = math.prod(sizes[a] for a in axes)
            block = 0
            for a in axes:
                block = block * sizes[a] + at[a]
            chunk = -(-dim // n)  # planner specs divide evenly; ceil keeps a padded spec honest
            ranges.append((min(block * chunk, dim), min((block + 1) * chunk, dim)))
        out.append((pos, tuple(ranges)))
    return out


def slice_text(shape: Sequence[int], ranges: Sequence[tuple[int, int]]) -> str:
    """Numpy-style index of a block: ``[:, 768:1536]`` (``:`` for a whole dim).

    >>> slice_text((4, 3072), ((0, 4), (768, 1536)))
    '[:, 768:1536]'
    """
    if not shape:
        return "[] (scalar)"
    return "[" + ", ".join(":" if (a, b) == (0, n) else f"{a}:{b}" for n, (a, b) in zip(shape, ranges,
                                                                                         strict=True)) + "]"


def describe(shape: Sequence[int], spec, mesh: MeshShape) -> str:
    """One sentence: how each dim is split and which axes hold replicas.

    >>> from tpflax._src.mesh import mesh_shape
    >>> describe((768, 3072), (None, "model"), mesh_shape({"data": 2, "model": 4}))
    'dim 1 (3072) split 4 ways over model: 768 each; replicated over data (2 copies)'
    """
    sizes = mesh.sizes
    spec = entries(spec, len(shape))
    parts, used = [], set()
    for i, (dim, entry) in enumerate(zip(shape, spec, strict=True)):
        axes = entry_axes(entry)
        used.update(axes)
        n = math.prod(sizes[a] for a in axes)
        if n > 1:
            parts.append(f"dim {i} ({dim}) split {n} ways over {'+'.join(axes)}: {-(-dim // n)} each")
    rest = [a for a in mesh.names if a not in used and sizes[a] > 1]
    copies = math.prod(sizes[a] for a in rest)
    if rest:
        parts.append(f"replicated over {'+'.join(rest)} ({copies} copies)")
    return "; ".join(parts) or "whole on every device"


def _layout(mesh: MeshShape) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """(row axes, column axes): the last axis goes across, the others down (a 2-D mesh is its grid)."""
    axes = mesh.axes
    return axes[:-1], axes[-1:]


def mesh_svg(shape: Sequence[int], spec, mesh: MeshShape) -> str:
    """The mesh as a grid of devices, each cell labelled with the slice it holds.

    >>> from tpflax._src.mesh import mesh_shape
    >>> svg = mesh_svg((8, 6), ("model", None), mesh_shape({"data": 2, "model": 2}))
    >>> svg.count('class="cell"'), "[4:8, :]" in svg
    (4, True)
    """
    if mesh.size > MAX_CELLS:
        return (f'<p class="note">{mesh.size} devices: too many to draw (at most {MAX_CELLS}); '
                f'{esc(describe(shape, spec, mesh))}.</p>')
    rows, cols = _layout(mesh)
    n_rows, n_cols = math.prod(s for _, s in rows), math.prod(s for _, s in cols)
    cells = [(pos, ranges, slice_text(shape, ranges)) for pos, ranges in device_slices(shape, spec, mesh)]
    # ~7 user units per monospace character at the slice font size
    cw = max(132, 7 * max(len(t) for _, _, t in cells) + 24)
    ch, left, top = 50, (104 if rows else 8), 26
    width, height = left + n_cols * cw + 8, top + n_rows * ch + 8
    fills: dict[tuple, str] = {}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="mesh" data-devices="{mesh.size}" '
           f'viewBox="0 0 {width} {height}" width="{width}" role="img">']
    for c, pos in enumerate(itertools.product(*(range(s) for _, s in cols))):
        label = " ".join(f"{n}={i}" for (n, _), i in zip(cols, pos, strict=True))
        out.append(f'<text x="{left + c * cw + cw / 2}" y="{top - 9}" class="axislabel">{esc(label)}</text>')
    for r, pos in enumerate(itertools.product(*(range(s) for _, s in rows))):
        label = " ".join(f"{n}={i}" for (n, _), i in zip(rows, pos, strict=True))
        out.append(f'<text x="{left - 8}" y="{top + r * ch + ch / 2 + 4}" class="axislabel rowlabel">'
                   f'{esc(label)}</text>')
    for index, (pos, ranges, text) in enumerate(cells):
        r, c = divmod(index, n_cols)
        fill = fills.setdefault(ranges, PALETTE[len(fills) % len(PALETTE)])
        where = ", ".join(f"{n}={i}" for n, i in zip(mesh.names, pos, strict=True))
        x, y = left + c * cw, top + r * ch
        out.append(f'<g class="cell" data-device="{index}" data-slice="{esc(text)}">'
                   f'<title>device {index} ({esc(where)}) holds {esc(text)}</title>'
                   f'<rect x="{x + 2}" y="{y + 2}" width="{cw - 4}" height="{ch - 4}" rx="5" fill="{fill}"/>'
                   f'<text x="{x + 10}" y="{y + 19}" class="dev">device {index}</text>'
                   f'<text x="{x + 10}" y="{y + 37}" class="slice">{esc(text)}</text></g>')
    out.append("</svg>")
    return "".join(out)
