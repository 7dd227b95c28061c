"""A model's own ``with_sharding_constraint`` in the chooser: what a candidate layout of a group pays where it
disagrees with one.

XLA keeps a constraint's layout whatever the plan (:mod:`tpflax._src.trace.constraints`). A candidate that splits
the constrained dims as the constraint does pays nothing more; one that keeps them whole has its kernels meet split
features anyway: each sums or gathers around its matmul, and its gradient comes out split, summed over the batch on
its shard, updated split and gathered back. The quantities are the estimate's
(:func:`tpflax._src.cost.whole.constrained_dims`, :func:`tpflax._src.cost.whole.whole_reads`,
:func:`tpflax._src.cost.stream.split_grad_items`), from the same pure functions
(:mod:`tpflax._src.cost.disagree`), over the candidate's proposals instead of a plan.

Measured (XLA:CPU, data=2,model=4): the Flax guide's scanned ``MultiDotReluDot`` at 256 -> 64 under its own
``P('data', 'model')``, kept whole by the chooser before: 679,940 B of compiled collectives per step; the Megatron
split that agrees with the constraint, which the chooser now picks: 90,116 B (tests/test_constraint_plan.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tpflax._src.cost.disagree import (
    disagreeing,
    gate_seconds,
    kernel_reads,
    reached_whole,
    replicated,
)
from tpflax._src.cost.price import OPT_COPIES, ActComm, gathered_bytes
from tpflax._src.facts.tree import narrower
from tpflax._src.mesh import FSDP, TENSOR
from tpflax._src.specs import Entry, entry_axes


@dataclass(frozen=True)
class Pins:
    """What the chooser needs of a traced model's constraints (None without any: nothing to price).

    Attributes:
        constrained: ``(path, leaf dim, mesh axes)`` a constraint lays out (:attr:`Dataflow.constraints`).
        meets: :meth:`tpflax._src.trace.records.Dataflow.meets`.
        dots: :meth:`tpflax._src.trace.records.Dataflow.dots`.
        direct: the kernels that read a constrained value as it is (:attr:`Dataflow.direct`).
        derived: the kernels whose matmul reads them through an op (:meth:`Dataflow.derived_dots`).
        remat: most of the model's matmuls run rematerialised (:attr:`Dataflow.remat`): the layers' forward
            collectives run again in the recompute.
    """

    constrained: tuple[tuple[str, int, tuple[str, ...]], ...]
    meets: tuple[tuple[str, int, str, int], ...]
    dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
    direct: frozenset[str] = frozenset()
    derived: frozenset[str] = frozenset()
    remat: bool = False


def pins(flow: Any) -> Pins | None:
    """The :class:`Pins` of a :class:`~tpflax._src.trace.records.Dataflow`, or None when no constraint splits a
    parameter's dim (the common case: no work for the chooser)."""
    if not flow.constraints:
        return None
    return Pins(tuple(sorted({(flow.uses[u].path, d, axes) for u, d, axes in flow.constraints})),
                flow.meets(), flow.dots(), frozenset(flow.uses[u].path for u in flow.direct),
                flow.derived_dots(), flow.remat >= 0.5)


