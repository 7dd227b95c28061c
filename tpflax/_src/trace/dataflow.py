"""Dataflow-aware planning: read the forward pass instead of the names.

Name and shape heuristics fail on models written by other people: layers called
``dense_3``, kernels stored transposed ``(out, in)`` and applied as
``x @ kernel.T``, attention written as raw einsums. With a model and example
inputs, tpflax traces the forward pass with ``jax.make_jaxpr`` on abstract values
(nothing is computed), maps the jaxpr's inputs back to parameter paths, and
follows the activations:

* every **contraction** that consumes a parameter (``dot_general``,
  ``conv_general_dilated``, ``gather`` and one-hot matmuls for embeddings) is a
  *use*, with the parameter dims it contracts, keeps and batches over;
* every kept dim of a use **tags** the activation dim it produces. Tags follow
  elementwise ops, reshapes (the major factor of a split dim keeps the tag, so
  heads survive ``(d) -> (heads, head_dim)``, and follows a split that runs on
  into the minor factor: 4 heads over 4 ranks cut into ``(kv_heads, groups)``),
  transposes, broadcasts and activation-activation einsums along batch/free dims, through ``pjit``,
  ``remat``, ``custom_jvp``/``custom_vjp`` and ``scan``/``while``/``cond`` bodies;
* an op that reduces, slices, concatenates or mixes a tagged dim, or any op
  tpflax does not know, **ends** the chain for that tag (an *escape*: a norm over
  features, a reshape that interleaves the dim, ...);
* a tagged dim that a later parameter contraction sums over is an **edge**
  ``producer -> consumer``: a column -> row (Megatron) candidate.

The result is a :class:`Dataflow` (records in :mod:`tpflax._src.trace.records`);
the planner's dataflow rules (``tpflax._src.planner.dataflow_rules``) turn it
into proposals with reasons that name the evidence. The walk itself is in
:mod:`tpflax._src.trace.interpreter`, its ``{primitive: handler}`` table in
:mod:`tpflax._src.trace.handlers`.

>>> import jax, flax.linen as nn
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x):
...         return nn.Dense(8, name="b")(nn.relu(nn.Dense(32, name="a")(x)))
>>> x = jax.ShapeDtypeStruct((2, 8), "float32")
>>> v = jax.eval_shape(Net().init, jax.random.key(0), x)
>>> flow = dataflow(Net(), (x,), v)
>>> [(e.src, e.dst) for e in flow.edges]
[('params/a/kernel', 'params/b/kernel')]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from tpflax._src.errors import TraceError
from tpflax._src.facts.tree import unboxed, walk
from tpflax._src.mesh import traced_under
from tpflax._src.model import abstract, as_model, labels_hint
from tpflax._src.trace.batchflags import batch_dims, input_flags, no_flags
from tpflax._src.trace.contractions import PRODUCT_SUM
from tpflax._src.trace.handlers import new_walk
from tpflax._src.trace.interpreter import SLICED, Val, is_minor
from tpflax._src.trace.records import Dataflow, Edge, Use, remap_added
from tpflax._src.trace.sharing import VIEWS, own_casts, read_groups, shared_reads

__all__ = ["Dataflow", "Edge", "Use", "analyze", "dataflow", "trace_jaxpr"]


def trace_jaxpr(model: Any, sample: Any = None, variables: Any = None, mesh: Any = None):
    """``(closed jaxpr, parameter paths of its first invars, n parameter invars)``.

    ``model`` is anything :func:`tpflax._src.model.as_model` accepts (zoo, linen,
    nnx, or a plain ``fn(variables, *sample)``). Nothing is computed: inputs and
    parameters are ``jax.ShapeDtypeStruct``. ``mesh`` (a mesh shape), when no mesh
    is set already, is the abstract mesh the forward is traced under, as the step
    runs under its mesh: flax's ``nn.with_logical_constraint`` constrains nothing
    without one (MaxText's GPT-3 constrains every activation so).
    """
    m = as_model(model, sample, variables)
    if m.variables is None:
        raise TraceError(f"tracing {m.name} needs its variables: pass variables= (the tree you plan)")
    leaves, _ = walk(m.variables)
    tree = unboxed(m.variables)
    abstract_tree = jax.tree_util.tree_map(abstract, tree)
    try:
        closed = traced_under(mesh, lambda: jax.make_jaxpr(m.forward)(abstract_tree, *m.sample))
    except Exception as e:  # noqa: BLE001 - any failure here is a model/sample mismatch
        raise TraceError(untraceable(m, e)) from e
    n = len(jax.tree_util.tree_leaves(abstract_tree))
    if n != len(leaves):
        raise TraceError(f"the variable tree flattens to {n} arrays but walks to {len(leaves)} leaves; "
                         "pass a tree of plain arrays or flax boxes holding one array each")
    return closed, [leaf.path for leaf in leaves], n


def dead_params(jaxpr: Any, paths: Sequence[str]) -> frozenset[str]:
    """The parameters (the first ``len(paths)`` invars of ``jaxpr``) none of its outputs depends on, as jax's
    dead-code elimination finds them (through ``pjit``, ``scan``, ``remat`` and the other calls it knows).
    Empty if jax's private pass is missing or fails: every parameter then counts as read.

    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda a, b, x: x @ a)(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones((1, 2)))
    >>> sorted(dead_params(closed.jaxpr, ["a", "b"]))
    ['b']
    """
    try:
        from jax._src.interpreters import partial_eval as pe

        _, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    except Exception:  # noqa: BLE001 - a private pass: without it nothing is dead
        return frozenset()
    return frozenset(p for p, u in zip(paths, used, strict=False) if not u)


def no_grad_params(closed: Any, paths: Sequence[str]) -> frozenset[str]:
    """The float parameters (the first ``len(paths)`` invars of ``closed``) whose tangent reaches no output:
    read only through ``jax.lax.stop_gradient``, or through integer ops (``argmax``). Their gradient is
    structurally zero, so XLA compiles no gradient collective for them. Found by jax's dead-code elimination
    of the forward's JVP, tangent outputs only: a stopped parameter's tangent is jax's symbolic zero, which
    no equation reads. Empty if the JVP or jax's private pass fails.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda a, b, x: x @ a + x @ jax.lax.stop_gradient(b)
    >>> closed = jax.make_jaxpr(f)(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones((1, 2)))
    >>> sorted(no_grad_params(closed, ["a", "b"]))
    ['b']
    """
    import numpy as np

    invars = closed.jaxpr.invars
    avals = [v.aval for v in invars]
    # jax's issubdtype: a typed PRNG key (key<fry>) is no numpy dtype
    diff = [i for i in range(len(paths))
            if jax.dtypes.issubdtype(getattr(avals[i], "dtype", np.int32), np.inexact)]
    if not diff:
        return frozenset()
    from jax.extend.core import jaxpr_as_fun

    fun = jaxpr_as_fun(closed)

    def tangents_out(primals, tangents, rest):
        def forward(*ps):
            args = list(rest)
            for i, x in zip(diff, ps, strict=True):
                args[i] = x
            return fun(*args)
        return jax.jvp(forward, primals, tangents)[1]

    spec = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    picked = [spec[i] for i in diff]
    try:
        from jax._src.interpreters import partial_eval as pe

        jvp = jax.make_jaxpr(tangents_out)(picked, picked, spec)
        _, used = pe.dce_jaxpr(jvp.jaxpr, [True] * len(jvp.jaxpr.outvars))
    except Exception:  # noqa: BLE001 - a private pass, or a forward jax cannot differentiate: every leaf trains
        return frozenset()
    tangent_used = used[len(diff):2 * len(diff)]
    return frozenset(paths[i] for i, u in zip(diff, tangent_used, strict=True) if not u)


def untraceable(m: Any, e: Exception) -> str:
    shapes = ", ".join(f"{getattr(s, 'shape', '?')}:{getattr(s, 'dtype', '?')}" for s in m.sample)
    called = ("; a function model is called as fn(variables, *sample)" if m.framework == "callable" else "")
    text = f"{type(e).__name__}: {e}"
    if any(k in text for k in ("rng", "Rng", "mutable", "Mutable", "immutable")):
        # a linen model in training mode: dropout wants an rng; BatchNorm's batch_stats are mutable when
        # the variables hold them (a linen module's collections beside params are updated by its call)
        fix = ("the model's call needs rngs (nn.Dropout(deterministic=False)) or a collection the variables "
               "lack (nn.BatchNorm(use_running_average=False) updates batch_stats): pass the full variables "
               "module.init made, or the model as a function, e.g. "
               "fn = lambda v, x: module.apply(v, x, rngs={'dropout': jax.random.key(0)})")
    elif "non-empty mesh in context" in text:
        # jax.lax.with_sharding_constraint(x, P(...)) inside the model, traced where tpflax has no mesh
        fix = ("the model constrains its activations with bare PartitionSpecs (jax.lax.with_sharding_constraint), "
               "which trace only under a mesh of those axis names: call tpflax inside "
               "`with jax.set_mesh(tpflax.make_mesh(mesh_shape)):`, or pass mesh= where the call takes one")
    elif "is not found in mesh" in text:
        fix = ("the model constrains its activations over a mesh axis this mesh lacks: name the mesh's axes as "
               "the model's PartitionSpecs do (tpflax.plan(tree, {'data': 2, 'model': 4}) for P('data', None, "
               "'model')), or call tpflax inside `with jax.set_mesh(...)` over the mesh the model is written for")
    elif "context mesh" in text:
        # jax.shard_map(f, in_specs=..., out_specs=...) without mesh= takes the mesh of the context
        fix = ("the model calls jax.shard_map without mesh=, which needs a context mesh: call tpflax inside "
               "`with jax.set_mesh(tpflax.make_mesh(mesh_shape)):`, or pass mesh= to jax.shard_map")
    else:
        fix = f"pass sample= matching the model's __call__ and the full variable tree it was initialised with{called}"
    return (f"could not trace the forward pass of {m.name} with sample inputs ({shapes}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; {fix}{labels_hint(e, m.sample)}")


def _positions(sample: Sequence[Any]) -> int:
    """:attr:`Dataflow.positions` of the traced sample's invars."""
    shape = tuple(getattr(sample[0].aval, "shape", ())) if sample else ()
    if not shape:
        return 0
    ids = jax.numpy.issubdtype(sample[0].aval.dtype, jax.numpy.integer)
    return math.prod(shape if ids or len(shape) == 1 else shape[:-1])


