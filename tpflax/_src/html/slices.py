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


def _display_dims(shape: Sequence[int], spec) -> tuple[int | None, int]:
    """(row dim, column dim) to draw a leaf with: its split dims first, else its last dims."""
    split = [i for i, e in enumerate(entries(spec, len(shape))) if entry_axes(e)]
    dims = sorted((split + [i for i in reversed(range(len(shape))) if i not in split])[:2])
    return (None, dims[0]) if len(dims) == 1 else (dims[0], dims[1])


def _tensor(shape: Sequence[int], spec, cells, fills: dict, top: int) -> tuple[list[str], int, int]:
    """The leaf as a rectangle cut into the blocks devices hold, in their cells' colours.

    Returns (svg parts, width, height) of the drawing.
    """
    if not shape:
        return [], 0, 0
    rdim, cdim = _display_dims(shape, spec)
    n_r, n_c = (shape[rdim] if rdim is not None else 1), shape[cdim]
    w = 220
    h = 30 if rdim is None else int(min(max(w * n_r / max(n_c, 1), 100), 240))  # readable, not to scale
    left = 30
    blocks: dict[tuple, list[int]] = {}
    for index, (_, ranges, _) in enumerate(cells):
        key = (ranges[rdim] if rdim is not None else (0, 1), ranges[cdim], ranges)
        blocks.setdefault(key[:2], [key[2]]).append(index)
    out = [f'<text x="{left + w / 2}" y="{top - 9}" class="axislabel">dim {cdim}: {n_c}</text>']
    if rdim is not None:
        out.append(f'<text x="{left - 10}" y="{top + h / 2}" class="axislabel" '
                   f'transform="rotate(-90 {left - 10} {top + h / 2})">dim {rdim}: {n_r}</text>')
    for ((ra, rb), (ca, cb)), (ranges, *devices) in blocks.items():
        x, bw = left + w * ca / max(n_c, 1), w * (cb - ca) / max(n_c, 1)
        y, bh = top + h * ra / max(n_r, 1), h * (rb - ra) / max(n_r, 1)
        names = ",".join(map(str, devices))
        label = (f'<text x="{x + bw / 2:.1f}" y="{y + bh / 2 + 4:.1f}" class="blocklabel">{names}</text>'
                 if bw > 7 * len(names) + 6 and bh > 15 else "")
        out.append(f'<g class="block"><title>device{"s" if len(devices) > 1 else ""} {", ".join(map(str, devices))}'
                   f' hold {esc(slice_text(shape, ranges))}</title><rect x="{x:.1f}" y="{y:.1f}" '
                   f'width="{bw:.1f}" height="{bh:.1f}" fill="{fills[ranges]}"/>{label}</g>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="outline"/>')
    return out, left + w + 40, h


def mesh_svg(shape: Sequence[int], spec, mesh: MeshShape) -> str:
    """The leaf cut into blocks, and the mesh as a grid of devices labelled with the slice each holds.

    >>> from tpflax._src.mesh import mesh_shape
    >>> svg = mesh_svg((8, 6), ("model", None), mesh_shape({"data": 2, "model": 2}))
    >>> svg.count('class="cell"'), svg.count('class="block"'), "[4:8, :]" in svg
    (4, 2, True)
    """
    if mesh.size > MAX_CELLS:
        return (f'<p class="note">{mesh.size} devices: too many to draw (at most {MAX_CELLS}); '
                f'{esc(describe(shape, spec, mesh))}.</p>')
    rows, cols = _layout(mesh)
    n_rows, n_cols = math.prod(s for _, s in rows), math.prod(s for _, s in cols)
    cells = [(pos, ranges, slice_text(shape, ranges)) for pos, ranges in device_slices(shape, spec, mesh)]
    fills: dict[tuple, str] = {}
    for _, ranges, _ in cells:
        fills.setdefault(ranges, PALETTE[len(fills) % len(PALETTE)])
    top = 26
    tensor, x0, tensor_h = _tensor(shape, spec, cells, fills, top)
    # ~7 user units per monospace character at the slice font size
    cw = max(132, 7 * max(len(t) for _, _, t in cells) + 24)
    ch, left = 50, x0 + (104 if rows else 8)
    width = left + n_cols * cw + 8
    height = top + max(n_rows * ch, tensor_h) + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="mesh" data-devices="{mesh.size}" '
           f'viewBox="0 0 {width} {height}" width="{width}" role="img">', *tensor]
    for c, pos in enumerate(itertools.product(*(range(s) for _, s in cols))):
        label = " ".join(f"{n}={i}" for (n, _), i in zip(cols, pos, strict=True))
        out.append(f'<text x="{left + c * cw + cw / 2}" y="{top - 9}" class="axislabel">{esc(label)}</text>')
    for r, pos in enumerate(itertools.product(*(range(s) for _, s in rows))):
        label = " ".join(f"{n}={i}" for (n, _), i in zip(rows, pos, strict=True))
        out.append(f'<text x="{left - 8}" y="{top + r * ch + ch / 2 + 4}" class="axislabel rowlabel">'
                   f'{esc(label)}</text>')
    for index, (pos, ranges, text) in enumerate(cells):
        r, c = divmod(index, n_cols)
        where = ", ".join(f"{n}={i}" for n, i in zip(mesh.names, pos, strict=True))
        x, y = left + c * cw, top + r * ch
        out.append(f'<g class="cell" data-device="{index}" data-slice="{esc(text)}">'
                   f'<title>device {index} ({esc(where)}) holds {esc(text)}</title>'
                   f'<rect x="{x + 2}" y="{y + 2}" width="{cw - 4}" height="{ch - 4}" rx="5" fill="{fills[ranges]}"/>'
                   f'<text x="{x + 10}" y="{y + 19}" class="dev">device {index}</text>'
                   f'<text x="{x + 10}" y="{y + 37}" class="slice">{esc(text)}</text></g>')
    out.append("</svg>")
    return "".join(out)
