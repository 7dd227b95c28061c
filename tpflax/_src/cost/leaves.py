"""A plan's decisions as the cost model reads them: repeated identical layers merged.

An 80-layer model has 80 copies of each layer's leaves, alike in everything the
cost depends on (spec, shape, dtype, kind, pair role, layers dim, trainable,
traced activation shapes). :func:`merge` keeps one representative of each class
of alike leaves (the first, in tree order) with its count; memory and
collectives are priced once per class and multiplied. Pairs merge the same way
when their members are alike one for one. Nothing here depends on the mesh's
sizes, so one merge serves every mesh that shares the plan's specs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tpflax._src.cost.activations import acts_for, layer_key
from tpflax._src.cost.optstate import OptLayout, opt_entries
from tpflax._src.cost.records import Act
from tpflax._src.cost.residual import stack_lengths
from tpflax._src.specs import Entry, entries


@dataclass(frozen=True)
class PairClass:
    """Column -> row pairs alike one for one: the first one's members, and how many pairs."""

    id: int
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    count: int


@dataclass(frozen=True)
class Leaves:
    """Representative decisions and what pricing needs about all of them.

    Attributes:
        decisions: one decision per class of alike leaves, in tree order.
        count: leaves in each representative's class.
        label: the source to report: the path, or the layer group when repeated.
        specs: each representative's spec entries.
        pairs: pair classes, by first pair id.
        in_pair: representatives that are members of a pair.
        column_units: per layer (traced path), the entries of its leaves' last dims
            that are split, in tree order (for activation sizes).
        stacks: traced layer paths inside a scanned stack, with its layer count.
        recurrent: units of recurrent layers.
        opt: optimizer-state leaves alike under this plan, as ``(shape, itemsize,
            entries, count)`` (empty without an optimizer).
        rep_of: every leaf's representative.
    """

    decisions: Mapping[str, Any]
    count: Mapping[str, int]
    label: Mapping[str, str]
    specs: Mapping[str, tuple[Entry, ...]]
    pairs: tuple[PairClass, ...]
    in_pair: frozenset[str]
    column_units: Mapping[str, tuple[Entry, ...]]
    stacks: Mapping[str, int]
    recurrent: frozenset[str]
    opt: tuple[tuple[tuple[int, ...], int, tuple[Entry, ...], int], ...] = ()
    rep_of: Mapping[str, str] = field(default_factory=dict)
    adapters: Mapping[str, int] = field(default_factory=dict)

    def rep(self, path: str) -> str:
        """``path``'s representative: the leaf that stands for its class of alike leaves (the trace lists each
        layer under its own paths, the decisions keep the first alike layer's); itself when it stands alone."""
        return self.rep_of.get(path, path)

    def decision_of(self, path: str) -> Any | None:
        """The decision that prices ``path``, its representative's; None for a path the plan does not hold."""
        return self.decisions.get(self.rep(path))


