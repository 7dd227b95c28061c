"""What an optax optimizer does with the parameters' gradients, read from its own code: which trained
parameters it ignores (:func:`ignored_grads`: an ``optax.multi_transform`` label mapped to
``optax.set_to_zero()``), and a short name for it.

Below the cost model: :func:`tpflax.plan` (``optimizer=``) freezes the leaves it ignores, as ``trainable=``
would, and :func:`tpflax.estimate` prices those of a plan made without it as frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpflax._src.errors import OptionError
from tpflax._src.facts.tree import keystr
from tpflax._src.planner.state import init_shape, takes_lookahead_params


def optimizer_name(optimizer: Any) -> str:
    """A short name for reports: ``adamw`` for ``optax.adamw(...)``, else the init's qualname.

    >>> import optax
    >>> optimizer_name(optax.scale_by_adam())
    'scale_by_adam'
    """
    name = getattr(optimizer, "__name__", None)
    if name:
        return name
    init = getattr(optimizer, "init", None)
    qual = getattr(init, "__qualname__", "") or ""
    name = qual.split(".")[0].replace("_init", "") or type(optimizer).__name__
    if name in ("chain", "named_chain"):  # optax.adamw, adam, lion, ...: name it by the states it keeps
        parts = _state_names(optimizer)
        if parts:
            return f"chain({', '.join(parts)})"
    return name


def _state_names(optimizer: Any) -> list[str]:
    """The transforms of a chain that keep state, named from their state classes
    (``ScaleByAdamState`` -> ``scale_by_adam``), in order; [] if the state cannot be read.

    >>> import optax
    >>> optimizer_name(optax.adamw(1e-3)), optimizer_name(optax.chain(optax.clip(1.0), optax.sgd(0.1, 0.9)))
    ('chain(scale_by_adam)', 'chain(trace)')
    """
    import re

    import jax

    try:
        state = init_shape(optimizer, {"w": jax.ShapeDtypeStruct((1,), "float32")})
    except Exception:  # noqa: BLE001 - a name for a report is not worth an error
        return []
    names: list[str] = []
    stack = [state]
    while stack:
        x = stack.pop(0)
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            stack[:0] = list(x)
        elif hasattr(x, "_fields") and x._fields:
            n = re.sub(r"State$", "", type(x).__name__)
            n = re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower()
            if n and n not in names:
                names.append(n)
    return names


def ignored_grads(plan, optimizer: Any) -> frozenset[str]:
    """The paths of the parameters the plan trains whose gradient no output of ``optimizer.update`` reads.

    An ``optax.multi_transform`` mapping frozen leaves to ``optax.set_to_zero()`` (how LoRA is frozen
    without ``plan(trainable=)``) makes zero updates and no state from their gradients, so XLA drops those
    gradients and their all-reduces from the compiled step (measured, LoRA-Llama data=2,model=4: the
    embedding's and lm_head's data all-reduces gone, 80 KB compiled vs 1.11 MB priced as trained). Found by
    tracing ``update`` on the abstract gradients, state and parameters and walking the jaxpr back from its
    outputs (updates and new state): a gradient no equation on the way reads is ignored. An equation with
    inner jaxprs counts as reading all its inputs (conservative). Empty when the trace fails (a lookahead
    pair, an optimizer that needs concrete values).

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"a": jax.ShapeDtypeStruct((4,), "float32"), "b": jax.ShapeDtypeStruct((4,), "float32")},
    ...                 {"data": 1})
    >>> tx = optax.multi_transform({"t": optax.adam(1e-3), "f": optax.set_to_zero()}, {"a": "t", "b": "f"})
    >>> sorted(ignored_grads(p, tx)), sorted(ignored_grads(p, optax.adam(1e-3)))
    (['b'], [])
    """
    key = (optimizer, tuple((k, d.shape, d.dtype, d.trainable) for k, d in plan.decisions.items()))
    try:
        return _IGNORED[key]
    except TypeError:  # an optimizer that does not hash: traced every time
        return _ignored_grads(plan, optimizer)
    except KeyError:
        pass
    if len(_IGNORED) >= 64:
        _IGNORED.clear()
    _IGNORED[key] = out = _ignored_grads(plan, optimizer)
    return out


# ignored_grads by (optimizer, the plan's leaves): the trace of ``update`` took 10-20 ms of every estimate,
# 3-4x an estimate whose workload is kept (benchmarks/estimate_speed.py)
_IGNORED: dict = {}


def _ignored_grads(plan, optimizer: Any) -> frozenset[str]:
    import jax

    from tpflax._src.planner.params import optimizer_params

    try:
        params = optimizer_params(plan)
        state = init_shape(optimizer, params)
        if takes_lookahead_params(state):
            return frozenset()
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        closed = jax.make_jaxpr(lambda g, s, p: optimizer.update(g, s, p))(params, state, params)
    except Exception:  # noqa: BLE001 - no trace, no claim: every planned gradient stays priced
        return frozenset()
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if type(v).__name__ != "Literal"}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if type(v).__name__ != "Literal")
    out = set()
    for (path, _), var in zip(flat, jaxpr.invars[:len(flat)], strict=True):
        name = keystr(path)
        name = name if name in plan.decisions else f"params/{name}"
        d = plan.decisions.get(name)
        if var not in needed and d is not None and d.trainable:
            out.add(name)
    return frozenset(out)


def optimizer_frozen(facts: Sequence[Any], treedef: Any, ms: Any, optimizer: Any) -> frozenset[str]:
    """The paths of ``facts``' trainable leaves whose gradient ``optimizer`` ignores (:func:`ignored_grads`),
    for :func:`tpflax.plan`'s ``optimizer=``: asked of a stand-in plan of the same leaves (their paths, shapes,
    dtypes, kinds and ``trainable=`` freezing, every spec replicated), so the optimizer sees the tree it sees
    in the estimate and the train step of the plan that comes out.

    Raises:
        OptionError: the optimizer reads the gradient of none of the trainable leaves.

    >>> import jax, optax
    >>> from tpflax._src.facts.classify import classify
    >>> from tpflax._src.facts.tree import walk
    >>> from tpflax._src.mesh import mesh_shape
    >>> tree = {"a": jax.ShapeDtypeStruct((4,), "float32"), "b": jax.ShapeDtypeStruct((4,), "float32")}
    >>> leaves, treedef = walk(tree)
    >>> tx = optax.multi_transform({"t": optax.adam(1e-3), "f": optax.set_to_zero()}, {"a": "t", "b": "f"})
    >>> sorted(optimizer_frozen(classify(leaves), treedef, mesh_shape({"data": 1}), tx))
    ['b']
    """
    import jax
    from jax.sharding import PartitionSpec

    from tpflax._src.planner.decision import Decision, Plan

    decisions = {f.path: Decision(PartitionSpec(), "replicate", "", tuple(f.leaf.shape), f.leaf.dtype, f.leaf.nbytes,
                                  f.leaf.nbytes, kind=f.kind, trainable=f.leaf.trainable) for f in facts}
    stand_in = Plan(mesh=ms, specs=jax.tree_util.tree_unflatten(treedef, [PartitionSpec()] * len(facts)),
                    decisions=decisions)
    out = ignored_grads(stand_in, optimizer)
    trained = [f.path for f in facts if f.leaf.trainable]
    if trained and len(out) == len(trained):
        raise OptionError(f"optimizer={optimizer_name(optimizer)} reads the gradient of none of the "
                          f"{len(trained)} trainable parameters (e.g. {', '.join(trained[:3])}), so it trains "
                          "nothing; pass the optimizer the run steps with (an optax.multi_transform labelling "
                          "the trained leaves with a real optimizer), or leave optimizer= out")
    return out


__all__ = ["ignored_grads", "optimizer_frozen", "optimizer_name"]
