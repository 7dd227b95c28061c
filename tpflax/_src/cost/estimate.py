"""Memory and communication estimates for one training step of a plan.

``estimate(plan, optimizer, batch)`` is pure: it reads shapes, dtypes and specs,
asks optax for the optimizer state's *shape* (``jax.eval_shape``), and never
compiles or allocates. Everything is counted on the fullest device (ceil
division, so padding and replication show), next to the same numbers for one
device holding everything.

Communication is modelled per collective from the plan's semantics, priced with
the ring convention of :mod:`tpflax.hlo` so it can be compared with a compiled
program (:func:`tpflax.dry_run`), and kept per mesh axis:

* a sharded column -> row pair: all-reduce of the row output forward and of the
  column input gradient backward, over the tensor axes;
* a vocab-split embedding: all-reduce of its output forward; a vocab-split
  output head (or tied embedding ``attend``): all-reduce of its input gradient
  backward plus three small all-reduces (max, sum, label logit) for the softmax
  cross-entropy over the split vocabulary;
* fsdp: all-gather of the parameter for compute (the backward pass reuses it,
  with or without remat), and a reduce-scatter of its gradient; XLA:CPU has no reduce-scatter creator pass and
  emits a full all-reduce whose result each device slices, so
  ``backend="cpu"`` models that instead;
* data parallelism: all-reduce of the gradients over the batch axes that do not
  shard the leaf;
* expert parallelism (``expert_dispatch="all-to-all"``): two all-to-alls of the
  routed tokens forward and two backward.

Activation sizes come from :func:`trace_activations` (exact shapes of every
layer's input and output, from ``jax.eval_shape``; compute it once and reuse it
across meshes), or else from kernel shapes and the batch's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.errors import EstimateError, PlanMismatchError
from tpflax._src.hlo import ring_bytes
from tpflax._src.mesh import DATA, EXPERT, FSDP, TENSOR, MeshShape
from tpflax._src.specs import bytes_per_device, entries, entry_axes, used_axes

BACKENDS = ("tpu", "gpu", "cpu")


# ---------------------------------------------------------------------------
# records

@dataclass(frozen=True)
class Memory:
    """Bytes on one device for one training step.

    Attributes:
        params: trainable parameters.
        grads: their gradients.
        opt_state: optimizer state (from optax's real state shapes).
        activations: activations saved for the backward pass (an estimate).
        model_state: non-trainable variables (BatchNorm statistics, ...).
        inputs: the batch.
    """

    params: int = 0
    grads: int = 0
    opt_state: int = 0
    activations: int = 0
    model_state: int = 0
    inputs: int = 0

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.opt_state + self.activations + self.model_state
                + self.inputs)

    @property
    def arguments(self) -> int:
        """What a train step receives: params, model state, optimizer state and batch.

        This is what XLA reports as ``argument_size_in_bytes``.
        """
        return self.params + self.model_state + self.opt_state + self.inputs

    def to_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "opt_state": self.opt_state,
                "activations": self.activations, "model_state": self.model_state,
                "inputs": self.inputs, "total": self.total}


MEMORY_FIELDS = ("params", "grads", "opt_state", "activations", "model_state", "inputs")


@dataclass(frozen=True)
class CommItem:
    """One modelled collective.

    Attributes:
        kind: all-reduce, all-gather, reduce-scatter or all-to-all.
        axes: mesh axes of the group.
        size: ``S`` of :func:`tpflax.hlo.ring_bytes` (per device, one execution).
        group_size: devices per group.
        count: executions per step (forward + backward, stacked layers, remat).
        source: the leaf path or pair it comes from.
        why: the rule that produced it.
    """

    kind: str
    axes: tuple[str, ...]
    size: float
    group_size: int
    count: int
    source: str
    why: str

    @property
    def ring_bytes(self) -> float:
        """Bytes one device sends per execution."""
        return ring_bytes(self.kind, self.size, self.group_size)

    @property
    def total(self) -> float:
        return self.ring_bytes * self.count

    @property
    def axis_label(self) -> str:
        return "+".join(self.axes) if self.axes else "?"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axes": list(self.axes), "size": self.size,
                "group_size": self.group_size, "count": self.count, "ring_bytes": self.ring_bytes,
                "total": self.total, "source": self.source, "why": self.why}


@dataclass(frozen=True)
class Act:
    """Shapes at one layer call (global batch), from :func:`trace_activations`."""

    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    dtype: str
    itemsize: int


@dataclass(frozen=True)
class Estimate:
    """Memory per device and communication per training step.

    Attributes:
        per_device: :class:`Memory` on the fullest device.
        unsharded: the same for one device holding everything.
        savings: percent saved per device, per field and ``"total"``.
        comm: ``{kind: {axis label: bytes per step}}`` (ring bytes one device sends).
        items: every modelled collective.
        mesh: the plan's mesh shape.
        batch: ``{"size", "shards", "axes"}`` of the global batch.
        notes: assumptions and anything that could not be modelled.
        settings: optimizer, backend, remat, dtypes used.
    """

    per_device: Memory
    unsharded: Memory
    savings: Mapping[str, float]
    comm: Mapping[str, Mapping[str, float]]
    items: tuple[CommItem, ...]
    mesh: MeshShape
    batch: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def comm_total(self) -> float:
        """Bytes one device sends per step, all collectives."""
        return sum(v for by_axis in self.comm.values() for v in by_axis.values())

    def comm_by_kind(self) -> dict[str, float]:
        return {k: sum(v.values()) for k, v in self.comm.items()}

    def comm_by_axis(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for by_axis in self.comm.values():
            for a, v in by_axis.items():
                out[a] = out.get(a, 0.0) + v
        return out

    def to_dict(self) -> dict:
        return {"per_device": self.per_device.to_dict(), "unsharded": self.unsharded.to_dict(),
                "savings_percent": {k: round(v, 3) for k, v in self.savings.items()},
                "comm_bytes_per_step": {k: dict(v) for k, v in self.comm.items()},
                "comm_total": self.comm_total, "items": [i.to_dict() for i in self.items],
                "batch": dict(self.batch), "notes": list(self.notes), "settings": dict(self.settings)}

    def report_lines(self) -> list[str]:
        from tpflax._src.specs import fmt_bytes as fmt

        s = self.settings
        out = [f"estimate per training step  (optimizer {s.get('optimizer')}, batch "
               f"{self.batch.get('size')} over {self.batch.get('shards')} shard(s), backend "
               f"{s.get('backend')}, remat {'on' if s.get('remat') else 'off'})",
               f"  {'':<14}{'per device':>14}{'unsharded':>14}{'savings':>10}"]
        for name in MEMORY_FIELDS + ("total",):
            a = getattr(self.per_device, name)
            b = getattr(self.unsharded, name)
            if name in ("model_state", "inputs") and not b:
                continue
            out.append(f"  {name:<14}{fmt(a):>14}{fmt(b):>14}{self.savings.get(name, 0.0):>9.1f}%")
        out.append("  communication per step (bytes each device sends, ring algorithm):")
        if not self.items:
            out.append("    none: every leaf and the batch are whole on every device")
        for kind, by_axis in self.comm.items():
            for axis, v in by_axis.items():
                out.append(f"    {kind:<19}{axis:<16}{fmt(v):>12}")
        if self.items:
            out.append(f"    {'total':<35}{fmt(self.comm_total):>12}")
        for n in self.notes:
            out.append(f"  note: {n}")
        return out


# ---------------------------------------------------------------------------
# helpers shared with the dry run

def abstract_tree(plan) -> Any:
    """The planned tree as ``jax.ShapeDtypeStruct`` leaves, shaped like ``plan.specs``."""
    import jax
    from jax.sharding import PartitionSpec

    leaves, treedef = jax.tree_util.tree_flatten(plan.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if len(leaves) != len(plan.decisions):
        raise PlanMismatchError(f"plan.specs has {len(leaves)} leaves but plan.decisions has "
                                f"{len(plan.decisions)}; re-plan")
    sds = [jax.ShapeDtypeStruct(d.shape, _np_dtype(d.dtype)) for d in plan.decisions.values()]
    return jax.tree_util.tree_unflatten(treedef, sds)


def _np_dtype(name: str):
    import jax.numpy as jnp

    try:
        return jnp.dtype(name)
    except TypeError:
        return jnp.dtype("uint32")  # PRNG keys and other opaque leaves: shape-only stand-in


def trainable_paths(plan) -> list[str]:
    """Paths of trainable leaves: the ``params`` collection if there is one, else float leaves."""
    paths = list(plan.decisions)
    if any(p.startswith("params/") for p in paths):
        return [p for p in paths if p.startswith("params/")]
    return [p for p, d in plan.decisions.items() if d.kind not in ("state", "int")
            and _np_dtype(d.dtype).kind in "fc"]


def split_params(plan, tree: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
    """``(params subtree, merge(tree, new_params))`` for a tree shaped like the plan."""
    if isinstance(tree, Mapping) and "params" in tree:
        return tree["params"], lambda t, p: {**t, "params": p}
    return tree, lambda t, p: p


def opt_state_specs(plan, optimizer, params: Any = None) -> tuple[Any, Any]:
    """The optimizer state's shapes and a PartitionSpec for each of its leaves.

    The specs are :func:`tpflax.apply.state_specs`'s: state leaves shaped like
    their parameter take its spec; factored moments (adafactor's row/column
    statistics) keep the entries of the dims they kept; step counts and other
    scalars are replicated.

    Args:
        plan: the plan.
        optimizer: an ``optax.GradientTransformation``.
        params: the parameter tree (abstract is fine); defaults to the plan's.

    Returns:
        ``(abstract state, spec tree)``.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"params": {"w": jax.ShapeDtypeStruct((8, 8), "float32")}}, {"model": 2},
    ...                 rules=[("w", "column")])
    >>> state, specs = opt_state_specs(p, optax.adam(1e-3))
    >>> tuple(specs[0].mu["w"])
    (None, 'model')
    """
    import jax

    from tpflax._src.apply.place import state_specs

    if params is None:
        params, _ = split_params(plan, abstract_tree(plan))
    try:
        state = jax.eval_shape(optimizer.init, params)
    except Exception as e:  # noqa: BLE001 - any optax failure is the user's optimizer/params mismatch
        raise EstimateError(f"optimizer.init failed on the planned parameters: {type(e).__name__}: {e}; "
                            "pass an optax.GradientTransformation built for this parameter tree") from e
    # One derivation for the converter and the estimate: what is counted is what is placed.
    return state, state_specs(state, plan, optimizer=optimizer, params=params)


# ---------------------------------------------------------------------------
# batch

@dataclass(frozen=True)
class Batch:
    """A training batch's leaves, as shapes and dtypes."""

    leaves: tuple[tuple[str, tuple[int, ...], str], ...]
    act_dtype: str

    @property
    def size(self) -> int:
        return self.leaves[0][1][0] if self.leaves and self.leaves[0][1] else 1

    def nbytes(self) -> int:
        return sum(math.prod(s) * _itemsize(d) for _, s, d in self.leaves)