def dataflow(model: Any, sample: Any = None, variables: Any = None, mesh: Any = None,
             batch: int | None = None) -> Dataflow:
    """Trace ``model`` on ``sample`` and analyse which parameter feeds which.

    Args:
        model: anything :func:`tpflax._src.model.as_model` accepts: a
            ``tpflax.zoo`` model, a linen ``nn.Module`` or an ``nnx.Module`` (with
            ``sample``), or a plain function ``fn(variables, *sample)``.
        sample: example forward inputs; ``jax.ShapeDtypeStruct`` suffice. A
            ZooModel defaults to its own sample inputs (batch 1).
        variables: the variable tree ``model`` takes (needed for a function;
            a linen module defaults to its abstract init); paths in the result
            match ``tpflax.plan(variables, ...).decisions``.
        mesh: the mesh shape the step runs on: the forward is traced under it
            (:func:`trace_jaxpr`), so a model's logical constraints are there.
        batch: the batch size the user gave (``estimate(plan, tx, 8)``): only inputs leading with it hold the
            batch (:attr:`Dataflow.batch_reads`), as ``make_train_step(batch=8)`` keeps the others replicated;
            None: every input's leading dim does (:func:`tpflax._src.trace.batchflags.batch_lead`).

    Returns:
        A :class:`Dataflow`.

    Raises:
        TraceError: the model cannot be traced with these inputs.

    >>> from tpflax import zoo
    >>> flow = dataflow(zoo.get("mlp"))
    >>> sorted({(e.src, e.dst) for e in flow.edges})[0]
    ('params/block_0/mlp/up/kernel', 'params/block_0/mlp/down/kernel')
    """
    from tpflax._src.model_cache import cached
    from tpflax._src.trace.loopconsts import loop_consts_of

    m = as_model(model, sample, variables)

    def make() -> Dataflow:
        closed, paths, n = trace_jaxpr(m, mesh=mesh)
        # the parameters scans read as loop constants, for the estimate (no second trace of the model)
        cached("loop_consts", m, lambda: loop_consts_of(closed, paths, n))
        return analyze(closed, paths, batch)

    # one trace per model, variables' and sample's shapes, and mesh, unless nothing in it depends on the mesh
    given = () if batch is None else (("batch", batch),)  # a size given: another entry (its batch_reads differ)
    return cached("dataflow", m, make, (mesh_key(mesh), *given), shared=("any mesh", *given), free=_mesh_free)