def pinned(st: Any, o: Any, facts: Mapping[str, Any]) -> Any:
    """``o`` (an :class:`~tpflax._src.planner.choose.Option`) with the collectives XLA compiles where its layout
    disagrees with the model's constraints (``st.pins``): a group kept whole on the tensor axes whose dims a
    constraint splits (its whole members' part the estimate leaves to a split pair's own:
    :func:`tpflax._src.cost.whole.whole_members`), or a split group whose dims a constraint replicates."""
    p = st.pins
    if p is None:
        return o
    props = dict(o.proposals)
    tensor = set(st.mesh.axes_with(TENSOR))

    def split(path: str, d: int) -> frozenset[str]:  # another group's leaf: not this candidate's to price
        spec = props[path].spec if path in props else ()
        return frozenset(entry_axes(spec[d]) if d < len(spec) else ()) & tensor

    if any(split(path, d) for path in props for d in range(len(props[path].spec))):
        return _replicated(st, o, facts, split, tensor)
    starts = disagreeing([c for c in p.constrained if c[0] in props], tensor, split)
    acts, grads = list(o.acts), dict(o.pieces)
    for axes, begin in sorted(starts.items()):
        hits = reached_whole(p.meets, begin, lambda path: path in props)
        seconds = gate_seconds(p.meets, p.dots, {q: {d for r, d in hits if r == q} for q, _ in hits})
        for path in sorted({q for q, _ in hits}):
            f, use = facts[path], p.dots.get(path)
            if use is None:
                continue
            in_w = math.prod(f.leaf.shape[i] for i in use[0])
            for r in kernel_reads(path, axes, in_w, math.prod(f.body) // max(in_w, 1),
                                  {d for q, d in hits if q == path}, use, f.stacked > 0 or path in p.derived,
                                  cast=bool(narrower(st.casts.get(path, ""), f.leaf.itemsize)),
                                  remat=p.remat and f.kind not in ("embedding", "head"), gate=path in seconds):
                acts.append(ActComm(r.kind, axes, r.size, 1 + r.redo, f"kept whole against the model's sharding "
                                                                      f"constraint: {r.how}"))
        leaves = split_updated(st, [facts[q] for q in sorted({q for q, _ in hits})])
        grads.update(dict.fromkeys((f.path for f in leaves), math.prod(st.mesh.sizes[a] for a in axes)))
        acts += update_gathers(st, axes, leaves, "the whole kernels whose gradient the constraint splits")
    return replace(o, acts=tuple(acts), pieces=tuple(sorted(grads.items())))


def _replicated(st: Any, o: Any, facts: Mapping[str, Any], split: Any, tensor: set[str]) -> Any:
    """A split candidate ``o`` with the gathers XLA compiles where a constraint replicates an activation dim it
    splits (:func:`tpflax._src.cost.disagree.replicated`): the activation, and each reader's kernel whole."""
    p, props, acts = st.pins, dict(o.proposals), list(o.acts)
    mine = [c for c in p.constrained if c[0] in props]
    tpu = st.context.hardware.kind == "tpu"

    for path, d, axes, readers in replicated(mine, tensor, split, p.meets, p.dots):
        f, use = facts[path], p.dots[path]
        in_w = math.prod(f.leaf.shape[i] for i in use[0])
        width = in_w if d in use[0] else math.prod(f.body) // max(in_w, 1)
        acts.append(ActComm("all-gather", axes, width, 1,
                            "an activation the model's sharding constraint replicates: gathered there (forward)"))
        acts += [ActComm("all-gather", axes, 0, 1, "a kernel contracting an activation the model's sharding "
                         "constraint replicates: gathered whole (backward)",
                         gathered_bytes(facts[q].leaf.nbytes, facts[q].leaf.itemsize, tpu),  # TPU: f32 as bf16
                         every_layer=True)
                 for q in readers if q in props and q in p.direct]
        if any(q in props and q not in p.direct for q in readers):
            acts.append(ActComm("all-gather", axes, width, 1, "the input gradient of a kernel reading, through an "
                                "op, an activation the model's sharding constraint replicates: gathered (backward)"))
    return replace(o, acts=tuple(acts))


def split_updated(st: Any, leaves: Sequence[Any]) -> list[Any]:
    """The trained ``leaves`` (kept whole on the tensor axes) whose update XLA runs split once a tensor split
    splits their gradient, on the chooser's hardware: kernels on TPU (the estimate: XLA:CPU every leaf,
    XLA:TPU two or more dims, GPU none; :func:`tpflax._src.cost.stream.update_gathers`)."""
    tpu = st.context.hardware.kind == "tpu"
    return [g for g in leaves if tpu and g.leaf.trainable and len(g.body) >= 2]


def update_gathers(st: Any, entry: Entry, leaves: Sequence[Any], what: str) -> tuple[ActComm, ...]:
    """The gathers of :func:`split_updated` ``leaves`` over ``entry``: each parameter and its
    :data:`~tpflax._src.cost.price.OPT_COPIES` moments after the split update, or, under the step's fsdp pinning
    (an fsdp axis in the mesh), the gradient once, whole, before an update as stored."""
    if not leaves:
        return ()
    pinned_fsdp = st.mesh.group(FSDP)[1] > 1
    how = "the gradient, where the step pins it" if pinned_fsdp else "each and its moments, after the split update"
    return (ActComm("all-gather", entry, 0, 1 if pinned_fsdp else 1 + OPT_COPIES, f"gather {what}: {how}",
                    sum(g.leaf.nbytes for g in leaves), every_layer=True),)