def _itemsize(dtype: str) -> int:
    return int(_np_dtype(dtype).itemsize)


def parse_batch(batch: Any, config: Any = None, act_dtype: str | None = None) -> Batch:
    """Normalise a batch description.

    Accepts a pytree of arrays / ``ShapeDtypeStruct`` (e.g.
    ``jax.eval_shape(lambda: model.make_batch(0, 32))``), a mapping of name to
    shape with an optional ``"dtype"`` entry (``{"x": (32, 1024), "dtype":
    "bfloat16"}``), a bare shape ``(32, 1024)``, or a ``"32x1024"`` string. Token
    models (a config with ``vocab``) get int32 inputs and shifted int32 labels.

    >>> parse_batch("8x16", {"vocab": 100}).leaves
    (('x', (8, 16), 'int32'), ('y', (8, 16), 'int32'))
    """
    import jax

    vocab = _cfg(config, "vocab")
    dtype = act_dtype or _dtype_name(_cfg(config, "dtype")) or "float32"
    if batch is None:
        raise EstimateError("estimate needs a batch: e.g. batch={'x': (32, 1024)} or "
                            "jax.eval_shape(lambda: model.make_batch(0, 32))")
    if isinstance(batch, str):
        try:
            batch = tuple(int(x) for x in batch.lower().replace("*", "x").split("x"))
        except ValueError:
            raise EstimateError(f"batch {batch!r} is not NxM...; write e.g. '32x1024'") from None
    if isinstance(batch, int) and not isinstance(batch, bool):
        seq = _cfg(config, "seq_len")
        if batch < 1:
            raise EstimateError(f"batch size {batch} must be >= 1")
        if seq is None:
            raise EstimateError(f"a bare batch size ({batch}) needs the model (for its sequence length); "
                                f"pass model=, or a shape such as ({batch}, 1024)")
        batch = (batch, int(seq))
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(x, int) for x in batch):
        batch = {"x": tuple(batch)}
    if isinstance(batch, Mapping) and all(isinstance(v, (tuple, list, str)) for v in batch.values()):
        spec = dict(batch)
        dtype = act_dtype or str(spec.pop("dtype", dtype))
        leaves = []
        for name, shape in spec.items():
            if not (isinstance(shape, (tuple, list)) and all(isinstance(s, int) and s > 0 for s in shape)):
                raise EstimateError(f"batch[{name!r}] = {shape!r} is not a shape of positive ints")
            shape = tuple(shape)
            leaf_dtype = "int32" if (vocab and len(shape) == 2) or name == "y" else dtype
            leaves.append((name, shape, leaf_dtype))
        if "y" not in spec and leaves:
            x_shape = leaves[0][1]
            y = x_shape if vocab and len(x_shape) == 2 else x_shape[:1]
            leaves.append(("y", y, "int32"))
        return Batch(tuple(leaves), dtype)
    flat, _ = jax.tree_util.tree_flatten_with_path(batch)
    leaves = []
    for path, leaf in flat:
        shape = tuple(getattr(leaf, "shape", ()))
        leaves.append((jax.tree_util.keystr(path, simple=True, separator="/") or "x", shape,
                       str(getattr(leaf, "dtype", "float32"))))
    if not leaves:
        raise EstimateError("the batch has no array leaves")
    floats = [d for _, _, d in leaves if _np_dtype(d).kind == "f"]
    return Batch(tuple(leaves), act_dtype or (floats[0] if floats else dtype))


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    import jax.numpy as jnp

    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


