"""Activations: exact layer shapes from an abstract trace, and the bytes saved for the backward pass."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import jax

from tpflax._src.cost.batch import (
    Batch,
    config_value,
    np_dtype,
    plain_batch,
    shape_text,
    size_problem,
)
from tpflax._src.cost.records import Act
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape, traced_under, tracing_for
from tpflax._src.specs import Entry, entry_axes

COLLECTION_PREFIXES = ("params/", "batch_stats/")


def trace_activations(model: Any, batch: Any = None, variables: Any = None, *,
                      sample: Any = None, mesh: Any = None) -> dict[str, list[Act]]:
    """Input and output shapes of every layer call, for a global batch.

    Traces abstractly (``jax.make_jaxpr``) with ``flax.linen.intercept_methods``, so nothing is
    allocated or compiled. Compute it once per (model, batch) and pass it as
    ``activations=`` to every :func:`tpflax.estimate` call.

    Args:
        model: anything :func:`tpflax._src.model.as_model` accepts (a zoo model, a
            linen or nnx Module, a plain ``fn(variables, *sample)``).
        batch: a batch size (sets the sample's leading dim), or the sample inputs
            themselves (a tuple of arrays / ``ShapeDtypeStruct``).
        variables: variables (abstract is fine); defaults to the model's.
        sample: the sample inputs (default: a zoo model's own).
        mesh: the mesh (or mesh shape) the model runs on, when no mesh is set (``jax.set_mesh``): the
            trace runs under its abstract mesh, as a model constraining its activations with bare
            ``PartitionSpec`` s needs. Shapes do not depend on it.

    Returns:
        ``{layer path: [Act, ...]}`` (one Act per call, and per member of the
        vmaps around it: an ``nnx.vmap`` / ``nn.vmap`` ensemble's layer sees one
        member's shapes; ``attend`` calls are keyed ``path:attend``). A linen
        model's calls are seen with ``flax.linen.intercept_methods``; an nnx model's by wrapping the
        ``__call__`` and ``attend`` of its submodules' classes for the trace (a
        copy called inside ``nnx.scan``, ``nnx.vmap``, ``nnx.remat`` or ``nnx.jit``
        is placed by its variables' shapes). A transform applied again to alike
        layers (one ``nnx.remat`` function for every block) is traced again each
        time, not served from jax's trace cache, so each call is recorded. Empty
        for plain functions: the estimate counts their parameters' contractions instead.

    >>> from tpflax import zoo
    >>> acts = trace_activations(zoo.get("mlp"), 4)
    >>> acts["block_0/mlp/up"][0].output
    (4, 256)
    """
    from tpflax._src.model import as_model

    _check_batch(batch)
    batch = plain_batch(batch)  # np.int64(4) is a size as 4 is
    if sample is None and isinstance(batch, (tuple, list)):
        sample, batch = batch, None
    with tracing_for(mesh):
        m = as_model(model, sample, variables)
        if isinstance(batch, int) and not isinstance(batch, bool):
            m = m.with_batch(batch)
        return traced_layers(m)[0]


def _check_batch(batch: Any) -> None:
    """EstimateError for a ``batch`` :func:`trace_activations` would misread: a size that is no positive whole
    number (0 traced no examples, True one), a string ("4x32" traced a batch of 1), or a bare shape ((4, 32) was
    taken for the sample inputs: the model called on two ints)."""
    from tpflax._src.errors import EstimateError

    how = ("trace_activations takes a batch size (batch=8) or the model's sample inputs (a tuple of arrays or "
           "jax.ShapeDtypeStruct)")
    if (why := size_problem(batch)) is not None:
        raise EstimateError(f"{why.split(';')[0]}; {how}")
    if isinstance(batch, str) or (isinstance(batch, (tuple, list)) and batch and all(
            isinstance(x, numbers.Number) for x in batch)):
        try:
            first, what = (shape_text(batch)[0] if isinstance(batch, str) else int(batch[0])), "a shape"
        except (ValueError, TypeError):
            first, what = 8, "no size"
        raise EstimateError(f"batch={batch!r} is {what}; {how}: e.g. batch={first}")


def traced_layers(m: Any) -> tuple[dict[str, list[Act]], float]:
    """``(layer calls, remat share)`` of a :class:`tpflax._src.model.Model` from one abstract trace: the
    calls as :func:`trace_activations` returns them, and the share of its contractions inside
    ``jax.checkpoint`` (:func:`tpflax._src.trace.dataflow.remat_share`; 0 without a module to trace).
    """
    from tpflax._src.model_cache import cached

    calls, share = cached("layers", m, lambda: _traced_layers(m))
    return {k: list(v) for k, v in calls.items()}, share  # the caller's own lists


def _traced_layers(m: Any) -> tuple[dict[str, list[Act]], float]:
    import flax.linen as nn

    from tpflax._src.trace.dataflow import remat_share

    if m.framework == "nnx" and m.graphdef is not None:
        def nnx_trace():  # each attempt records its own calls
            with _Calls() as calls:
                closed = _make_jaxpr(m, partial(_nnx_calls, m, calls))
            return calls.out, remat_share(closed.jaxpr)[0]

        return traced_under(None, nnx_trace)
    if m.module is None or m.variables is None:
        return {}, 0.0

    active: list[Any] = []  # the modules inside one of their methods, innermost last
    calls: _Calls  # the calls of the current attempt (linen_trace), which the interceptor records

    def interceptor(next_fun, args, kw, context):
        # a module whose parents do not lead to the caller's: a clone inside a lifted transform (nn.jit...)
        crossed = not active or not _below(context.module, active[-1], nn.Module)
        active.append(context.module)
        try:
            result = next_fun(*args, **kw)
        finally:
            active.pop()
        path = None
        if context.module.path and context.method_name in ("__call__", "attend"):
            path = "/".join(str(p) for p in context.module.path)
            path = path if context.method_name == "__call__" else f"{path}:{context.method_name}"
        calls.done(path, args, result, crossed)
        return result

    def run(v, *xs):
        with nn.intercept_methods(interceptor):
            return m.module.apply(v, *xs, **dict(m.kwargs))

    def linen_trace():  # each attempt records its own calls (the interceptor's)
        nonlocal calls
        with _Calls() as calls:
            closed = _make_jaxpr(m, run)
        return calls.out, remat_share(closed.jaxpr)[0]

    return traced_under(None, linen_trace)


def _make_jaxpr(m: Any, fn: Any) -> Any:
    """``jax.make_jaxpr(fn)(m.variables, *m.sample)``; a model that cannot run is a TraceError, as in plan(model=)."""
    from tpflax._src.errors import TpflaxError, TraceError
    from tpflax._src.trace.dataflow import untraceable

    try:
        return jax.make_jaxpr(fn)(m.variables, *m.sample)
    except TpflaxError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is a model/sample mismatch
        raise TraceError(untraceable(m, e)) from e


# jax caches the jaxpr of a traced function (jax.jit, jax.checkpoint, a scan's body) by its inputs' structure
# and by jax's trace context, of which a user context's value is part. Made once, here: adding one is not
# thread-safe; its value is thread-local.
_FRESH = jax.make_user_context(None)
_FRESH_VALUES = itertools.count()  # never reused: a later trace must not be served by an earlier one's entries


class _Calls(contextlib.ExitStack):
    """The layer calls one abstract trace records: ``out``, ``{path: [Act, ...]}``, each call counted
    once per member of the vmaps around it (see :class:`_Members`).

    A wrapper applied again to alike inputs (one ``nnx.remat`` / ``nnx.jit`` / ``nn.jit`` function or
    decorated method for every block, one ``nnx.scan`` function for two alike towers) is served its first
    call's jaxpr from jax's cache without running its Python body: its later layers would not be recorded.
    So the trace starts with :data:`_FRESH` at a value it never had (no earlier trace's entries serve it),
    and after each call that crossed into a transform (a copy or clone of a module: a wrapper's body ran)
    :meth:`done` sets another: the wrapper's next call misses the cache. Only then: each setting also makes
    the jitted ``jnp`` helpers inside the layers trace again. Each setting is undone when the trace leaves
    the ``with`` block (raised or not).
    """

    def __init__(self) -> None:
        super().__init__()
        self._calls: list[tuple[str, Act, list[int]]] = []  # (path, call, [members running it])
        self.fresh()

    @property
    def out(self) -> dict[str, list[Act]]:
        """The calls by path, each repeated once per member (read when the trace is done: a vmap around a
        jit or a checkpoint counts its members when it batches that call's jaxpr, after the call returned)."""
        out: dict[str, list[Act]] = {}
        for path, act, members in self._calls:
            out.setdefault(path, []).extend([replace(act, members=members[0])] * members[0])
        return out

    def fresh(self) -> None:
        self.enter_context(_FRESH(next(_FRESH_VALUES)))

    def done(self, path: str | None, args: Sequence[Any], result: Any, crossed: bool) -> None:
        """A layer call returned: record it at ``path`` (None: not a traced layer); after a call that
        ``crossed`` into a transform, trace the next ones afresh."""
        act = _act(args, result) if path is not None else None
        if act is not None:
            members = [1]
            self._calls.append((path, act, members))
            if isinstance(_output(result), jax.Array):  # a traced array (not a Variable or a NumPy constant)
                _Members(members).probe(jax.lax.stop_gradient(_output(result)))
        if crossed:
            self.fresh()


class _Members:
    """Counts the members of the vmaps that batch a layer's output: a layer called inside ``nnx.vmap`` /
    ``nn.vmap`` (an ensemble) sees one member's shapes, but runs once per member.

    :attr:`probe` is an identity with a ``jax.custom_batching.custom_vmap`` rule: a vmap batching its
    input calls the rule with its axis size (at once, or when it batches a jit's or a checkpoint's jaxpr
    that holds it), which multiplies ``count[0]`` by it and passes the value on to the next outer vmap's
    probe. A vmap that does not batch the output (a layer reading nothing per member) adds nothing; a scan's
    layers are counted by the plan's stacks, not here. The rule counts once though a vmap may batch the
    same jaxpr again (a loop's batching rule, until its carry's batching settles). The probed value is
    ``stop_gradient``'s, so a forward that differentiates its layers still traces.

    >>> count = [1]
    >>> _ = jax.make_jaxpr(jax.vmap(jax.vmap(lambda x: _Members(count).probe(x))))(jax.numpy.ones((2, 3, 4)))
    >>> count
    [6]
    """

    def __init__(self, count: list[int]) -> None:
        from jax.custom_batching import custom_vmap

        self.count, self.counted, self.outer = count, False, None
        self.probe = custom_vmap(lambda x: x)
        self.probe.def_vmap(self._rule)

    def _rule(self, axis_size: int, in_batched: Sequence[bool], x: Any) -> tuple[Any, bool]:
        if in_batched[0] and not self.counted:
            self.counted = True
            self.count[0] *= axis_size
        if self.outer is None:
            self.outer = _Members(self.count)
        return self.outer.probe(x), in_batched[0]


def _below(module: Any, caller: Any, kind: type) -> bool:
    """Whether ``caller`` is ``module`` or one of its parents (``kind`` instances linked by ``.parent``).

    >>> class M:
    ...     def __init__(self, parent=None):
    ...         self.parent = parent
    >>> top = M(); child = M(top)
    >>> _below(M(child), top, M), _below(M("a scope"), top, M)
    (True, False)
    """
    while isinstance(module, kind):
        if module is caller:
            return True
        module = module.parent
    return False


_METHODS = ("__call__", "attend")


_PATCHING = threading.Lock()  # the wrappers live on shared classes: one trace at a time


def _nnx_calls(m: Any, calls: _Calls, variables: Any, *xs: Any) -> Any:
    """Run an nnx model's forward, recording each submodule call in ``calls`` (under ``make_jaxpr``).

    A module called inside an nnx transform is a copy. Under ``nnx.scan``/``nnx.vmap`` it holds
    one layer's slices of the stacked variables: it is placed at a path whose variables have its
    shapes plus a layers dim (``blocks`` for a scanned ``Block``). Under ``nnx.remat`` or
    ``nnx.jit`` it has its original's shapes: it is placed at a path of that structure. Of
    several such paths (alike layers, alike towers) it takes the first not yet taken, since
    layers are called in order. Its submodules go below it. A method that calls
    its base class's (``super().__call__``) is one call. After a copy's call the next calls are
    traced afresh (see :class:`_Calls`): a transform applied again runs its body again.
    """
    from flax import nnx

    module = nnx.merge(m.graphdef, variables, copy=True)
    paths = {id(n): "/".join(str(k) for k in path) for path, n in nnx.iter_graph(module)
             if path and isinstance(n, nnx.Module)}
    kinds = {type(n) for _, n in nnx.iter_graph(module) if id(n) in paths}
    full = _variable_shapes(module)
    prefixes = sorted({p.rsplit("/", k)[0] for p in full for k in range(1, p.count("/") + 1)})
    alive: dict[int, Any] = {id(module): module}  # every module seen, kept alive: ids key ``paths``
    owner = {i: id(module) for i in (*paths, id(module))}  # the graph a module was placed with: the model's or a copy's
    taken: set[str] = set()  # paths an nnx.remat / nnx.jit copy was placed at
    active: list[int] = []  # modules inside one of their own methods, innermost last

    def place(copy: Any) -> None:
        alive[id(copy)] = copy
        rel = _variable_shapes(copy)
        fits = _stack_paths(rel, full, prefixes) or [
            p for p in prefixes if rel and all(full.get(f"{p}/{r}") == shape for r, shape in rel.items())]
        free = [p for p in fits if p not in taken] or fits  # two alike towers: in call order
        at = free[0] if free else None
        taken.update(free[:1])
        if at is not None:
            for path, n in nnx.iter_graph(copy):
                if isinstance(n, nnx.Module) and id(n) not in paths:
                    paths[id(n)] = "/".join([at, *(str(k) for k in path)])
                    alive[id(n)] = n
                    owner[id(n)] = id(copy)

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(self, *args, **kw):
            if id(self) in active:  # a subclass's method calling its base's: recorded by the outer call
                return fn(self, *args, **kw)
            if id(self) not in paths and id(self) not in alive:
                place(self)
            # a module of another graph than its caller's: a copy an nnx transform made (its body ran)
            crossed = id(self) not in owner or owner[id(self)] != owner.get(active[-1] if active else id(module))
            active.append(id(self))
            try:
                result = fn(self, *args, **kw)
            finally:
                active.pop()
            path = paths.get(id(self))
            calls.done(None if path is None else path if name == "__call__" else f"{path}:{name}", args, result,
                       crossed)
            return result
        return call

    with _PATCHING:
        # every original first: a subclass's inherited method is its base's own, not a wrapper
        originals = [(t, name, getattr(t, name), t.__dict__.get(name)) for t in kinds for name in _METHODS
                     if callable(getattr(t, name, None))]
        try:
            for t, name, fn, _ in originals:
                setattr(t, name, wrap(fn, name))
            return module(*xs, **dict(m.kwargs))
        finally:
            for t, name, _, own in originals:
                if own is None:
                    delattr(t, name)
                else:
                    setattr(t, name, own)


def _variable_shapes(node: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of an nnx module's variables (relative to it)."""
    from flax import nnx

    out = {}
    for path, v in nnx.iter_graph(node):
        if isinstance(v, nnx.Variable):
            value = v.get_value() if hasattr(v, "get_value") else v.value
            if hasattr(value, "shape"):
                out["/".join(str(k) for k in path)] = tuple(value.shape)
    return out


def _stack_paths(rel: Mapping[str, tuple[int, ...]], full: Mapping[str, tuple[int, ...]],
                 prefixes: Sequence[str]) -> list[str]:
    """The prefixes under which every ``rel`` variable is stored with one more (layers) dim.

    >>> _stack_paths({"up/kernel": (4, 8)}, {"blocks/up/kernel": (3, 4, 8), "head/kernel": (4, 8)},
    ...              ["blocks", "blocks/up", "head"])
    ['blocks']
    """
    def stacked(whole: tuple[int, ...] | None, one: tuple[int, ...]) -> bool:
        return whole is not None and len(whole) == len(one) + 1 and any(
            whole[:i] + whole[i + 1:] == one for i in range(len(whole)))

    return [p for p in prefixes if rel and all(stacked(full.get(f"{p}/{r}"), s) for r, s in rel.items())]


def top_level(paths: Any) -> set[str]:
    """The traced paths no other traced path contains: what remat keeps (block outputs).

    >>> sorted(top_level(["embed", "block_0", "block_0/mlp/up", "blocks/0", "blocks/0/up", "head:attend"]))
    ['block_0', 'blocks/0', 'embed', 'head:attend']
    """
    paths = set(paths)
    plain = {q for q in paths if ":" not in q}

    def inside(p: str) -> bool:  # a plain traced path is a proper "/" prefix of p's (linear, not pairwise)
        parts = p.split(":")[0].split("/")
        return any("/".join(parts[:k]) in plain for k in range(1, len(parts)))

    return {p for p in paths if not inside(p)}


def _output(result: Any) -> Any:
    """A layer call's output: its result, or the first of a tuple of arrays (an RNN cell's)."""
    return result[0] if isinstance(result, tuple) and result and hasattr(result[0], "shape") else result


def _act(args: Sequence[Any], result: Any) -> Act | None:
    """A layer call's :class:`Act` (None unless it took and returned arrays)."""
    arrays = [a for a in args if hasattr(a, "shape") and hasattr(a, "dtype")]
    res = _output(result)
    if hasattr(res, "shape") and hasattr(res, "dtype") and arrays:
        return Act(tuple(tuple(a.shape) for a in arrays), tuple(res.shape), str(res.dtype), int(res.dtype.itemsize))
    return None


def layer_key(unit: str) -> str:
    """A decision's unit as traced layer paths spell it (without the linen collection).

    >>> layer_key("params/block_0/mlp/up")
    'block_0/mlp/up'
    """
    return unit.split("/", 1)[1] if unit.startswith(COLLECTION_PREFIXES) else unit


def acts_for(activations: Mapping[str, Sequence[Act]], unit: str) -> list[Act]:
    """The traced calls of a decision's unit (none when untraced).

    >>> acts_for({"mlp/up": [Act(((2, 4),), (2, 8), "float32", 4)]}, "params/mlp/up")[0].output
    (2, 8)
    """
    return list(activations.get(layer_key(unit), ()))


def token_rows(b: Batch, config: Any) -> int:
    """Activation rows through the residual stream for the global batch.

    >>> from tpflax._src.cost.batch import parse_batch
    >>> token_rows(parse_batch("8x16", {"vocab": 100}), None)  # tokens
    128
    """
    ids = [leaf[1] for leaf in b.leaves if len(leaf[1]) >= 2 and np_dtype(leaf[2]).kind in "iu"]
    if ids:  # token ids, wherever they sit in the batch (a speech model's decoder ids follow its features)
        return math.prod(ids[0])
    x = b.first_shape
    image, patch = config_value(config, "image_size"), config_value(config, "patch_size")
    if image and patch:
        return b.size * ((image // patch) ** 2 + (1 if config_value(config, "cls_token", True) else 0))
    if len(x) == 3:
        return x[0] * x[1]  # (batch, seq, features)
    return b.size


def activation_bytes(column_units: Mapping[str, Sequence[Entry]], activations: Mapping[str, Sequence[Act]],
                     b: Batch, config: Any, mesh: MeshShape, shards: int, remat: bool, act_item: int,
                     notes: list[str], stacks: Mapping[str, int] | None = None,
                     adapters: Mapping[str, int] | None = None) -> tuple[int, int]:
    """Saved activations on the fullest device and unsharded (an estimate).

    ``column_units``: per traced layer path, the entries of its leaves' split last dims.
    ``stacks``: traced paths inside a scanned stack and its layer count (a linen trace
    records a scanned body once or twice, whatever the layer count; it runs once per layer).
    ``adapters``: ``{traced path: rank}`` of low-rank adapters called inside their base layer
    (:func:`tpflax._src.cost.leaves.adapter_units`): each keeps its rank-wide ``x @ a``, not its output.
    """
    if activations:
        return _traced_bytes(column_units, layer_runs(activations, stacks), mesh, shards, remat, act_item,
                             adapters or {})
    d_model, n_layers = config_value(config, "d_model"), config_value(config, "n_layers")
    seq = config_value(config, "seq_len")
    if not (d_model and n_layers and seq):
        notes.append("activations not estimated: pass model= / activations=trace_activations(...) or a "
                     "config with d_model, n_layers and seq_len")
        return 0, 0
    heads = config_value(config, "n_heads", 1) or 1
    tokens = token_rows(b, config)
    scale = act_item / 2  # the per-layer formula below counts 16-bit activations
    t = math.prod(mesh.sizes[a] for a in mesh.axes_with(TENSOR))

    def per_layer(tp: int, sh: int) -> float:
        # Korthikanti et al. 2022: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes per layer (16-bit).
        return tokens / sh * d_model * (10 + 24 / tp + 5 * heads * seq / (d_model * tp)) * scale

    if remat:
        return int(tokens / shards * d_model * act_item * n_layers), int(tokens * d_model * act_item * n_layers)
    notes.append("activations from the transformer formula (Korthikanti et al.); trace the model for "
                 "exact layer shapes")
    return int(per_layer(t, shards) * n_layers), int(per_layer(1, 1) * n_layers)


def layer_runs(activations: Mapping[str, Sequence[Act]], stacks: Mapping[str, int] | None) -> Mapping[str, Sequence[Act]]:
    """The traced calls as they run: inside a scanned stack (``stacks``: traced path -> layer count; a linen
    trace records a scanned body once or twice), one call's members (a vmapped ensemble) once per layer.

    >>> a = Act(((2, 4),), (2, 8), "float32", 4)
    >>> [len(c) for c in layer_runs({"blocks/up": [a, a], "head": [a]}, {"blocks/up": 5}).values()]
    [5, 1]
    """
    if not stacks:
        return activations
    return {p: (list(calls[:calls[0].members]) * stacks[p] if p in stacks and calls else calls)
            for p, calls in activations.items()}


def formula_scores_bytes(b: Batch, config: Any, mesh: MeshShape, shards: int, remat: bool, act_item: int) -> int:
    """The attention-score part (``5as/ht``) of the formula's saved activations on a device (0 when traced
    shapes or remat are used, or the config lacks the sizes).

    :mod:`tpflax._src.cost.peak` counts the scores itself, so it takes this part out.

    >>> from tpflax._src.cost.batch import parse_batch
    >>> from tpflax._src.mesh import mesh_shape
    >>> cfg = {"d_model": 8, "n_layers": 1, "seq_len": 4, "n_heads": 2, "vocab": 10}
    >>> formula_scores_bytes(parse_batch("1x4", cfg), cfg, mesh_shape({"data": 1}), 1, False, 2)
    160
    """
    d_model, n_layers = config_value(config, "d_model"), config_value(config, "n_layers")
    seq, heads = config_value(config, "seq_len"), config_value(config, "n_heads", 1) or 1
    if remat or not (d_model and n_layers and seq):
        return 0
    t = math.prod(mesh.sizes[a] for a in mesh.axes_with(TENSOR))
    return int(token_rows(b, config) / shards * 5 * heads * seq / t * act_item / 2 * n_layers)


def _traced_bytes(column_units, activations, mesh: MeshShape, shards: int, remat: bool,
                  act_item: int, adapters: Mapping[str, int]) -> tuple[int, int]:
    roles = dict(mesh.roles)
    col_units = {}  # layers whose output features are split over tensor/expert axes (the last such leaf)
    for unit, ents in column_units.items():
        split = [e for e in ents if any(roles[a] in (TENSOR, EXPERT) for a in entry_axes(e))]
        if split:  # an expert axis splits the batch too: the layer gathers its tokens over it, no net split
            col_units[unit] = math.prod(mesh.sizes[a] for a in entry_axes(split[-1]) if roles[a] == TENSOR)
    members = {u[:-len(":members")]: n for u, n in col_units.items() if u.endswith(":members")}

    def member_split(path: str) -> int:  # an ensemble's layers, and the vmapped module holding them
        return max([1] + [n for u, n in members.items() if u == path or u.startswith(path + "/")])

    full = dev = 0.0
    kept = top_level(activations)
    for path, calls in activations.items():
        if remat and path not in kept:
            continue  # only top-level (block) outputs are kept under remat
        split = member_split(path) if members and calls and calls[0].members > 1 else 1
        rank = adapters.get(path)
        for a in calls:
            if rank is not None:  # x @ a, whole on every tensor rank (the rank is never split)
                nbytes = math.prod(a.output[:-1]) * rank * act_item
                full += nbytes
                dev += nbytes / shards / split
                continue
            nbytes = math.prod(a.output) * act_item
            full += nbytes
            dev += nbytes / shards / col_units.get(path, col_units.get(path.split(":")[0], 1)) / split
    return int(dev), int(full)