def _mesh_free(flow: Dataflow) -> bool:
    """Whether nothing the analysis found depends on the mesh traced under: no constraint, no shard_map."""
    return not (flow.constraints or flow.split_widths or flow.collectives or flow.row_axes or flow.in_specs)


def mesh_key(mesh: Any) -> str:
    """The cache key of a trace under ``mesh`` (any form :func:`tpflax.mesh_shape` reads): '' for none."""
    from tpflax._src.mesh import mesh_shape

    return "" if mesh is None else str(mesh_shape(mesh))


def analyze(closed: Any, paths: Sequence[str], batch: int | None = None) -> Dataflow:
    """Analyse a closed jaxpr whose first ``len(paths)`` invars are the parameters at ``paths`` (``batch``: the
    batch size given, see :func:`dataflow`)."""
    jaxpr = closed.jaxpr
    w = new_walk()
    w.bits = {p: 1 << i for i, p in enumerate(paths)}
    w.shapes = {p: tuple(getattr(v.aval, "shape", ())) for p, v in zip(paths, jaxpr.invars, strict=False)}
    args = []
    for i, v in enumerate(jaxpr.invars):
        rank = len(getattr(v.aval, "shape", ()))
        if i < len(paths):
            args.append(Val(rank, origin=((paths[i], tuple(range(rank))),)))
            w.raw[id(args[-1])] = paths[i]
        else:
            args.append(Val(rank, fed=True))
    outs = w.run(jaxpr, args)
    for v in outs:
        if v.tags is not None:
            # an output's features are its last dim's tags (a head's logits, not the tokens a (T, T) token-mixing
            # weight tags on the way); an output whose last dim carries none (logits laid out (B, V, T) for a
            # CTC loss) has its features elsewhere: every dim's tags count
            last = any(not is_minor(k) for k in v.tags[-1]) if v.tags else False
            for d, m in enumerate(v.tags):
                for k in m:
                    if is_minor(k):
                        w.cap(k)
                    else:
                        w.outputs.add(k)
                        if d == len(v.tags) - 1 or not last:
                            w.features.add(k)
    concats, again = _concats(w)
    found, branches = _pieces_joined(w)
    for (uid, dim), (sizes, whole) in found["cuts"].items():
        # pieces sliced off a view of the kernel dim (Falcon's (heads + 2) x head_dim, sliced by heads): in its units
        n = jaxpr.invars[paths.index(w.uses[uid].path)].aval.shape[dim]
        if sum(sizes) != n and n % sum(sizes) == 0:
            found["cuts"][(uid, dim)] = (tuple(x * (n // sum(sizes)) for x in sizes), whole)
    remat, remat_calls = remat_share(jaxpr)
    edges = tuple(
        Edge(w.uses[s].path, s, sd, w.uses[d].path, d, dd, math.gcd(limit, found["caps"].get((s, sd), 0)), via)
        for (s, sd, d, dd), (limit, via) in sorted(found["edges"].items()))
    sample = jaxpr.invars[len(paths):]
    examples = int(sample[0].aval.shape[0]) if sample and getattr(sample[0].aval, "shape", ()) else 1
    inputs = read_groups(jaxpr, w.reads)
    batched = _batch_reads(jaxpr, len(paths), examples, w.reads, batch)
    return Dataflow(paths=tuple(paths), uses=tuple(w.uses), examples=examples, positions=_positions(sample),
                    edges=edges, escapes=found["escapes"],
                    outputs=frozenset(found["outputs"]), features=frozenset(found["features"]),
                    recurrent=frozenset(w.recurrent),
                    biases=dict(w.biases), elementwise=frozenset(w.elementwise),
                    combined={p: tuple(ds) for p, ds in w.combined.items()},
                    channels={p: by for p, by in w.channels.items() if by},
                    scanned=dict(w.scanned), n_eqns=w.n_eqns, fused=found["fused"], branches=branches,
                    cuts=found["cuts"], concats=concats, concat_again=again, views=frozenset(w.root(k) for k in w.views),
                    padded=frozenset(w.padded),
                    shared=shared_reads(jaxpr, w.reads) | own_casts(jaxpr, w.reads, inputs), remat=remat,
                    remat_calls=remat_calls,
                    products=_one_branch(w.products), channelwise=dict(w.channelwise),
                    split_sums=tuple((frozenset(w.root(k) for k in ks), n, c) for ks, n, c in w.split_sums),
                    broadcast_sums=tuple((frozenset(w.root(k) for k in ks), n, c) for ks, n, c in w.broadcast_sums),
                    broadcast_sides=tuple(frozenset(w.root(k) for k in ks) for ks in w.broadcast_sides),
                    split_grads=tuple((frozenset(w.root(k) for k in a), frozenset(w.root(k) for k in b), n, c)
                                      for a, b, n, c in w.split_grads),
                    spread=_on_kernel_dims(w, w.spread), grown=_on_kernel_dims(w, w.grown),
                    resequenced=frozenset(w.root(k) for k in w.resequenced if not is_minor(k)),
                    alongside=frozenset((w.root(a), w.root(b)) for a, b in w.alongside if w.root(a) != w.root(b)),
                    reduced=frozenset(w.root(k) for k in w.normed if not is_minor(k)),
                    gated=frozenset((w.root(a), w.root(b)) for a, b in w.gated if w.root(a) != w.root(b)),
                    collectives=tuple(c for cs in w.collectives.values() for c in cs),
                    row_axes=frozenset(w.row_axes), grad_deps=dict(w.grad_deps),
                    inputs=inputs,
                    apart=read_groups(jaxpr, w.reads, VIEWS - {"sharding_constraint", "reshard"}),
                    dead=dead_params(jaxpr, paths) - {u.path for u in w.uses},
                    no_grad=no_grad_params(closed, paths), constraints=tuple(sorted(w.constraints)),
                    split_widths=frozenset(w.split_widths), parted={p: dict(d) for p, d in w.parted.items()},
                    streamed=frozenset(w.root(k) for k in w.joined if not is_minor(k)),
                    added=remap_added(w.added, lambda k: None if is_minor(k) else w.root(k)), expanded=dict(w.expanded),
                    in_specs=dict(w.in_specs), direct=frozenset(w.direct),
                    derived=frozenset(w.derived), crossed=tuple(dict.fromkeys(w.crossed)), crossings=tuple(w.crossings),
                    ffts=tuple(w.ffts),
                    fft_reads=tuple(dataclasses.replace(r, tags=tuple(frozenset(w.root(k) for k in ks) for ks in r.tags))
                                    for r in w.fft_reads),
                    sliced=_sliced(w, {p: tuple(v.aval.shape) for p, v in zip(paths, jaxpr.invars, strict=False)}),
                    batch_reads=batched,
                    unbatched=_unbatched(jaxpr, len(paths), examples, w.reads, batch, batched),
                    norm_fed=frozenset((*w.root(k), d, dd, w.stats.get(k, 0)) for k, d, dd in w.norm_fed
                                       if not is_minor(k)),
                    stream_ends=tuple((frozenset(w.root(k) for k in ks), n) for ks, n in w.stream_ends))


def _concats(w: Any) -> tuple[dict[tuple[int, int], tuple[int, ...]], dict[tuple[int, int], tuple[int, int]]]:
    """``{(use id, kernel dim): input sizes}`` of the kernel dims contracting, row for row, a concatenation of
    kernels' outputs each of which reaches them (:attr:`Dataflow.concats`), and ``{(use id, kernel dim): the first
    of them}`` for the later ones reading the same concatenation (:attr:`Dataflow.concat_again`).

    A concatenation no kernel reads so ends its inputs' chains, as any concatenation did before
    (:func:`tpflax._src.trace.handlers.concatenate`): one reduced on the way (Inception's branches side by side,
    averaged over the image, then the classifier) is resharded at its own, larger size, which a split of the
    reading kernel does not pay back."""
    srcs: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for (s, sd, d, dd) in w.edges:
        srcs.setdefault((d, dd), set()).add((s, sd))
    out: dict[tuple[int, int], tuple[int, ...]] = {}
    again: dict[tuple[int, int], tuple[int, int]] = {}
    for i, (keys, sizes, rows) in enumerate(w.concats):
        # the kernels contracting the concatenation itself (or a cast of it) where any does, not those its inputs
        # reach on other paths too (xLSTM's q, k and v, concatenated for the gates, and on to proj_down)
        direct = w.concat_reads.get(i)
        read = [dst for dst, got in srcs.items() if all(ks & got for ks in keys) and (not direct or dst in direct)]
        if read and all(w.uses[d].op == "dot" and w.uses[d].rows == rows for d, _ in read):
            for dst in sorted(read):
                out.setdefault(dst, sizes)
                if dst != min(read):
                    again.setdefault(dst, min(read))
            continue
        for ks in keys:
            w.escape(dict.fromkeys(ks), "concatenated with other values along it")
    return out, again


def _batch_reads(jaxpr: Any, n: int, examples: int, reads: Mapping[int, tuple[Any, int, tuple]],
                 batch: int | None = None) -> frozenset[int]:
    """:attr:`Dataflow.batch_reads`: the ``dot`` uses (``reads``: use id -> (equation, activation operand, ctx)) whose
    activation a dim of which carries the batch; ``n``: the parameters among ``jaxpr``'s invars, the sample after;
    ``batch``: the batch size given (only inputs leading with it carry the batch).
    Empty when the flag walk meets a structure it does not know: the record only refines pricing."""
    if examples <= 1:  # a one-example sample: every size-1 dim would read as the batch
        return frozenset()
    dots: dict[int, list[tuple[bool, ...]]] = {}
    try:
        batch_dims(jaxpr, [input_flags(v, batch) if i >= n else no_flags(v) for i, v in enumerate(jaxpr.invars)],
                   dots, examples)
    except (IndexError, KeyError, ValueError):  # a structure the flag walk does not know: only a pricing refinement
        return frozenset()
    return frozenset(uid for uid, (eqn, i, _) in reads.items()
                     if id(eqn) in dots and i < len(dots[id(eqn)]) and any(dots[id(eqn)][i]))


def _unbatched(jaxpr: Any, n: int, examples: int, reads: Mapping[int, tuple[Any, int, tuple]],
               batch: int | None, batched: frozenset[int]) -> frozenset[int]:
    """:attr:`Dataflow.unbatched`: with a batch size given, the ``dot`` uses whose activation carries a batch only
    from inputs leading with another size (which the step keeps replicated); empty without one. ``batched``:
    :func:`_batch_reads` of that ``batch``, walked once by the caller."""
    if batch is None:
        return frozenset()
    return _batch_reads(jaxpr, n, examples, reads) - batched


def _sliced(w: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """:attr:`Dataflow.sliced`: the window all static slices of a parameter read together, over its size."""
    out = {}
    for path, reads in w.raw_reads.items():
        if not reads or any(r is None for r in reads):
            continue
        box = [(min(r[d][0] for r in reads), max(r[d][1] for r in reads)) for d in range(len(shapes[path]))]
        frac = math.prod(b - a for a, b in box) / max(math.prod(shapes[path]), 1)
        if frac < 1:
            out[path] = frac
    return out


def _on_kernel_dims(w: Any, table: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """A ``{tag: rows}`` table of the walk (:attr:`Walk.spread`, :attr:`Walk.grown`) with every piece key back
    on its kernel dim, the most rows kept."""
    out: dict[tuple[int, int], int] = {}
    for k, rows in table.items():
        r = w.root(k)
        out[r] = max(out.get(r, 0), rows)
    return out


def tiles(taken: set[tuple[int, int, int]]) -> tuple[int, ...] | None:
    """The sizes of the slices ``{(start, size, dim size)}`` in order when they cut the dim into pieces, each
    element in exactly one; else None.

    >>> tiles({(0, 128, 256), (128, 64, 256), (192, 64, 256)}), tiles({(1, 7, 8)}), tiles({(0, 4, 8), (2, 6, 8)})
    ((128, 64, 64), None, None)
    """
    totals = {total for _, _, total in taken}
    at, sizes = 0, []
    for start, size, _ in sorted(taken):
        if start != at:
            return None
        at, sizes = at + size, [*sizes, size]
    return tuple(sizes) if len(totals) == 1 and at == totals.pop() else None


def _pieces_joined(w: Any) -> tuple[dict[str, Any], dict[tuple[int, int], tuple[frozenset[int], ...]]]:
    """The walk's findings with every piece key (:meth:`Walk.piece`) back on its kernel dim.

    A kernel dim escapes only when none of its pieces reaches a contraction: a piece that ends (an MQA
    key summed against the queries) is resharded with the others by XLA, as a fused kernel split
    naively is, and then gathered whole (:attr:`Dataflow.cuts` names it). Also returns ``{kernel dim:
    contractions each piece reaches}`` for dims whose pieces reach more than one contraction
    (:attr:`Dataflow.branches`).
    """
    root = w.root
    edges: dict[tuple[int, int, int, int], tuple[int, tuple[str, ...]]] = {}
    reach: dict[tuple[int, int], dict[tuple[int, int], set[int]]] = {}
    for (s, sd, d, dd), (limit, via) in w.edges.items():
        r = root((s, sd))
        old = edges.get((*r, d, dd))
        edges[(*r, d, dd)] = (limit, via) if old is None else (math.gcd(old[0], limit), old[1])
        if (s, sd) in w.pieces:
            reach.setdefault(r, {}).setdefault((s, sd), set()).add(d)
    escapes: dict[tuple[int, int], str] = {}
    whole: dict[tuple[int, int], set[int]] = {}  # pieces that end while others reach a contraction
    # kernel dims whose minor part (Walk.part_key) reaches a contraction: a product of two activations summing their
    # major part (the combine of DBRX's experts stored (E * f, d), summing E) ends no split of the stored dim
    parted = {root((s, sd)) for (s, sd, _, _) in w.edges if (s, sd) in w.parts}
    for k, why in w.escapes.items():
        if k in w.parts or (why == PRODUCT_SUM and k in parted):
            continue
        if k not in w.pieces or root(k) not in reach:
            escapes.setdefault(root(k), why)
        else:
            whole.setdefault(root(k), set()).add(w.piece_no[k])
    caps: dict[tuple[int, int], int] = {}
    for k, n in w.caps.items():
        caps[root(k)] = math.gcd(caps.get(root(k), 0), n)
    fused: dict[tuple[int, int], int] = {}
    for k, n in w.fused.items():
        fused[root(k)] = max(fused.get(root(k), 1), n)
    branches = {r: tuple(frozenset(d) for _, d in sorted(by.items())) for r, by in reach.items()
                if len(set().union(*by.values())) > 1}
    cuts = {root(k): (sizes, tuple(sorted(whole.get(root(k), ())))) for k, sizes in w.cuts.items()
            if not is_minor(k)}
    for k, taken in w.slices.items():
        sizes = tiles(taken)
        if sizes is not None and len(set(sizes)) > 1:  # unequal pieces, split naively over the fused dim like a split's
            if escapes.get(root(k)) == SLICED:
                del escapes[root(k)]
            cuts.setdefault(root(k), (sizes, tuple(sorted(whole.get(root(k), ())))))
            fused[root(k)] = len(sizes)
    return {"edges": edges, "escapes": escapes, "caps": caps, "fused": fused, "cuts": cuts,
            "outputs": {root(k) for k in w.outputs}, "features": {root(k) for k in w.features}}, branches


def _one_branch(products: dict) -> tuple:
    """The score products a step runs: of a ``cond``'s branches, one runs (the largest is kept).

    >>> from tpflax._src.trace.records import Product
    >>> a, b = Product((2, 4, 8, 8)), Product((2, 4, 16, 16))
    >>> br = lambda i: (("branch", 7, i),)
    >>> [p.shape for p in _one_branch({(br(0), 1): a, (br(1), 2): b, ((), 3): a})]
    [(2, 4, 16, 16), (2, 4, 8, 8)]
    """
    def branch(ctx: tuple) -> tuple | None:  # the outermost cond branch around a product
        return next((c for c in ctx if isinstance(c, tuple) and c[0] == "branch"), None)

    size: dict[tuple, int] = {}
    for (ctx, _), p in products.items():
        if (b := branch(ctx)) is not None:
            size[b] = size.get(b, 0) + math.prod(p.shape) * p.count
    best: dict[int, tuple] = {}  # cond -> its largest branch
    for b, n in size.items():
        if b[1] not in best or n > size[best[b[1]]]:
            best[b[1]] = b
    return tuple(p for (ctx, _), p in products.items()
                 if (b := branch(ctx)) is None or best[b[1]] == b)


_CONTRACTIONS = ("dot_general", "conv_general_dilated")


def remat_share(jaxpr: Any) -> tuple[float, int]:
    """``(share, calls)``: the share of ``jaxpr``'s contractions, as they run (a scan's body once per
    iteration), inside a rematerialised call (0 without any), and how many outermost such calls run
    (a scan's body once per iteration): the layers the backward recomputes one at a time. A call whose
    policy saves nothing (``jax.checkpoint_policies.nothing_saveable``, big_vision's and MaxText's full
    remat) counts; one with a saving policy (``dots_saveable``...) does not: it keeps what it names.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda w, x: jax.checkpoint(lambda x: jnp.tanh(x @ w))(x) @ w
    >>> remat_share(jax.make_jaxpr(f)(jnp.ones((4, 4)), jnp.ones((2, 4))).jaxpr)
    (0.5, 1)
    >>> def stack(w, x):  # four remat'd layers in a scan, one contraction outside it
    ...     body = jax.checkpoint(lambda h, _: (jnp.tanh(h @ w), None), policy=jax.checkpoint_policies.nothing_saveable)
    ...     return jax.lax.scan(body, x, None, length=4)[0] @ w
    >>> remat_share(jax.make_jaxpr(stack)(jnp.ones((4, 4)), jnp.ones((2, 4))).jaxpr)
    (0.8, 4)
    """
    from tpflax._src.trace.control import FULL_REMAT, REMAT

    counts = [0, 0, 0]  # contractions as they run, of which rematerialised; outermost remat calls as they run

    def visit(j: Any, inside: bool, times: int) -> None:
        for eqn in j.eqns:
            if eqn.primitive.name in _CONTRACTIONS:
                counts[0] += times
                counts[1] += times * inside
            remat = eqn.primitive.name in REMAT and eqn.params.get("policy") in FULL_REMAT
            counts[2] += times * (remat and not inside)
            runs = times * int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else times
            for sub in _sub_jaxprs(eqn.params.values()):
                visit(sub, inside or remat, runs)

    visit(jaxpr, False, 1)
    return (counts[1] / counts[0] if counts[0] else 0.0), counts[2]


def _sub_jaxprs(values: Any):
    for v in values:
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(v, "jaxpr") and hasattr(v, "consts"):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            yield from _sub_jaxprs(v)