# ---------------------------------------------------------------------------
# activations

def trace_activations(model: Any, batch: Any = None, variables: Any = None) -> dict[str, list[Act]]:
    """Input and output shapes of every layer call, for a global batch.

    Uses ``jax.eval_shape`` with ``flax.linen.intercept_methods``, so nothing is
    allocated or compiled. Compute it once per (model, batch) and pass it as
    ``activations=`` to every :func:`estimate` call.

    Args:
        model: a :class:`tpflax.zoo.ZooModel` (linen), or a linen ``nn.Module``.
        batch: a batch size (int) for a ZooModel, or a tuple of input
            ``ShapeDtypeStruct`` for a plain module.
        variables: variables (abstract is fine); defaults to the model's.

    Returns:
        ``{layer path: [Act, ...]}`` (one Act per call; ``attend`` calls are
        keyed ``path:attend``). Empty for NNX models.

    >>> from tpflax import zoo
    >>> acts = trace_activations(zoo.get("mlp"), 4)
    >>> acts["block_0/mlp/up"][0].output
    (4, 256)
    """
    import flax.linen as nn
    import jax

    module = getattr(model, "module", model)
    if getattr(model, "framework", "linen") != "linen" or not isinstance(module, nn.Module):
        return {}
    if hasattr(model, "sample_inputs"):
        inputs = model.sample_inputs(batch if isinstance(batch, int) else 2)
        kwargs = dict(getattr(model, "apply_kwargs", {}))
        if variables is None:
            variables = model.abstract_variables()
    else:
        inputs, kwargs = tuple(batch), {}
        if variables is None:
            variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    out: dict[str, list[Act]] = {}

    def interceptor(next_fun, args, kw, context):
        result = next_fun(*args, **kw)
        mod = context.module
        if mod.path and context.method_name in ("__call__", "attend"):
            path = "/".join(str(p) for p in mod.path)
            if context.method_name != "__call__":
                path += ":" + context.method_name
            arrays = [a for a in args if hasattr(a, "shape") and hasattr(a, "dtype")]
            res = result[0] if isinstance(result, tuple) and result and hasattr(result[0], "shape") else result
            if hasattr(res, "shape") and arrays:
                out.setdefault(path, []).append(Act(
                    tuple(tuple(a.shape) for a in arrays), tuple(res.shape), str(res.dtype),
                    int(res.dtype.itemsize)))
        return result

    def run(v, *xs):
        with nn.intercept_methods(interceptor):
            return module.apply(v, *xs, **kwargs)

    jax.eval_shape(run, variables, *inputs)
    return out


