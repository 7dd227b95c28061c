"""ZeRO-3 for scanned layer stacks: gather one layer's fsdp shards inside the scan, not the whole stack.

A stacked (``nn.scan``) parameter has a leading layers dim. Gathering it over the
fsdp axes before the scan (what a ``with_sharding_constraint`` on the whole leaf
does) materialises every layer's weights at once, and the backward scan then
accumulates the whole stack's gradient unsplit too: the memory of one layer times
the layer count, which is what made a 70B scanned model need 56.6 GiB per v5e
chip (``benchmarks/results/tpu_pod.md``).

:func:`gather_stacks_in_scans` instead rewrites the traced loss: where a stacked
parameter enters a ``scan`` as a scanned-over input, the per-layer slice is
constrained inside the loop body to the layer's spec and then to that spec
without the fsdp axes. Forward, XLA all-gathers one layer per iteration; the
transpose of the pair of constraints reduce-scatters that layer's gradient back
to its shards inside the backward loop, so the gradient stack stays split. The
constraints go as deep as the slice only enters rematerialised (``remat``) or
``jit`` calls, so remat saves the sharded slice, not the gathered one. The
values computed are unchanged: constraints only choose layouts.

Unstacked parameters go the same way (:func:`zero3`): one that only enters
remat'd calls (the layers of an unrolled ``nn.remat`` model) is gathered inside
them, so remat saves its shard and the backward's recompute gathers it again.
Gathered once outside, every layer's gathered weights stayed live from the
forward pass to that layer's backward: an 8-layer Llama-2-7B-width step (remat,
fsdp=2,model=4, seq 2048, ``tpu-v5e:2x4``) peaked at 8.16 GiB that way and at
6.03 GiB this way, for 3.7% more collective bytes (the second gather).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tpflax._src.jaxprs import body_of, scan_counts
from tpflax._src.specs import entries, to_pspec, without_axes

# calls whose ``jaxpr`` param takes the call's inputs unchanged, in order (remat2: jax.checkpoint)
_CALLS = ("jit", "remat2")


@dataclass(frozen=True)
class StackTarget:
    """Where one parameter should live: whole (outside scans) and, for a stack, per layer (inside).

    Attributes:
        whole: ``(sharded, gathered)`` shardings of the whole stack, used where
            the stack is read other than by a scan.
        layer: ``(sharded, gathered)`` shardings of one layer's slice.
        dim: the layers dim of the whole stack (``lax.scan`` slices dim 0, so
            a stack on another dim is followed through the transpose that
            moves it to the front, as ``nn.scan(variable_axes={"params": 1})`` does);
            None for a leaf that is not a stack (never passed into a scan's body).
    """

    whole: tuple[Any, Any]
    layer: tuple[Any, Any]
    dim: int | None = 0


def _to_front(target: StackTarget) -> StackTarget:
    """``target`` for the stack transposed with its layers dim moved to the front."""
    from jax.sharding import NamedSharding

    def move(s):  # the whole specs are full rank (stack_target)
        spec = tuple(s.spec)
        return NamedSharding(s.mesh, to_pspec((spec[target.dim],) + spec[:target.dim] + spec[target.dim + 1:]))

    return StackTarget(whole=tuple(move(s) for s in target.whole), layer=target.layer, dim=0)


def zero3(loss_fn: Callable[[Any], Any], params: Any, *, decisions: Sequence[Any], mesh: Any,
          fsdp: frozenset[str]) -> Any:
    """``loss_fn(params)`` with every parameter gathered over ``fsdp`` for compute (ZeRO-3).

    A leaf is constrained to its spec without the fsdp axes where it is read,
    as deep inside remat'd and ``jit`` calls as all its reads are (so remat saves
    the shard and gathers again in the backward). A stack (a
    ``Decision.layers_dim``) is gathered one layer at a time inside the scan
    that reads it (:func:`gather_stacks_in_scans`).

    Args:
        loss_fn: ``params -> loss``.
        params: the parameter tree (flax boxes and nnx Params hold one leaf each).
        decisions: the plan's Decision of each leaf, in ``tree_leaves(params)`` order.
        mesh: the mesh.
        fsdp: the fsdp axes to gather over.
    """
    import jax

    # stored, then gathered: the forward all-gathers; the backward's transpose pins the summed
    # gradient to the stored shards, so XLA reduce-scatters it (without the first constraint
    # XLA:TPU all-reduces the whole gradient and slices it: twice the bytes, measured)
    targets = {i: stack_target(d, mesh, fsdp) for i, d in enumerate(decisions)}
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def on_leaves(*leaves):
        return loss_fn(jax.tree_util.tree_unflatten(treedef, list(leaves)))

    return gather_stacks_in_scans(on_leaves, targets)(*leaves)


def pin(x: Any, stored: Any, gathered: Any) -> Any:
    """``x`` constrained to its stored sharding, then to the gathered one (see :func:`zero3`)."""
    from tpflax._src.mesh import constrain_to

    return constrain_to(constrain_to(x, stored), gathered)


def stack_target(d: Any, mesh: Any, fsdp: frozenset[str]) -> StackTarget:
    """Shardings of a leaf (a Decision) as stored and as gathered over ``fsdp``: whole and, for a stack, per layer.

    A leaf without a layers dim is its own layer (``dim=None``: no scan slices it).
    """
    from jax.sharding import NamedSharding

    def both(spec):
        return NamedSharding(mesh, to_pspec(spec)), NamedSharding(mesh, without_axes(spec, fsdp))

    spec = entries(d.spec, len(d.shape))
    if d.layers_dim is None:
        return StackTarget(whole=both(spec), layer=both(spec), dim=None)
    return StackTarget(whole=both(spec), layer=both(spec[:d.layers_dim] + spec[d.layers_dim + 1:]),
                       dim=d.layers_dim)


def gather_stacks_in_scans(fn: Callable[..., Any], targets: dict[int, StackTarget]) -> Callable[..., Any]:
    """``fn(*leaves)`` with each leaf ``targets[i]`` gathered where it is read: a stack one layer at a time inside scans.

    Args:
        fn: a function of flat parameter leaves (pytree output allowed).
        targets: leaf index -> :class:`StackTarget`.

    >>> import jax, jax.numpy as jnp, tpflax
    >>> mesh = tpflax.make_mesh({"fsdp": 1})
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> s = NamedSharding(mesh, P())
    >>> f = lambda w: jax.lax.scan(lambda c, x: (c + x.sum(), None), 0.0, w)[0]
    >>> g = gather_stacks_in_scans(f, {0: StackTarget((s, s), (s, s))})
    >>> float(jax.jit(g)(jnp.ones((3, 2))))
    6.0
    """
    import jax
    from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

    def wrapped(*leaves):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*leaves)
        jaxpr = _place(closed.jaxpr, {i: (t, True) for i, t in targets.items()})
        outs = jaxpr_as_fun(ClosedJaxpr(jaxpr, closed.consts))(*leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _place(jaxpr: Any, tracked: dict[int, tuple[StackTarget, bool]]) -> Any:
    """``jaxpr`` with constraints for its tracked inputs (index -> (target, still a whole stack)).

    A tracked input read only by scans (as a scanned-over input) or by calls is
    passed down into their bodies; any other read constrains it here.
    """
    uses: dict[int, dict[int, tuple[StackTarget, bool]]] = {}
    here: dict[Any, tuple[Any, Any]] = {}
    for i, (target, whole) in tracked.items():
        var = jaxpr.invars[i]
        routes = _routes(jaxpr, var, target, whole)
        if routes is None:
            here[var] = target.whole if whole else target.layer
        for k, pos, inner in routes or ():
            uses.setdefault(k, {})[pos] = inner
    eqns = [_descend(eqn, uses[k]) if k in uses else eqn for k, eqn in enumerate(jaxpr.eqns)]
    jaxpr = jaxpr.replace(eqns=eqns)
    return _constrain_here(jaxpr, here) if here else jaxpr


def _routes(jaxpr: Any, var: Any, target: StackTarget, whole: bool) -> list[tuple[int, int, Any]] | None:
    """``[(eqn index, input position, (target, whole) inside)]`` passing ``var`` down, or None to constrain it here."""
    sites = [(k, pos) for k, eqn in enumerate(jaxpr.eqns) for pos, v in enumerate(eqn.invars) if v is var]
    if var in jaxpr.outvars or not sites:
        return None
    eqns = [jaxpr.eqns[k] for k, _ in sites]
    if all(_passes(e, pos, whole, target.dim) for e, (_, pos) in zip(eqns, sites, strict=True)):
        return [(k, pos, (target, whole and e.primitive.name != "scan")) for e, (k, pos) in zip(eqns, sites, strict=True)]
    front = (target.dim, *(d for d in range(len(var.aval.shape)) if d != target.dim))
    if whole and target.dim and all(e.primitive.name == "transpose" and tuple(e.params["permutation"]) == front
                                    for e in eqns):
        moved = [_routes(jaxpr, e.outvars[0], _to_front(target), True) for e in eqns]
        return None if any(r is None for r in moved) else [r for rs in moved for r in rs]
    return None


def _passes(eqn: Any, pos: int, whole: bool, dim: int) -> bool:
    """Whether a tracked input at ``eqn.invars[pos]`` may be passed down into the eqn's body."""
    name = eqn.primitive.name
    if name == "scan":
        # a whole stack scanned over its layers dim: the body sees one layer; a loop-invariant or
        # carried one is read whole
        # (jax 0.12's scan has no num_consts/num_carry: counted from the shapes)
        return whole and dim == 0 and pos >= sum(scan_counts(eqn, body_of(eqn.params["jaxpr"])))
    return name in _CALLS and "jaxpr" in eqn.params


