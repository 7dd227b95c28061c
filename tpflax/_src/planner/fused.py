"""Fused kernels under ``plan(..., fused=)``: the naive split, or stored head-aligned.

A fused ``[q | k | v]`` kernel split contiguously over ``n`` tensor ranks (its
spec) leaves rank 0 with q's first heads and none of v, so XLA reshards the
pieces after the model cuts them apart (priced by :mod:`tpflax._src.cost.reshard`).
``fused="aligned"`` keeps the spec and stores the fused dim rank by rank
(:class:`tpflax._src.layout.Interleave`): rank ``r``'s block is ``[q_r | k_r |
v_r]``, whole heads of every piece, when every piece divides by the ranks and,
where the trace or the tree shows the heads, the ranks divide them. The fused
bias (the leaf of the same layer holding the fused dim, split alike) is stored
alike. ``fused="split"`` keeps the model's order and says what aligning would save.

The rule sets mark a fused column's proposal (:attr:`Proposal.fused`: its leaf
dim, the pieces' sizes, the heads limit); this pass reads only those marks and
the final decisions.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

from tpflax._src.errors import OptionError
from tpflax._src.facts.classify import Facts
from tpflax._src.layout import Interleave
from tpflax._src.mesh import DATA, FSDP, MeshShape
from tpflax._src.planner.builders import Options, Proposal
from tpflax._src.planner.decision import Decision
from tpflax._src.specs import entries, entry_axes, fmt_bytes

MODES = ("split", "aligned")


def check_mode(fused: object) -> str:
    """``fused`` as given, or OptionError naming the allowed values.

    >>> check_mode("aligned")
    'aligned'
    """
    if fused not in MODES:
        raise OptionError(f"fused={fused!r} is not one of {', '.join(map(repr, MODES))}: 'split' keeps a fused "
                          "kernel's dim in the model's order, 'aligned' stores it head-aligned rank by rank")
    return str(fused)


def _ranks(d: Decision, dim: int, ms: MeshShape) -> int:
    return math.prod(ms.sizes[a] for a in entry_axes(entries(d.spec, len(d.shape))[dim]))


def _why_not(sizes: Sequence[int], limit: int | None, n: int) -> str:
    """Why the pieces cannot be stored head-aligned over ``n`` ranks ('' when they can).

    >>> _why_not((64, 32, 32), 4, 4), _why_not((48, 48, 48), None, 32)
    ('', 'its pieces (48, 48, 48) do not divide by the 32 ranks')
    """
    if any(s % n for s in sizes):
        return f"its pieces {tuple(sizes)} do not divide by the {n} ranks"
    if limit is not None and limit % n:
        return f"the pieces reshape into heads the {n} ranks do not divide (the dims on the way share {limit})"
    return ""


def _saved(d: Decision, dim: int, sizes: Sequence[int], n: int, ms: MeshShape, opts: Options) -> float:
    """Bytes per device per step of the reshard the estimate prices for the naive split (0: not modelled)."""
    from tpflax._src.cost.reshard import split_columns  # the cost model imports the planner

    cut = split_columns(d.shape[dim], tuple(sizes), n)
    if cut is None:
        return 0.0
    cps, back = cut
    shards = math.prod(size for name, size in ms.axes if dict(ms.roles).get(name) in (DATA, FSDP))
    layers = d.shape[d.layers_dim] if d.layers_dim is not None else 1
    row = opts.tokens / max(shards, 1) * opts.act_item * layers
    return row * (sum(cps) + 2 * back)  # forward permutes, backward all-to-alls


def _bias(facts: Sequence[Facts], kernel: Facts, d: Decision, dim: int,
          decisions: Mapping[str, Decision]) -> tuple[str, int] | None:
    """The fused kernel's bias: another leaf of its layer with one dim as wide as the fused dim, split alike."""
    want = entries(d.spec, len(d.shape))[dim]
    for f in facts:
        if f.unit != kernel.unit or f.path == kernel.path:
            continue
        b = decisions[f.path]
        spec = entries(b.spec, len(b.shape))
        dims = [k for k, n in enumerate(b.shape) if n == d.shape[dim] and spec[k] == want]
        if len(dims) == 1:
            return f.path, dims[0]
    return None


# the tree sees k pieces side by side but not their order: a (heads, k, head_dim) kernel (BLOOM's, GPT-NeoX's
# query_key_value) is head-aligned under the naive split already, and stored rank by rank it is cut apart
# by the model's reshape, which the step can only materialize (BLOOM: 1.6x the naive split's collectives)
_UNTRACED = ("the tree does not show how the model cuts it ([q|k|v] or (heads, k, head_dim), which the "
             "naive split keeps head-aligned already): pass model= to trace it")


def fused_layouts(facts: Sequence[Facts], proposals: Mapping[str, Proposal], decisions: dict[str, Decision],
                  mode: str, ms: MeshShape, opts: Options, guessed: Collection[str] = ()) -> dict[str, Decision]:
    """``decisions`` with the fused kernels' layouts (``mode == "aligned"``) and reasons. A fused column the
    tree heuristics marked (``guessed``: their paths; no trace saw the model cut it) is not laid out."""
    out = dict(decisions)
    by_path = {f.path: f for f in facts}
    for path, p in proposals.items():
        if p.fused is None or path not in decisions:
            continue
        dim, sizes, limit = p.fused
        d = decisions[path]
        n = _ranks(d, dim, ms)
        if n <= 1 or sum(sizes) != d.shape[dim]:
            continue
        why = _why_not(sizes, limit, n) or (_UNTRACED if path in guessed else "")
        saved = _saved(d, dim, sizes, n, ms, opts)
        per_step = f" (~{fmt_bytes(saved)} per device per step)" if saved else ""
        if why:
            if mode == "aligned":
                out[path] = replace(d, reason=d.reason + f"; fused='aligned': kept in the model's order, {why}")
            continue
        if mode == "split":
            out[path] = replace(d, reason=d.reason + f"; fused='aligned' would store it head-aligned and save "
                                                     f"the reshard{per_step}")
            continue
        lay = Interleave(dim, tuple(sizes), n)
        shares = " | ".join(str(s // n) for s in sizes)
        out[path] = replace(d, layout=lay, reason=d.reason + (
            f"; head-aligned: stored rank by rank, each of the {n} ranks holding its share of every piece "
            f"[{shares}], so the step cuts the pieces per rank without the reshard{per_step}; "
            "tpflax.shard/unshard and the checkpoints move it between the model's order and this one"))
        bias = _bias(facts, by_path[path], d, dim, decisions)
        if bias is not None:
            bpath, bdim = bias
            b = out[bpath]
            out[bpath] = replace(b, layout=Interleave(bdim, tuple(sizes), n),
                                 reason=b.reason + f"; head-aligned like {path}: stored rank by rank")
    return out


__all__ = ["MODES", "check_mode", "fused_layouts"]
