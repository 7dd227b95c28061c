"""The per-model half of the estimate: what a step costs whatever the mesh.

:func:`prepare` reads the batch, traces the activations and asks optax for the
optimizer state's shapes once. :func:`tpflax._src.cost.estimate.price` then
prices any plan of the same tree on any mesh with arithmetic over decisions,
so :func:`tpflax.estimate` and :func:`tpflax.suggest_mesh` share every number.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tpflax._src.cost.activations import trace_activations
from tpflax._src.cost.batch import (
    Batch,
    bare_shape,
    config_value,
    dtype_name,
    np_dtype,
    parse_batch,
    plain_batch,
    resolve_batch,
    size_problem,
)
from tpflax._src.cost.optstate import OptLayout, opt_layout
from tpflax._src.cost.records import Act
from tpflax._src.cost.traced import Scores, Traced, frozen_inputs, reads_slice, traced_uses
from tpflax._src.errors import EstimateError
from tpflax._src.facts.tree import itemsize, numeric_kind
from tpflax._src.planner.optimizer import ignored_grads
from tpflax._src.planner.optimizer import optimizer_name as name_of
from tpflax._src.planner.params import planned_tree
from tpflax._src.planner.pricing import token_batch, token_tables
from tpflax._src.trace.records import InSpecs

BACKENDS = ("tpu", "gpu", "cpu")
DISPATCHES = ("all-to-all", "dense")


@dataclass(frozen=True)
class Workload:
    """One (model, optimizer, batch) to price: independent of the plan's specs and of the mesh.

    Attributes:
        batch: the global batch.
        config: model config or hints (``vocab``, ``seq_len``, ``d_model``, ...).
        activations: traced layer shapes (empty: the transformer formula).
        opt: the optimizer state's layout (None: no optimizer).
        remat, backend, dispatch: as :func:`tpflax.estimate` takes them.
        act_item, g_item: activation and gradient bytes per element (g_item None: the parameter's).
        settings: what the estimate reports it used.
        tied, parts, rows, fused, shared, lookups, grouped, joined, widths, slices, buffers, streams: from the traced
            forward (see :class:`tpflax._src.cost.traced.Traced`); None untraced.
        contractions: a plain function's parameter contractions as layer calls (see
            :func:`contraction_calls`), for the saved-activation bytes only: the collective
            models keep their shape formulas for it. Empty for a module's trace.
        scores: the traced attention scores (see :class:`Scores`), for the peak of a model
            without a config's heads and sequence length.
        next_token: the step's loss reads a slice of the logits, whose gradient is then held
            apart from them (``Peak.logits_grad``): the ``loss=`` given, traced, else tpflax's
            next-token default (a model other than a zoo model, called on token ids ``(batch, seq)``).
        biased: from the trace (:attr:`Traced.biased`).
        collectives: from the trace (:attr:`Traced.collectives`): priced as they are, whatever the plan.
        row_axes: from the trace (:attr:`Traced.row_axes`): priced as batch axes (:mod:`tpflax._src.cost.explicit`).
        meets, positional, loops: from the trace (:attr:`Traced.meets`, :attr:`Traced.positional`,
            :attr:`Traced.loops`).
        remat_layers: from the trace (:attr:`Traced.remat_layers`): the layers a remat'd step recomputes
            one at a time, where no config gives ``n_layers``.
        erf: from the trace (:attr:`Traced.erf`).
        product_sums: from the trace (:attr:`Traced.product_sums`): reported in the notes, not priced.
        split_sums: from the trace (:attr:`Traced.split_sums`): priced over the tensor axes.
        split_grads: from the trace (:attr:`Traced.split_grads`): priced over the tensor axes.
    """

    batch: Batch
    config: Any
    activations: Mapping[str, Sequence[Act]]
    opt: OptLayout | None
    remat: bool
    backend: str
    dispatch: str
    act_item: int
    g_item: int | None
    settings: Mapping[str, Any]
    tied: frozenset[str] | None = None
    parts: Mapping[str, int] | None = None
    rows: Mapping[str, float] | None = None
    fused: Mapping[str, tuple[int, int | tuple[int, ...], tuple[int, ...], bool]] | None = None
    shared: frozenset[str] | None = None
    lookups: Mapping[str, int] | None = None
    grouped: Mapping[str, tuple[float, float]] | None = None
    joined: Mapping[str, tuple[float, ...]] | None = None
    widths: Mapping[str, int] | None = None
    frozen_inputs: frozenset[str] = frozenset()  # no input gradient (widths 0): traced.frozen_inputs, input readers
    slices: Mapping[str, int] | None = None
    slice_reads: Mapping[str, int] | None = None
    chained: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # (Traced.chained)
    chain: Mapping[str, tuple] = field(default_factory=dict)  # (Traced.chain)
    residual: Mapping[str, tuple[int, frozenset]] = field(default_factory=dict)  # (Traced.residual)
    residual_norms: Mapping[str, int] = field(default_factory=dict)  # (Traced.residual_norms)
    loss_read: frozenset[str] = frozenset()  # (Traced.loss_read)
    downstream: Mapping[str, tuple[int, int, int, tuple[str, ...], bool]] = field(default_factory=dict)  # (Traced.downstream)
    buffers: Mapping[str, float] | None = None
    streams: Mapping[str, tuple[float, int, int]] | None = None
    grown: Mapping[str, float] = field(default_factory=dict)  # outputs upsampled before read whole (Traced)
    in_rows: Mapping[str, float] = field(default_factory=dict)  # a conv's input rows over its output's (Traced)
    combined: Mapping[str, int] = field(default_factory=dict)  # gradient parts of elementwise uses (Traced)
    reduced: frozenset[str] = frozenset()  # contractions whose output is only reduced row by row (Traced)
    contractions: Mapping[str, Sequence[Act]] = field(default_factory=dict)
    scores: tuple[Scores, ...] = ()
    next_token: bool = False
    biased: frozenset[str] = frozenset()
    collectives: tuple = ()
    target: str | None = None  # the TPU topology or generation (estimate(target=))
    row_axes: frozenset[str] = frozenset()
    meets: tuple = ()
    positional: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    loops: Mapping[str, tuple[int, bool]] | None = None
    remat_layers: int = 0
    erf: frozenset[str] = frozenset()
    product_sums: Mapping[str, frozenset[int]] = field(default_factory=dict)
    split_sums: tuple[tuple[frozenset[tuple[str, int]], float, int], ...] = ()
    split_grads: tuple[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]], float, int], ...] = ()
    edges: frozenset[tuple[str, str]] | None = None  # traced dataflow edges, None: not traced (Traced.edges)
    contracted: frozenset[str] = frozenset()  # traced parameters a contraction uses (Traced.contracted)
    looked: frozenset[str] = frozenset()  # traced parameters a lookup reads (Traced.looked)
    batched: frozenset[str] = frozenset()  # traced expert kernels reading a dispatched buffer (Traced.batched)
    ragged: Mapping[str, frozenset[int]] = field(default_factory=dict)  # ragged dots' kernel group dims (Traced.ragged)
    batch_dims: Mapping[str, frozenset[int]] = field(default_factory=dict)  # Traced.batch_dims
    conditions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # (Traced.conditions)
    dead: frozenset[str] = frozenset()  # traced parameters the outputs do not depend on (Traced.dead)
    sliced: Mapping[str, float] = field(default_factory=dict)  # (Traced.sliced)
    no_grad: frozenset[str] = frozenset()  # traced parameters without a gradient (Traced.no_grad, and ignored)
    ignored: frozenset[str] = frozenset()  # trained parameters the optimizer's update never reads the gradient of
    dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # (Traced.dots)
    batched_dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # (Traced.batched_dots)
    shard_mapped: InSpecs = field(default_factory=dict)  # (Traced.shard_mapped)
    direct: frozenset[str] = frozenset()  # (Traced.direct)
    derived: frozenset[str] = frozenset()  # (Traced.derived)
    cast_to: Mapping[str, str] = field(default_factory=dict)  # (Traced.cast_to)
    cast_some: Mapping[str, str] = field(default_factory=dict)  # (Traced.cast_some)
    apart: Mapping[str, str] = field(default_factory=dict)  # (Traced.apart)
    split_widths: frozenset[tuple[int, tuple[str, ...]]] = frozenset()  # (Traced.split_widths)
    streamed: frozenset[tuple[str, int]] = frozenset()  # (Traced.streamed)
    expanded: Mapping[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)  # (Traced.expanded)
    crossed: tuple[str, ...] = ()  # (Traced.crossed)
    crossings: tuple = ()  # (Traced.crossings)
    ffts: tuple[str, ...] = ()  # (Traced.ffts)
    fft_reads: tuple = ()  # (Traced.fft_reads)
    parted: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # (Traced.parted)
    concats: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)  # (Traced.concats)
    concat_again: Mapping[str, str] = field(default_factory=dict)  # (Traced.concat_again)
    lookup_rows: Mapping[str, float] = field(default_factory=dict)  # (Traced.lookup_rows)
    scanned: Mapping[str, int] = field(default_factory=dict)  # (Traced.scanned)
    constrained: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (Traced.constrained)
    limits: Mapping[tuple[str, int, str, int], int] = field(default_factory=dict)  # (Traced.limits)
    batch_read: frozenset[str] = frozenset()  # (Traced.batch_read)
    unbatched: frozenset[str] = frozenset()  # (Traced.unbatched)
    broadcast_from: Mapping[int, frozenset[tuple[str, int]]] = field(default_factory=dict)  # (Traced.broadcast_from)

    @property
    def saved(self) -> Mapping[str, Sequence[Act]]:
        """The layer calls whose outputs the backward pass keeps: the traced ones, else the contractions."""
        return self.activations or self.contractions


def _check_options(act_dtype: Any, grad_dtype: Any, backend: str, expert_dispatch: str, remat: Any = False) -> None:
    """Raise :class:`EstimateError` for an unknown dtype, backend or dispatch, or a remat that is no bool."""
    if not isinstance(remat, (bool, np.bool_)):  # remat="false" (a config's text) was read as on
        raise EstimateError(f"remat={remat!r} must be True or False (activations rematerialised or not)")
    for name, value in (("act_dtype", act_dtype), ("grad_dtype", grad_dtype)):
        if value is not None and dtype_name(value) is None:
            raise EstimateError(f"{name}={value!r} is not a dtype jax knows; use e.g. 'bfloat16' or 'float32'")
        if value is not None and numeric_kind(dtype_name(value)) != "float":
            raise EstimateError(f"{name}={value!r} is not a floating dtype: a training step's "
                                f"{'gradients' if name == 'grad_dtype' else 'activations'} are floats; "
                                "use e.g. 'bfloat16' or 'float32'")
    if backend not in BACKENDS:
        raise EstimateError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if expert_dispatch not in DISPATCHES:
        raise EstimateError(f"expert_dispatch {expert_dispatch!r} must be 'all-to-all' or 'dense'")


def _optax() -> Any:
    import optax

    return optax


def _check_optimizer(optimizer: Any, batch: Any) -> None:
    """EstimateError for a batch given where the optimizer goes (``estimate(plan, 8)``, ``estimate(plan,
    {"x": (8, 64)}, optax.adam(1e-3))``): it said "estimate needs a batch", or that a dict has no ``init``."""
    if optimizer is None or callable(getattr(optimizer, "init", None)):
        return
    if callable(getattr(batch, "init", None)) and callable(getattr(batch, "update", None)):
        raise EstimateError("the optimizer and the batch are swapped; pass them as estimate(plan, optimizer, batch)")
    if isinstance(optimizer, str) and hasattr(_optax(), optimizer):  # "adamw", as the command line names it
        raise EstimateError(f"optimizer {optimizer!r} is a name: pass the optax optimizer itself, e.g. "
                            f"optax.{optimizer}(1e-3)")
    if batch is not None:
        raise _no_optimizer(optimizer)
    shape_like = isinstance(optimizer, str) and bool(re.fullmatch(r"\s*\d+(\s*[xX*]\s*\d+)*\s*", optimizer))
    batch_like = (isinstance(optimizer, (numbers.Integral, tuple, list, Mapping)) or hasattr(optimizer, "shape")
                  or shape_like)
    if batch_like and not isinstance(optimizer, bool):
        raise EstimateError(f"optimizer {optimizer!r} looks like a batch: the order is estimate(plan, optimizer, "
                            "batch); pass the batch third or as batch=, and optimizer=None for no optimizer state")
    raise _no_optimizer(optimizer)


def _no_optimizer(optimizer: Any) -> EstimateError:
    """The EstimateError (returned, for the caller to raise) for an optimizer with no ``init()`` (a misspelt name, an
    ``nnx.Optimizer``'s class): it was "optimizer.init failed on the planned parameters: AttributeError: 'str' object
    has no attribute 'init'"."""
    short = isinstance(optimizer, (str, numbers.Number)) and len(repr(optimizer)) <= 60
    name = getattr(optimizer, "__name__", "")
    if callable(optimizer) and name and hasattr(_optax(), name):  # optax.adam, not called
        return EstimateError(f"optimizer optax.{name} is the optimizer's factory: call it, e.g. optax.{name}(1e-3)")
    return EstimateError(f"optimizer {repr(optimizer) if short else 'of type ' + type(optimizer).__name__} is no "
                        "optax.GradientTransformation (it has no init()); pass one, e.g. optax.adamw(1e-3), or None "
                        "for no optimizer state")


def _check_activations(activations: Any) -> None:
    """EstimateError unless ``activations`` is what :func:`tpflax.trace_activations` returns (or None): a
    mapping of layer path to a list of ``Act`` s. Anything else failed deep in the pricing with a bare
    TypeError ("'int' object is not iterable") or AttributeError."""
    if activations is None:
        return
    how = ("activations= takes what tpflax.trace_activations(model, batch) returns, {layer path: [Act, ...]} "
           "(or None: traced from model=)")
    if not isinstance(activations, Mapping):
        raise EstimateError(f"activations= is {type(activations).__name__}, not a mapping; {how}")
    bad = []
    for key, calls in activations.items():
        if not isinstance(key, str):
            bad.append(f"key {key!r} ({type(key).__name__}) is not a layer path")
        elif isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
            bad.append(f"{key}: {calls!r} ({type(calls).__name__}) is not a list of Act")
        elif (odd := next((a for a in calls if not isinstance(a, Act)), None)) is not None:
            bad.append(f"{key}: holds {odd!r} ({type(odd).__name__}), not an Act")
    if bad:
        raise EstimateError(f"activations= is not a trace of layer calls; {how}", bad[:8])


def prepare(plan, optimizer: Any = None, batch: Any = None, *, config: Any = None,
            activations: Mapping[str, Sequence[Act]] | None = None, model: Any = None, sample: Any = None,
            remat: bool = False, grad_dtype: Any = None, act_dtype: Any = None, backend: str = "tpu",
            expert_dispatch: str = "dense", optimizer_name: str | None = None,
            loss: Any = None) -> Workload:
    """The per-model part of :func:`tpflax.estimate`, for any plan of ``plan``'s tree (see its args).

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"data": 2})
    >>> w = prepare(p, optax.adam(1e-3), (4, 8))
    >>> w.batch.size, w.opt.full_bytes
    (4, 260)
    """
    _check_options(act_dtype, grad_dtype, backend, expert_dispatch, remat)
    _check_hints(config)
    _check_activations(activations)
    _check_optimizer(optimizer, batch)
    batch = plain_batch(batch)  # np.int64(8) was read as an array leaf: a batch of one example
    if (why := size_problem(batch)) is not None:  # before it sets a sample's leading dim
        raise EstimateError(why)
    # the batch size given as a number (estimate(plan, tx, 8), as make_train_step(batch=8) is told): an input of
    # another leading dim holds no batch (a positional table; the step keeps it replicated)
    given = batch if isinstance(batch, int) and not isinstance(batch, bool) else None
    sample, assumed = _sample_of(plan, model, sample, batch)
    m, batch = _at_batch_shape(_model(plan, model, sample), batch)
    if m is not None and m.zoo is not None:
        batch = resolve_batch(batch, m.zoo)  # a bare size: the zoo model's own batch of that many examples
    if m is None:  # a bare (batch, seq) of a tree with a token table is ids, as plan(batch=) reads it
        batch = token_batch(batch, None, _token_tables(plan))
    if m is not None and config is None:
        config = m.config
    if batch is None and m is not None and (sample is not None or m.zoo is None):
        batch = m.sample  # a model's own inputs are the batch (no labels: its loss takes the output)
    # the dataflow says which table is tied, whether an ``attend`` call (linen) or ``x @ table.T`` in a
    # method no layer trace sees (Gemma's ``Embedder.decode``) makes the logits
    shapes = {p: tuple(d.shape) for p, d in plan.decisions.items()}
    t = traced_uses(m, shapes, plan.mesh, given) if m is not None else Traced()
    # a model without a config dtype computes in what its contractions come out in as traced
    # (an HF bf16 model called on integer ids), not in the batch's float dtype
    traced_act = t.act_dtype if config_value(config, "dtype") is None else None
    b = replace(parse_batch(batch, config, dtype_name(act_dtype) or traced_act), given=given)
    if activations is None and m is not None:
        activations = trace_activations(m, b.size)
    activations = activations or {}
    # a config's remat field (a zoo model's), or the traced program's own nn.remat / jax.checkpoint
    remat = bool(remat or config_value(config, "remat", False) or t.remat)
    opt = opt_layout(plan, optimizer) if optimizer is not None else None
    name = (optimizer_name or name_of(optimizer)) if optimizer is not None else "none"
    settings = {"optimizer": name, "backend": backend, "remat": remat, "act_dtype": b.act_dtype,
                "grad_dtype": dtype_name(grad_dtype) or "param", "expert_dispatch": expert_dispatch,
                "activations": "traced" if activations else "formula"}
    if assumed:
        settings["sample"] = assumed
    if loss is not None:
        settings["loss"] = getattr(loss, "__name__", type(loss).__name__)
    contractions = contraction_calls(plan, t.contractions, b.size, t.tied or frozenset()) if not activations else {}
    # a frozen model's first layers (a LoRA base behind a frozen embedding): no input gradient to sum
    # (and a leaf read only through stop_gradient: Traced.no_grad, a frozen encoder behind a stopped table)
    # (and one whose gradient the optimizer's update never reads: a multi_transform's set_to_zero label, whose
    # gradient XLA drops from the step, all-reduce and all: planner/optimizer.py::ignored_grads)
    ignored = ignored_grads(plan, optimizer) if optimizer is not None else frozenset()
    no_grad = t.no_grad | ignored
    trainable = {p: d.trainable and p not in no_grad for p, d in plan.decisions.items()}
    frozen = frozen_inputs(t, trainable) if not all(trainable.values()) else frozenset()
    widths = {**(t.widths or {}), **dict.fromkeys(frozen, 0)} if frozen else t.widths
    # with the kernels reading the model's inputs (widths 0): no input gradient either, so unlike their repeats
    # (cost/leaves.py::merge): a post-norm stack over float features, whose first block's columns read the input
    # and the others' an activation, is priced per kind, not all as its first block (est 0.61x the compiled before)
    frozen = frozen | {p for p, n in (widths or {}).items() if n == 0}
    if contractions:
        settings["activations"] = "contractions"
    return Workload(batch=b, config=config, activations=activations, opt=opt, remat=remat, backend=backend,
                    dispatch=expert_dispatch, act_item=itemsize(b.act_dtype),
                    g_item=itemsize(dtype_name(grad_dtype)) if grad_dtype is not None else None,
                    settings=settings, tied=t.tied, parts=t.parts, rows=t.rows,
                    fused=t.fused, shared=t.shared, lookups=t.lookups,
                    grouped=t.grouped, joined=t.joined, widths=widths, frozen_inputs=frozen, slices=t.slices, slice_reads=t.slice_reads,
                    chained=t.chained, chain=t.chain, residual=t.residual, residual_norms=t.residual_norms, loss_read=t.loss_read, downstream=t.downstream,
                    buffers=t.buffers,
                    streams=t.streams, grown=t.grown, in_rows=t.in_rows, combined=t.combined, reduced=t.reduced, contractions=contractions, scores=t.scores,
                    next_token=_next_token(m) if loss is None else reads_slice(m, loss), biased=t.biased,
                    collectives=t.collectives, row_axes=t.row_axes, meets=t.meets,
                    positional=t.positional, loops=t.loops, remat_layers=t.remat_layers, erf=t.erf,
                    product_sums=t.product_sums, split_sums=t.split_sums, split_grads=t.split_grads,
                    edges=t.edges, contracted=t.contracted, looked=t.looked, batched=t.batched, ragged=t.ragged, conditions=t.conditions, dead=t.dead,
                    batch_dims=t.batch_dims, sliced=t.sliced, no_grad=no_grad, ignored=ignored, dots=t.dots, batched_dots=t.batched_dots, shard_mapped=t.shard_mapped, direct=t.direct, derived=t.derived, cast_to=t.cast_to, cast_some=t.cast_some, apart=t.apart, split_widths=t.split_widths, streamed=t.streamed, expanded=t.expanded, crossed=t.crossed, crossings=t.crossings, ffts=t.ffts, fft_reads=t.fft_reads, lookup_rows=t.lookup_rows, parted=t.parted, concats=t.concats, concat_again=t.concat_again,
                    scanned=t.scanned, constrained=t.constrained, limits=t.limits, batch_read=t.batch_read,
                    unbatched=t.unbatched, broadcast_from=t.broadcast_from)


def contraction_calls(plan, contractions: Sequence[tuple[str, float, tuple[int, ...], str]],
                      batch: int, tied: frozenset[str] = frozenset()) -> dict[str, list[Act]]:
    """A plain function's layer calls, one per contraction of a parameter, keyed like a linen
    trace's (the parameter's layer path): ``{path: [Act(inputs=((rows, contracted),), output=(rows, *kept))]}``.

    A scan body's contraction of one layer of a stacked parameter (its layers dim neither
    contracted nor kept) is traced once and runs once per layer: it counts that many times. A
    table's contraction where it is also looked up (``tied``: the logits of tied weights) is keyed
    ``path:attend``, as a linen ``attend`` call is.
    """
    from tpflax._src.cost.activations import layer_key

    out: dict[str, list[Act]] = {}
    for path, rows, kept, dtype in contractions:
        d, dtype = plan.decisions[path], dtype or "float32"
        shape = tuple(d.shape)
        sizes = tuple(shape[i] for i in kept)
        layers = shape[d.layers_dim] if d.layers_dim is not None and d.layers_dim not in kept else 1
        tokens, contracted = max(1, round(rows * batch)), math.prod(shape) // max(1, math.prod(sizes) * layers)
        # a lookup table contracted (not looked up) makes the tied logits: keyed as a linen ``attend`` call
        key = layer_key(d.unit) + (":attend" if path in tied else "")
        out.setdefault(key, []).extend(
            [Act(((tokens, contracted),), (tokens, *sizes), dtype, itemsize(dtype))] * layers)
    return out


def _next_token(m: Any) -> bool:
    """Whether ``make_train_step``'s default loss for ``m`` is the next-token cross-entropy, which reads
    ``logits[:, :-1]``: a model other than a zoo model (whose own loss takes separate labels) whose first
    input is integer ids ``(batch, seq)``."""
    if m is None or m.zoo is not None or not m.sample:
        return False
    x = m.sample[0]
    shape, dtype = getattr(x, "shape", ()), getattr(x, "dtype", None)
    return len(shape) == 2 and dtype is not None and np_dtype(str(dtype)).kind in "iu"


def _sample_of(plan, model: Any, sample: Any, batch: Any) -> tuple[Any, str]:
    """``(sample, what was assumed)``: a module or function given without ``sample`` takes a batch of arrays
    (one, or a tuple of them) as its inputs, and a bare-shape batch (``(16, 1024)``) as one input of that
    shape: token ids (int32) when the tree has an embedding table, else float32 features. Anything else is
    returned as given."""
    from tpflax._src.model import is_zoo

    if (sample is None and model is not None and not is_zoo(model) and not getattr(model, "sample", None)
            and _arrays(batch)):
        # the model's inputs given as the batch (``estimate(plan, tx, (ids,), model=module)``)
        return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), ""
    shape = bare_shape(batch)
    if sample is not None or model is None or is_zoo(model) or shape is None:
        return sample, ""
    import jax

    ids = _token_tables(plan)
    dtype = "int32" if ids else "float32"
    why = "token ids: the tree has an embedding table" if ids else "features: the tree has no embedding table"
    return (jax.ShapeDtypeStruct(shape, dtype),), f"one input {shape} {dtype} ({why}; pass sample= to change it)"