def merge(decisions: Mapping[str, Any], activations: Mapping[str, Sequence[Act]],
          opt: OptLayout | None = None, saved: Mapping[str, Sequence[Act]] | None = None,
          frozen: frozenset[str] = frozenset(), no_grad: frozenset[str] = frozenset(),
          traced_rows: Mapping[str, float] | None = None) -> Leaves:
    """Merge a plan's alike leaves (see the module docstring).

    ``saved``: the layer calls whose outputs the activation bytes count (``Workload.saved``: a plain
    function's parameter contractions); their splits are the column units. Default: ``activations``.
    ``frozen``: leaves whose input has no gradient (``Workload.frozen_inputs``), unlike their repeats.
    ``no_grad``: leaves without a gradient of their own (``Workload.no_grad``), unlike their repeats.
    ``traced_rows``: the rows per example each leaf reads (``Workload.rows``): leaves reading different rows are
    unlike (a plain function's convolutions, which ``saved`` lacks: a generator's layers at each resolution).

    >>> import jax, tpflax
    >>> sds = jax.ShapeDtypeStruct((64, 64), "float32")
    >>> p = tpflax.plan({f"layers_{i}": {"w": sds} for i in range(3)}, {"data": 2})
    >>> lv = merge(p.decisions, {})
    >>> list(lv.count.items()), lv.label["layers_0/w"]
    ([('layers_0/w', 3)], 'layers_*/w')
    """
    specs = {p: entries(d.spec, len(d.shape)) for p, d in decisions.items()}
    recurrent = frozenset(d.unit for d in decisions.values() if d.kind == "recurrent")
    members: dict[int, tuple[list[str], list[str]]] = {}
    for path, d in decisions.items():
        if d.pair is not None and d.role in ("column", "row"):
            cols, rows = members.setdefault(d.pair, ([], []))
            (cols if d.role == "column" else rows).append(path)
    paired = {p for cols, rows in members.values() for p in cols + rows}
    rep_of: dict[str, str] = {}
    reps: dict[tuple, str] = {}
    count: dict[str, int] = {}
    # a plain function's trace has no layer activations but its contractions: the shapes its layers read
    # (a cross-attention's key reads the context's 8 tokens, its self-attention twin the image's 256)
    calls = activations if saved is None else saved
    for path, d in decisions.items():
        key = (d.group or path, specs[path], tuple(d.shape), d.bytes, d.dtype, d.kind, d.strategy, d.role,
               path in paired, d.layers_dim, d.trainable, d.unit in recurrent, path in frozen, path in no_grad,
               tuple(acts_for(calls, d.unit)), tuple(acts_for(activations, d.unit + ":attend")),
               (traced_rows or {}).get(path))
        rep = reps.setdefault(key, path)
        rep_of[path] = rep
        count[rep] = count.get(rep, 0) + 1
    pair_classes: dict[tuple, PairClass] = {}
    for pid, (cols, rows) in sorted(members.items()):
        sig = (tuple(rep_of[c] for c in cols), tuple(rep_of[r] for r in rows))
        old = pair_classes.get(sig)
        pair_classes[sig] = PairClass(old.id if old else pid, sig[0], sig[1], (old.count if old else 0) + 1)
    return Leaves(decisions={r: decisions[r] for r in count}, count=count,
                  label={r: (decisions[r].group or r) if n > 1 else r for r, n in count.items()},
                  specs={r: specs[r] for r in count}, pairs=tuple(pair_classes.values()),
                  in_pair=frozenset(rep_of[p] for p in paired), column_units=_column_units(decisions, specs, activations if saved is None else saved),
                  stacks=stack_lengths((d.unit, d.shape[d.layers_dim] if d.layers_dim is not None else None)
                                       for d in decisions.values()),
                  recurrent=recurrent, opt=_opt_classes(opt, specs) if opt is not None else (), rep_of=rep_of,
                  adapters=adapter_units(decisions))