# ---------------------------------------------------------------------------
# the estimate

def estimate(plan, optimizer: Any = None, batch: Any = None, *, config: Any = None,
             activations: Mapping[str, Sequence[Act]] | None = None, model: Any = None,
             remat: bool = False, grad_dtype: Any = None, act_dtype: Any = None,
             backend: str = "tpu", expert_dispatch: str = "all-to-all",
             optimizer_name: str | None = None) -> Estimate:
    """Bytes per device and communication per training step for a plan.

    Args:
        plan: a :class:`tpflax.Plan`.
        optimizer: an ``optax.GradientTransformation``; its state shapes come from
            ``jax.eval_shape(optimizer.init, params)``. ``None``: no optimizer state.
        batch: the global batch (see :func:`parse_batch`).
        config: model config or a dict of hints (``vocab``, ``seq_len``,
            ``d_model``, ``n_heads``, ``n_layers``, ``d_ff``, ``dtype``).
        activations: from :func:`trace_activations` (exact layer shapes).
        model: a ZooModel: supplies ``config`` and, if ``activations`` is None,
            traces them (abstractly).
        remat: activations are rematerialised: only layer inputs are saved. It
            does not add collectives (XLA's recompute reuses them; see
            ``benchmarks/results/estimate_accuracy.md``, llama-scan). Read from the
            config's ``remat`` field when the model has one.
        grad_dtype: gradient dtype (default: the parameter's).
        act_dtype: activation dtype (default: the batch's float dtype / config dtype).
        backend: ``"tpu"``/``"gpu"`` (fsdp gradients reduce-scatter) or ``"cpu"``
            (XLA:CPU all-reduces them and slices).
        expert_dispatch: ``"all-to-all"`` (routed tokens move to their experts) or
            ``"dense"`` (every expert sees every token; expert-split like a pair).
        optimizer_name: how to name the optimizer in reports (default: from optax).

    Returns:
        An :class:`Estimate`.

    >>> import jax, optax, tpflax
    >>> tree = {"params": {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...                            "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}}}
    >>> p = tpflax.plan(tree, {"data": 2, "model": 4})
    >>> e = estimate(p, optax.sgd(0.1), {"x": (8, 64)})
    >>> e.per_device.params, e.unsharded.params
    (32768, 131072)
    >>> sorted(e.comm["all-reduce"])
    ['data', 'model']
    """
    from tpflax._src.facts.classify import classify
    from tpflax._src.planner.plan import Plan
    from tpflax._src.facts.tree import Leaf

    if not isinstance(plan, Plan):
        raise EstimateError(f"expected a tpflax.Plan, got {type(plan).__name__}; make one with "
                            "tpflax.plan(tree, mesh) or tpflax.Plan.from_json(text)")
    for name, value in (("act_dtype", act_dtype), ("grad_dtype", grad_dtype)):
        if value is not None and _dtype_name(value) is None:
            raise EstimateError(f"{name}={value!r} is not a dtype jax knows; use e.g. 'bfloat16' or 'float32'")
    if backend not in BACKENDS:
        raise EstimateError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if expert_dispatch not in ("all-to-all", "dense"):
        raise EstimateError(f"expert_dispatch {expert_dispatch!r} must be 'all-to-all' or 'dense'")
    if model is not None and config is None:
        config = getattr(model, "config", None)
    remat = bool(remat or _cfg(config, "remat", False))  # e.g. nn.remat'd scanned layers
    mesh: MeshShape = plan.mesh
    b = parse_batch(batch, config, _dtype_name(act_dtype))
    if activations is None and model is not None:
        activations = trace_activations(model, b.size)
    activations = activations or {}
    act_item = _itemsize(b.act_dtype)
    notes: list[str] = []

    batch_axes = tuple(a for a in mesh.names if dict(mesh.roles)[a] in (DATA, FSDP) and mesh.sizes[a] > 1)
    shards = math.prod(mesh.sizes[a] for a in batch_axes)
    if b.size % shards:
        raise EstimateError(
            f"the global batch {b.size} does not divide over the batch axes "
            f"{', '.join(f'{a}={mesh.sizes[a]}' for a in batch_axes)} (product {shards}); use a batch "
            f"that is a multiple of {shards}")
    local = _Local(b.size, shards)

    # -- memory -------------------------------------------------------------
    train = set(trainable_paths(plan))
    params = sum(d.bytes_per_device for p, d in plan.decisions.items() if p in train)
    params_full = sum(d.bytes for p, d in plan.decisions.items() if p in train)
    state = sum(d.bytes_per_device for p, d in plan.decisions.items() if p not in train)
    state_full = sum(d.bytes for p, d in plan.decisions.items() if p not in train)
    g_item = _itemsize(_dtype_name(grad_dtype)) if grad_dtype is not None else None

    def grad_bytes(d, per_device=True):
        n = d.bytes_per_device if per_device else d.bytes
        return n if g_item is None else n // _itemsize(d.dtype) * g_item

    grads = sum(grad_bytes(d) for p, d in plan.decisions.items() if p in train)
    grads_full = sum(grad_bytes(d, False) for p, d in plan.decisions.items() if p in train)
    opt, opt_full, opt_name = 0, 0, "none"
    if optimizer is not None:
        opt, opt_full = _opt_bytes(plan, optimizer)
        opt_name = optimizer_name or _opt_name(optimizer)
    inputs = sum(math.prod(s) * _itemsize(d) for _, s, d in b.leaves)
    inputs_dev = sum(math.prod(s) // (shards if s and s[0] % shards == 0 else 1) * _itemsize(d)
                     for _, s, d in b.leaves)

    leaves = [Leaf(p, tuple(d.shape), d.dtype, _itemsize(d.dtype),
                   collection=p.split("/", 1)[0] if p.startswith(("params/", "batch_stats/")) else "")
              for p, d in plan.decisions.items()]
    facts = {f.path: f for f in classify(leaves, plan.options.get("stacked") if plan.options else None)}

    acts_dev, acts_full = _activation_bytes(plan, facts, activations, b, config, mesh, shards, remat,
                                            act_item, notes)

    per_device = Memory(params, grads, opt, acts_dev, state, inputs_dev)
    unsharded = Memory(params_full, grads_full, opt_full, acts_full, state_full, inputs)
    savings = {name: (100.0 * (1 - getattr(per_device, name) / getattr(unsharded, name))
                      if getattr(unsharded, name) else 0.0) for name in MEMORY_FIELDS + ("total",)}

    # -- communication --------------------------------------------------------
    items = _comm_items(plan, facts, train, activations, b, config, mesh, batch_axes, local, remat,
                        act_item, g_item, backend, expert_dispatch, notes)
    comm: dict[str, dict[str, float]] = {}
    for it in items:
        if it.total <= 0:
            continue
        comm.setdefault(it.kind, {})
        comm[it.kind][it.axis_label] = comm[it.kind].get(it.axis_label, 0.0) + it.total
    return Estimate(
        per_device=per_device, unsharded=unsharded, savings=savings, comm=comm,
        items=tuple(i for i in items if i.total > 0), mesh=mesh,
        batch={"size": b.size, "shards": shards, "axes": list(batch_axes),
               "leaves": [[n, list(s), d] for n, s, d in b.leaves]},
        notes=tuple(dict.fromkeys(notes)),
        settings={"optimizer": opt_name, "backend": backend, "remat": remat, "act_dtype": b.act_dtype,
                  "grad_dtype": _dtype_name(grad_dtype) or "param", "expert_dispatch": expert_dispatch,
                  "activations": "traced" if activations else "formula"})