def _arrays(batch: Any) -> bool:
    """An array (or ``ShapeDtypeStruct``), or a non-empty tuple or list of them: a model's positional inputs."""
    items = batch if isinstance(batch, (tuple, list)) else (batch,)
    return bool(items) and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in items)


def _token_tables(plan) -> bool:
    return token_tables((d.kind, d.unit.rsplit("/", 1)[-1]) for d in plan.decisions.values())


def _model(plan, model: Any, sample: Any):
    """``model`` as a :class:`tpflax._src.model.Model` (variables: the planned tree if it has none)."""
    if model is None:
        return None
    from tpflax._src.model import as_model

    m = as_model(model, sample)
    if m.variables is None:
        return m.with_variables(planned_tree(plan))
    _check_planned(plan, m)
    return m


# the config hints the formula multiplies: each a positive whole number where given
SIZE_HINTS = ("vocab", "seq_len", "d_model", "n_heads", "n_kv_heads", "head_dim", "n_layers", "d_ff")


def _check_hints(config: Any) -> None:
    """Raise EstimateError for a given size hint that is not a positive whole number (a negative layer count
    gave negative activation bytes; a string one a bare TypeError from the formula).

    >>> _check_hints({"n_layers": 2, "d_model": 64}), _check_hints(None)
    (None, None)
    >>> _check_hints({"n_layers": -2})
    Traceback (most recent call last):
    tpflax._src.errors.EstimateError: config n_layers=-2 must be a positive whole number
    """
    for name in SIZE_HINTS:
        v = config_value(config, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise EstimateError(f"config {name}={v!r} must be a positive whole number")


def _check_planned(plan, m: Any) -> None:
    """Raise PlanMismatchError when the model's own variables (a module's abstract init) give a leaf the plan
    has another shape: the estimate would price one model's activations beside another's parameters.

    >>> import jax, flax.linen as nn, tpflax
    >>> from tpflax._src.model import as_model
    >>> x = jax.ShapeDtypeStruct((8, 16), "float32")
    >>> p = tpflax.plan(jax.eval_shape(nn.Dense(64).init, jax.random.key(0), x), {"model": 4})
    >>> try:
    ...     _check_planned(p, as_model(nn.Dense(128), (x,)))
    ... except tpflax.PlanMismatchError as e:
    ...     for line in str(e).splitlines()[1:]:
    ...         print(line)
      - params/bias: the plan has (64,), the model (128,)
      - params/kernel: the plan has (16, 64), the model (16, 128)
    """
    from tpflax._src.errors import PlanMismatchError, TpflaxError
    from tpflax._src.facts.tree import walk

    try:
        own = {leaf.path: tuple(leaf.shape) for leaf in walk(m.variables)[0]}
    except TpflaxError:  # nothing to compare against
        return
    # a plan of the params collection alone names its leaves without the collection
    own.update({p[len("params/"):]: s for p, s in list(own.items()) if p.startswith("params/")})
    bad = [f"{p}: the plan has {tuple(d.shape)}, the model {own[p]}" for p, d in sorted(plan.decisions.items())
           if p in own and own[p] != tuple(d.shape)]
    if bad:
        raise PlanMismatchError("model= is not the model the plan was made for: its own variables differ from "
                                "the planned tree", bad[:8] + ([f"... and {len(bad) - 8} more"] if len(bad) > 8 else []))


def fixed_length_problem(m: Any, batch: Any) -> str | None:
    """Why a bare-shape ``batch`` (``(8, 64)``, ``"8x64"``) does not fit zoo model ``m`` (a :class:`Model`), whose
    config fixes its inputs per example (a sequence model's ``seq_len``); None when it fits, for other models
    and for other batches."""
    shape = bare_shape(batch)
    if m is None or m.zoo is None or shape is None or len(m.sample) != 1:
        return None
    s = m.sample[0]
    if len(getattr(s, "shape", ())) != len(shape) or tuple(s.shape[1:]) == shape[1:]:
        return None
    return fixed_inputs_message(m.name, tuple(shape), tuple(s.shape[1:]))


def fixed_inputs_message(name: str, shape: tuple[int, ...], per: tuple[int, ...]) -> str:
    """Why batch ``shape`` does not fit zoo model ``name``, whose config fixes its inputs at ``per`` per example."""
    return (f"batch {shape}: {name}'s config fixes its inputs at {per} per example, which is the length it runs "
            f"and is priced at; build the model at the batch's (zoo.get(name, seq_len={shape[1]}) for a sequence "
            f"model) or pass batch=({', '.join(map(str, (shape[0], *per)))}), or batch={shape[0]}")


def _at_batch_shape(m: Any, batch: Any) -> tuple[Any, Any]:
    """``(m, batch)`` with ``m`` traced at the shape it is estimated for: a bare-shape batch ``(8, 64)``
    sets the shape of a one-input model's sample (activations and collectives follow the sequence
    length, not only the batch size), a bare batch size its leading dim (then the sample is the
    batch: None is returned for it). A zoo config fixes its sequence length: a batch of another
    length is an error."""
    if m is not None and m.zoo is None and isinstance(batch, int) and not isinstance(batch, bool) and m.sample:
        return m.with_batch(batch), None
    shape = bare_shape(batch)
    if m is None or shape is None or len(m.sample) != 1:
        return m, batch
    s = m.sample[0]
    if len(getattr(s, "shape", ())) != len(shape) or tuple(s.shape[1:]) == shape[1:]:
        return m, batch
    if (why := fixed_length_problem(m, shape)) is not None:
        raise EstimateError(why)
    import jax

    return replace(m, sample=(jax.ShapeDtypeStruct(shape, s.dtype),)), batch


def with_batch_size(w: Workload, size: int) -> Workload:
    """``w`` for a global batch of ``size`` examples: every batch-major shape's leading dim replaced.

    Batch leaves and traced activations whose first dim is the batch size are
    resized (what a re-trace at ``size`` gives for batch-major models), and a layer
    run once per example (its vmap's members are the batch) runs ``size`` times; the
    optimizer state does not depend on the batch.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"data": 2})
    >>> with_batch_size(prepare(p, optax.adam(1e-3), (4, 8)), 2).batch.leaves[0]
    ('x', (2, 8), 'float32')
    """
    from dataclasses import replace

    old = w.batch.size

    def resize(shape: tuple[int, ...]) -> tuple[int, ...]:
        return (size, *shape[1:]) if shape and shape[0] == old else shape

    leaves = tuple((n, resize(s), d) for n, s, d in w.batch.leaves)
    def calls(v: Sequence[Act]) -> list[Act]:
        acts = [replace(a, inputs=tuple(resize(x) for x in a.inputs), output=resize(a.output)) for a in v]
        if old > 1 and acts and acts[0].members == old:  # a per-example vmap: one call per example
            return [replace(acts[0], members=size)] * (len(acts) // old * size)
        return acts

    acts = {k: calls(v) for k, v in w.activations.items()}

    def rows(shape: tuple[int, ...]) -> tuple[int, ...]:  # a contraction's (tokens, ...): tokens scale
        return (max(1, round(shape[0] * size / old)), *shape[1:]) if shape else shape

    contractions = {k: [replace(a, inputs=tuple(rows(x) for x in a.inputs), output=rows(a.output)) for a in v]
                    for k, v in w.contractions.items()}
    given = size if w.batch.given is not None else None
    return replace(w, batch=replace(w.batch, leaves=leaves, given=given), activations=acts, contractions=contractions)