def _descend(eqn: Any, tracked: dict[int, tuple[StackTarget, bool]]) -> Any:
    from jax.extend.core import ClosedJaxpr

    body = eqn.params["jaxpr"]
    if isinstance(body, ClosedJaxpr):
        body = ClosedJaxpr(_place(body.jaxpr, tracked), body.consts)
    else:
        body = _place(body, tracked)
    return eqn.replace(params={**eqn.params, "jaxpr": body})


def _constrain_here(jaxpr: Any, here: dict[Any, tuple[Any, Any]]) -> Any:
    """Prepend ``wsc(wsc(v, sharded), gathered)`` for each ``v`` and read the result instead of ``v``."""
    import jax

    new_eqns, renamed = [], {}
    for var, (sharded, gathered) in here.items():
        aval = var.aval
        tmpl = jax.make_jaxpr(lambda x, s=sharded, g=gathered: pin(x, s, g))(
            jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=getattr(aval, "sharding", None))).jaxpr
        src = tmpl.invars[0]
        new_eqns += [e.replace(invars=[var if v is src else v for v in e.invars]) for e in tmpl.eqns]
        renamed[var] = tmpl.outvars[0]

    def swap(vs):
        return [renamed.get(v, v) if not _is_literal(v) else v for v in vs]

    eqns = [e.replace(invars=swap(e.invars)) for e in jaxpr.eqns]
    return jaxpr.replace(eqns=new_eqns + eqns, outvars=swap(jaxpr.outvars))


def _is_literal(v: Any) -> bool:
    from jax.extend.core import Literal

    return isinstance(v, Literal)