def adapter_units(decisions: Mapping[str, Any]) -> dict[str, int]:
    """``{traced layer path: rank}`` of the low-rank adapters called as layers of their own inside the layer
    whose kernel they sit beside (``nnx.LoRALinear``'s ``lora``): a module of exactly two 2-D leaves
    ``(i, r) @ (r, o)``, ``r`` narrower than both, inside a module that holds an ``(i, o)`` leaf, and named as a
    LoRA adapter is (:func:`lora_named`: ``nnx.LoRA``'s ``lora_a`` / ``lora_b``).

    Its output is summed into the parent's and nothing else reads it, so the backward keeps the narrow
    ``x @ a`` (for ``b``'s gradient) instead (:func:`tpflax._src.cost.activations.activation_bytes`); counted
    at its full width, an NNX LoRA-Llama's saved activations were twice the projections', its estimated peak
    1.33-1.42x the compiled (XLA:CPU, data=2,model=4 and fsdp=2,model=4). The shape alone does not say so: a
    low-rank gate ``x + tanh(x @ k) * sigmoid(gate(x))`` has an adapter's shapes, but its output is read by a
    multiply, which keeps it at its full width (taken for an adapter, a stack of four estimated at 0.42x the
    compiled peak, 0.60x otherwise); the names are what ``nnx.LoRA`` guarantees, as the leaves carry no
    ``LoRAParam`` type here (a plan's decisions), nor the trace's readers of the module's output.

    >>> from types import SimpleNamespace as N
    >>> d = {"q/kernel": N(shape=(64, 32), layers_dim=None), "q/lora/lora_a": N(shape=(64, 4), layers_dim=None),
    ...      "q/lora/lora_b": N(shape=(4, 32), layers_dim=None)}
    >>> adapter_units(d)
    {'q/lora': 4}
    >>> adapter_units({k: v for k, v in d.items() if k != "q/kernel"})  # no base kernel beside: a bottleneck
    {}
    >>> adapter_units({k.replace("lora/lora_", "gate/"): v for k, v in d.items()})  # adapter-shaped, not named one
    {}
    """
    bodies: dict[str, list[tuple[int, ...]]] = {}
    for path, d in decisions.items():
        shape = tuple(d.shape)
        if d.layers_dim is not None:
            shape = shape[:d.layers_dim] + shape[d.layers_dim + 1:]
        if "/" in path:
            bodies.setdefault(path.rsplit("/", 1)[0], []).append(shape)
    out = {}
    for unit, shapes in bodies.items():
        if "/" not in unit or len(shapes) != 2 or any(len(x) != 2 for x in shapes) or not lora_named(unit, decisions):
            continue
        a, b = shapes if shapes[0][1] == shapes[1][0] else shapes[::-1]
        if a[1] != b[0] or a[1] >= min(a[0], b[1]):
            continue
        if (a[0], b[1]) in bodies.get(unit.rsplit("/", 1)[0], ()):
            out[layer_key(unit)] = a[1]
    return out


def lora_named(unit: str, decisions: Mapping[str, Any]) -> bool:
    """The module ``unit``'s leaves are named as a LoRA adapter's: ``lora_a`` and ``lora_b`` (``nnx.LoRA``, the
    leaves of ``nnx.LoRALinear``'s ``lora``), or ``lora_A`` / ``lora_B`` (PEFT's spelling).

    >>> lora_named("q/lora", {"q/lora/lora_a": 0, "q/lora/lora_b": 0, "q/kernel": 0})
    True
    >>> lora_named("q/gate", {"q/gate/a": 0, "q/gate/b": 0})
    False
    """
    names = {p.rsplit("/", 1)[1].lower() for p in decisions if p.rsplit("/", 1)[0] == unit}
    return names == {"lora_a", "lora_b"}


def without_dead(lv: Leaves, dead: frozenset[str]) -> Leaves:
    """``lv`` without its ``dead`` leaves (:attr:`Workload.dead`: no output depends on them), for the
    collectives: their gradients are zeros, which XLA neither sums nor gathers, and no layer computes
    with them. A class of alike leaves counts its live members (a block's norms are one class, and the
    one before an unused cross-attention is dead); a class with none, and a pair with no live column or
    row class, is dropped. Memory keeps them all (the optimizer still holds and updates them)."""
    if not dead or not dead & lv.rep_of.keys():
        return lv
    alive: dict[str, int] = dict.fromkeys(lv.count, 0)
    for path, rep in lv.rep_of.items():
        alive[rep] += path not in dead
    gone = {r for r, n in alive.items() if n == 0}
    pairs = tuple(replace(pc, columns=tuple(c for c in pc.columns if c not in gone),
                          rows=tuple(r for r in pc.rows if r not in gone)) for pc in lv.pairs)
    keep = [r for r in lv.decisions if r not in gone]
    return replace(lv, decisions={r: lv.decisions[r] for r in keep}, count={r: alive[r] for r in keep},
                   label={r: lv.label[r] for r in keep}, specs={r: lv.specs[r] for r in keep},
                   pairs=tuple(pc for pc in pairs if pc.columns and pc.rows), in_pair=lv.in_pair - gone,
                   rep_of={p: r for p, r in lv.rep_of.items() if r not in gone and p not in dead})