def _opt_name(optimizer: Any) -> str:
    name = getattr(optimizer, "__name__", None)
    if name:
        return name
    init = getattr(optimizer, "init", None)
    qual = getattr(init, "__qualname__", "") or ""
    return qual.split(".")[0].replace("_init", "") or type(optimizer).__name__


def _opt_bytes(plan, optimizer) -> tuple[int, int]:
    import jax
    from jax.sharding import PartitionSpec

    state, specs = opt_state_specs(plan, optimizer)
    s_leaves = jax.tree_util.tree_leaves(state)
    p_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if len(s_leaves) != len(p_leaves):  # pragma: no cover - opt_state_specs keeps them aligned
        p_leaves = [PartitionSpec()] * len(s_leaves)
    dev = full = 0
    for leaf, spec in zip(s_leaves, p_leaves, strict=True):
        shape = tuple(leaf.shape)
        item = int(leaf.dtype.itemsize)
        full += math.prod(shape) * item
        dev += bytes_per_device(shape, item, entries(spec, len(shape)), plan.mesh)
    return dev, full


def _axes_of(spec: Sequence[Any], mesh: MeshShape, role: str) -> tuple[str, ...]:
    roles = dict(mesh.roles)
    used = used_axes(spec)
    return tuple(a for a in mesh.names if a in used and roles[a] == role and mesh.sizes[a] > 1)