def without_grads(lv: Leaves, no_grad: frozenset[str]) -> Leaves:
    """``lv`` with its ``no_grad`` leaves (:attr:`Workload.no_grad`: read only through ``stop_gradient``)
    priced as frozen, for the collectives: they compute as before (an fsdp gather, their layer's activation
    collectives), but their gradient is structurally zero and XLA sums, scatters and updates-then-gathers none
    of it. :func:`merge` keeps them apart from alike trained leaves. Memory keeps them trained (the optimizer
    still holds their state)."""
    hit = {r for r in lv.decisions if r in no_grad and lv.decisions[r].trainable}
    if not hit:
        return lv
    return replace(lv, decisions={r: replace(d, trainable=False) if r in hit else d
                                  for r, d in lv.decisions.items()})


def _opt_classes(opt: OptLayout, specs: Mapping[str, tuple[Entry, ...]]) -> tuple:
    classes = Counter((x.shape, x.itemsize, e) for x, e in zip(opt.leaves, opt_entries(opt, specs), strict=True))
    return tuple((shape, item, e, n) for (shape, item, e), n in classes.items())


def stack_of(path: str, stacks: Mapping[str, int] | None) -> str | None:
    """The scanned stack a traced path is in: its outermost prefix in ``stacks``
    (:func:`tpflax._src.cost.residual.stack_lengths`), else None.

    >>> stack_of("layers/mlp/down", {"layers": 4, "layers/mlp": 4}), stack_of("head", {"layers": 4})
    ('layers', None)
    """
    parts = path.split("/")
    return next(("/".join(parts[:i]) for i in range(1, len(parts) + 1) if "/".join(parts[:i]) in (stacks or ())),
                None)


def _column_units(decisions: Mapping[str, Any], specs: Mapping[str, tuple[Entry, ...]],
                  activations: Mapping[str, Sequence[Act]]) -> dict[str, tuple]:
    out: dict[str, tuple[Entry, ...]] = {}
    for path, d in decisions.items():
        spec, shape, k = specs[path], tuple(d.shape), d.layers_dim
        if k is not None:
            spec, shape = spec[:k] + spec[k + 1:], shape[:k] + shape[k + 1:]
        calls = acts_for(activations, d.unit)
        free = _free_dims(shape, calls[0].output) if d.role == "column" and len(shape) > 2 and calls else None
        if free is not None:
            # a multi-dim column kernel whose dims but the one it contracts are its layer's trailing output dims
            # (a DenseGeneral q/k/v projection, (d, heads, head_dim) -> [.., heads, head_dim]; experts (E, d, f)
            # -> [.., E, f]): a split of any of them splits the output, though its last dim is whole
            ents = tuple(spec[i] for i in free if spec[i] is not None)
        else:
            ents = (spec[-1],) if spec and spec[-1] is not None else ()
        if ents:
            out[layer_key(d.unit)] = out.get(layer_key(d.unit), ()) + ents
        if calls and calls[0].members > 1 and len(shape) > 1 and shape[0] == calls[0].members and spec[0] is not None:
            # an ensemble's members stacked on dim 0 (nn.vmap / nnx.vmap) and split over devices: each device
            # runs its own members' calls
            out[layer_key(d.unit) + ":members"] = (spec[0],)
        if len(shape) == 2 and spec[0] is not None:
            # the tied logits (``attend``) come out along the table's rows: a vocab-parallel table splits them
            out[layer_key(d.unit) + ":attend"] = (spec[0],)
    return out


def _free_dims(shape: tuple[int, ...], output: tuple[int, ...]) -> tuple[int, ...] | None:
    """The kernel dims its layer's output ends with, all but one contracted dim (the first that fits), or None.

    >>> _free_dims((64, 4, 16), (8, 32, 4, 16)), _free_dims((8, 64, 32), (256, 8, 32)), _free_dims((64, 4, 16), (8, 64))
    ((1, 2), (0, 2), None)
    """
    n = len(shape) - 1
    for i in range(len(shape)):
        kept = shape[:i] + shape[i + 1:]
        if tuple(output[-n:]) == kept:
            return tuple(j for j in range(len(shape)) if j != i)
    return None