def _size(axes: Sequence[str], mesh: MeshShape) -> int:
    return math.prod(mesh.sizes[a] for a in axes)


def _stack(f) -> int:
    return math.prod(f.leaf.shape[:f.stacked]) if f is not None and f.stacked else 1


def _act_for(activations, unit: str) -> list[Act]:
    # plan paths carry the collection ("params/"); traced paths do not
    key = unit.split("/", 1)[1] if unit.startswith(("params/", "batch_stats/")) else unit
    return list(activations.get(key, ()))


class _Local:
    """Per-device share of a traced activation: batch-major shapes are split over the batch axes."""

    def __init__(self, batch_size: int, shards: int):
        self.batch_size, self.shards = batch_size, shards

    def of(self, shape: Sequence[int]) -> float:
        return 1 / self.shards if shape and shape[0] == self.batch_size else 1.0


def _nbytes(shape: Sequence[int], item: int, local: _Local) -> float:
    return math.prod(shape) * item * local.of(shape)


def _rows(b: Batch, config: Any) -> int:
    """Activation rows through the residual stream for the global batch."""
    x = b.leaves[0][1]
    if len(x) >= 2 and _np_dtype(b.leaves[0][2]).kind in "iu":
        return math.prod(x)  # tokens
    image, patch = _cfg(config, "image_size"), _cfg(config, "patch_size")
    if image and patch:
        return b.size * ((image // patch) ** 2 + (1 if _cfg(config, "cls_token", True) else 0))
    if len(x) == 3:
        return x[0] * x[1]  # (batch, seq, features)
    return b.size


def _comm_items(plan, facts, train, activations, b: Batch, config, mesh: MeshShape, batch_axes,
                local: _Local, remat: bool, act_item: int, g_item, backend: str, expert_dispatch: str,
                notes: list[str]) -> list[CommItem]:
    items: list[CommItem] = []
    # Rematerialisation does not re-issue collectives in what XLA compiles: the
    # recomputed forward reuses the gathered weights / reduced activations (measured on
    # the zoo's nn.remat-inside-nn.scan Llama: same collective bytes as without remat).
    fwd = 1
    decisions = plan.decisions
    rows_local = _rows(b, config) / local.shards

    # -- gradients: fsdp reduce-scatter and data-parallel all-reduce ------------
    # A scanned recurrence's weights get a partial gradient at every time step; XLA
    # reduces it inside the backward loop, once per step of the sequence.
    recurrent_units = {f.unit for f in facts.values() if f.kind == "recurrent"}
    x_shape = b.leaves[0][1]
    steps = int(_cfg(config, "seq_len", 0) or (x_shape[1] if len(x_shape) >= 2 else 1))
    for path, d in decisions.items():
        if path not in train:
            continue
        f = facts.get(path)
        reps = steps if f is not None and f.unit in recurrent_units else 1
        why_rep = f" at each of {steps} time steps (inside the scanned recurrence)" if reps > 1 else ""
        spec = entries(d.spec, len(d.shape))
        f_axes = _axes_of(spec, mesh, FSDP)
        free = tuple(a for a in batch_axes if a not in used_axes(spec))
        gbytes = d.bytes_per_device if g_item is None else d.bytes_per_device // _itemsize(d.dtype) * g_item
        nf = _size(f_axes, mesh)
        if f_axes:
            items.append(CommItem("all-gather", f_axes, d.bytes_per_device * nf, nf, fwd, path,
                                  "fsdp: gather the parameter for compute (the backward reuses it)"))
            if backend == "cpu":
                group = tuple(a for a in mesh.names if a in f_axes or a in free)
                items.append(CommItem("all-reduce", group, gbytes * nf, _size(group, mesh), reps, path,
                                      "fsdp gradient: XLA:CPU all-reduces the whole gradient, then slices"
                                      + why_rep))
                continue
            items.append(CommItem("reduce-scatter", f_axes, gbytes * nf, nf, reps, path,
                                  "fsdp gradient: reduce-scatter to the owning shard" + why_rep))
        if free:
            items.append(CommItem("all-reduce", free, gbytes, _size(free, mesh), reps, path,
                                  "data parallel: sum the gradient over the batch axes" + why_rep))

    # -- tensor parallelism -----------------------------------------------------
    def t_axes(path: str) -> tuple[str, ...]:
        d = decisions[path]
        return _axes_of(entries(d.spec, len(d.shape)), mesh, TENSOR)

    def unit_of(path):
        f = facts.get(path)
        return f.unit if f is not None else path.rsplit("/", 1)[0]

    in_pair: set[str] = set()
    for pair in plan.pairs:
        members = list(pair.columns) + list(pair.rows)
        in_pair.update(members)
        axes = tuple(dict.fromkeys(a for p in members if p in decisions for a in t_axes(p)))
        if not pair.sharded or not axes:
            continue
        n = _size(axes, mesh)
        stack = max((_stack(facts.get(p)) for p in members), default=1)
        kind_axis = axes
        # forward: each row layer's partial output is summed
        for r in pair.rows:
            if not t_axes(r):
                continue
            size = _pair_act(activations, unit_of(r), decisions[r], "out", rows_local, act_item, local,
                             facts.get(r))
            items.append(CommItem("all-reduce", kind_axis, size, n, fwd * stack, f"pair {pair.id}",
                                  f"row {r}: sum partial outputs (forward)"))
        # backward: each column layer's partial input gradient is summed; XLA reduces
        # them one by one (q, k and v are three all-reduces), not after adding them
        for c in pair.columns:
            if not t_axes(c):
                # a replicated column in a split pair (GQA key/value with fewer heads than
                # the tensor degree): its output gradient arrives split by the row side's
                # heads and is gathered back (backward)
                size = _pair_act(activations, unit_of(c), decisions[c], "out", rows_local, act_item, local,
                                 facts.get(c))
                items.append(CommItem("all-gather", kind_axis, size, n, stack, f"pair {pair.id}",
                                      f"replicated column {c} in a split pair: gather its output "
                                      "gradient (backward)"))
                continue
            size = _pair_act(activations, unit_of(c), decisions[c], "in", rows_local, act_item, local,
                             facts.get(c))
            items.append(CommItem("all-reduce", kind_axis, size, n, stack, f"pair {pair.id}",
                                  f"column {c}: sum partial input gradients (backward)"))

    # attention split finer than its heads: the score contraction crosses devices and
    # XLA reshards attention in ways this model does not predict; say so
    n_heads = _cfg(config, "n_heads")
    if n_heads:
        for pair in plan.pairs:
            if pair.kind == "attention" and pair.sharded:
                degree = max((_size(t_axes(c), mesh) for c in pair.columns if c in decisions), default=1)
                if degree > 1 and n_heads % degree:
                    notes.append(f"attention pair {pair.id}: {n_heads} heads do not divide the tensor degree "
                                 f"{degree}, so head_dim is split and XLA adds resharding collectives that "
                                 "are not modelled; use a tensor degree that divides the heads")

    # embeddings, output heads and unpaired tensor-split layers
    has_head = any(f.kind == "dense" and _is_head(f) for f in facts.values())
    any_attend = any(k.endswith(":attend") for k in activations)
    for path, d in decisions.items():
        if path in in_pair or path not in train:
            continue
        f = facts.get(path)
        axes = t_axes(path)
        if not axes or f is None or path.rsplit("/", 1)[-1] == "bias":
            continue
        n = _size(axes, mesh)
        spec = entries(d.spec, len(d.shape))
        unit = f.unit
        acts = _act_for(activations, unit)
        body = d.shape[f.stacked:]
        if f.kind == "embedding":
            split_vocab = spec[f.stacked] is not None
            out = acts[0].output if acts else None
            size = _nbytes(out, act_item, local) if out else rows_local * body[-1] * act_item
            if split_vocab:
                items.append(CommItem("all-reduce", axes, size, n, fwd, path,
                                      "vocab-split embedding: sum the looked-up rows (forward)"))
            else:
                items.append(CommItem("all-gather", axes, size, n, fwd, path,
                                      "embedding split on its features: gather them (forward)"))
            attend = _act_for(activations, unit + ":attend")
            tied_guess = (not has_head and not any_attend and _cfg(config, "vocab") == body[0])
            if split_vocab and (attend or tied_guess):
                a = attend[0] if attend else None
                in_size = _nbytes(a.inputs[0], act_item, local) if a else rows_local * body[-1] * act_item
                items += _head_items(axes, n, in_size, (a.output if a else None), rows_local, local, path,
                                     "tied output embedding")
                free = tuple(x for x in batch_axes if x not in used_axes(spec))
                if free:  # the lookup's and the output's gradients are reduced separately
                    items.append(CommItem("all-reduce", free, d.bytes_per_device, _size(free, mesh), 1, path,
                                          "tied embedding: its second gradient (output use) is summed "
                                          "separately over the batch axes"))
                if not attend:
                    notes.append(f"{path}: assumed tied to the output (no head layer found)")
            continue
        if f.kind == "dense" and spec[-1] is not None:  # column without a row partner
            a = acts[0] if acts else None
            in_size = _nbytes(a.inputs[0], act_item, local) if a else rows_local * body[0] * act_item
            if _is_head(f):
                items += _head_items(axes, n, in_size, (a.output if a else None), rows_local, local, path,
                                     "vocab-split output head")
            else:
                items.append(CommItem("all-gather", axes, (_nbytes(a.output, act_item, local) if a
                                                           else rows_local * body[-1] * act_item), n,
                                      fwd * _stack(f), path, "column layer without a row partner: "
                                      "gather its split output (forward)"))
                items.append(CommItem("all-reduce", axes, in_size, n, _stack(f), path,
                                      "column layer without a row partner: sum input gradients (backward)"))
            continue
        if f.kind in ("dense", "conv") and any(e is not None for e in spec[f.stacked:]):
            notes.append(f"{path}: {d.strategy} split without a partner is not modelled")

    # expert parallelism
    e_axes = tuple(a for a in mesh.names if dict(mesh.roles)[a] == EXPERT and mesh.sizes[a] > 1)
    if e_axes:
        expert_units = {}
        for path, d in decisions.items():
            f = facts.get(path)
            if f is not None and f.kind == "expert" and _axes_of(entries(d.spec, len(d.shape)), mesh, EXPERT):
                expert_units.setdefault(f.group, []).append(path)
        n = _size(e_axes, mesh)
        top_k = _cfg(config, "top_k", 1) or 1
        for group, paths in expert_units.items():
            d_model = decisions[paths[0]].shape[facts[paths[0]].stacked + 1]
            stack = _stack(facts[paths[0]])
            if expert_dispatch == "all-to-all":
                size = rows_local * top_k * d_model * act_item
                items.append(CommItem("all-to-all", e_axes, size, n, 2 * fwd * stack, group,
                                      "expert parallel: dispatch and return routed tokens (forward)"))
                items.append(CommItem("all-to-all", e_axes, size, n, 2 * stack, group,
                                      "expert parallel: the same, for gradients (backward)"))
            else:
                size = rows_local * d_model * act_item
                items.append(CommItem("all-reduce", e_axes, size, n, (fwd + 1) * stack, group,
                                      "dense expert dispatch: sum expert outputs (forward) and input "
                                      "gradients (backward)"))
    return items


def _is_head(f) -> bool:
    from tpflax._src.facts.classify import HEAD

    return f.kind == "head" or bool(HEAD.match(f.unit_name))


def _head_items(axes, n, in_size, out_shape, rows_local, local, path, what) -> list[CommItem]:
    rows = (math.prod(out_shape[:-1]) * local.of(out_shape)) if out_shape else rows_local
    # softmax cross-entropy over a split vocabulary: max, sum of exp and the label's
    # logit are reduced across the split (float32 per row), then the input gradient
    return [CommItem("all-reduce", axes, rows * 4, n, 3, path,
                     f"{what}: max, sum and label logit of the split softmax (forward)"),
            CommItem("all-reduce", axes, in_size, n, 1, path,
                     f"{what}: sum input gradients (backward)")]


def _pair_act(activations, unit: str, d, side: str, rows_local: float, act_item: int, local: _Local,
              f) -> float:
    acts = _act_for(activations, unit)
    if acts:
        a = acts[0]
        shape = a.output if side == "out" else a.inputs[0]
        return _nbytes(shape, act_item, local)
    body = d.shape[f.stacked:] if f is not None else d.shape
    if f is not None and f.kind in ("attention",) and len(body) == 3:
        width = body[0] if side == "in" else body[-1]
    elif f is not None and f.kind == "expert" and len(body) == 3:
        width = body[1] if side == "in" else body[-1]
    else:
        width = body[0] if side == "in" else body[-1]
    return rows_local * width * act_item


def _activation_bytes(plan, facts, activations, b: Batch, config, mesh: MeshShape, shards: int,
                      remat: bool, act_item: int, notes: list[str]) -> tuple[int, int]:
    """Saved activations on the fullest device and unsharded (an estimate)."""
    t = math.prod(mesh.sizes[a] for a in mesh.axes_with(TENSOR)) if mesh.axes_with(TENSOR) else 1
    if activations:
        col_units = {}
        for p, d in plan.decisions.items():
            f = facts.get(p)
            if f is None:
                continue
            key = f.unit.split("/", 1)[1] if f.unit.startswith(("params/", "batch_stats/")) else f.unit
            spec = entries(d.spec, len(d.shape))
            if spec and spec[-1] is not None and any(
                    dict(mesh.roles)[a] in (TENSOR, EXPERT) for a in entry_axes(spec[-1])):
                col_units[key] = math.prod(mesh.sizes[a] for a in entry_axes(spec[-1]))
        full = dev = 0.0
        for path, calls in activations.items():
            if remat and "/" in path:
                continue  # only top-level (block) outputs are kept under remat
            for a in calls:
                nbytes = math.prod(a.output) * act_item
                full += nbytes
                dev += nbytes / shards / col_units.get(path.split(":")[0], 1)
        return int(dev), int(full)
    d_model, n_layers = _cfg(config, "d_model"), _cfg(config, "n_layers")
    seq = _cfg(config, "seq_len")
    if not (d_model and n_layers and seq):
        notes.append("activations not estimated: pass model= / activations=trace_activations(...) or a "
                     "config with d_model, n_layers and seq_len")
        return 0, 0
    heads = _cfg(config, "n_heads", 1) or 1
    tokens = _rows(b, config)
    scale = act_item / 2  # the per-layer formula below counts 16-bit activations

    def per_layer(tp: int, sh: int) -> float:
        # Korthikanti et al. 2022: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes per layer (16-bit).
        return tokens / sh * d_model * (10 + 24 / tp + 5 * heads * seq / (d_model * tp)) * scale

    if remat:
        return int(tokens / shards * d_model * act_item * n_layers), int(tokens * d_model * act_item * n_layers)
    notes.append("activations from the transformer formula (Korthikanti et al.); trace the model for "
                 "exact layer shapes")
    return int(per_layer(t, shards) * n_layers), int(per_layer(1, 1) * n_layers)
