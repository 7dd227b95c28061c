"""Any model as one thing: a pure forward function, example inputs and variables.

Every stage that runs a model (the trace, activation sizes, the train step, the
dry run, the mesh suggestion, the CLI) takes what the user has and calls
:func:`as_model` once. Accepted:

* a ``tpflax.zoo`` model (sample and variables default to its own);
* a linen ``nn.Module`` with ``sample=`` (variables default to
  ``jax.eval_shape(module.init, key, *sample)``);
* an ``nnx.Module`` with ``sample=`` (its own state is the variable tree);
* a plain callable ``fn(variables, *sample)``, the way Hugging Face Flax models
  are called (``lambda v, ids: hf_model(ids, params=v)``), with ``sample=`` and
  the variable tree (the one being planned).

Nothing here allocates: samples become ``jax.ShapeDtypeStruct``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import jax

from tpflax._src.errors import OptionError, TpflaxError, TraceError
from tpflax._src.mesh import traced_under

Framework = Literal["zoo", "linen", "nnx", "callable"]


@dataclass(frozen=True)
class Model:
    """A model reduced to what tpflax needs.

    Attributes:
        forward: ``forward(variables, *sample) -> output``, pure and traceable.
        sample: example inputs as ``jax.ShapeDtypeStruct`` (batch first).
        variables: the variable tree ``forward`` takes (abstract is fine), or None
            when it has to come from the caller (a plain callable without one).
        framework: ``"zoo"``, ``"linen"``, ``"nnx"`` or ``"callable"``.
        name: for messages.
        module: the linen module (for per-layer activation shapes), else None.
        kwargs: keyword arguments the forward pass passes to ``module.apply``.
        config: the zoo model's config (sequence length, vocab...), else None.
        zoo: the zoo model itself, else None.
        forward_state: ``(variables, *sample) -> (output, variables after the call)`` for a
            model whose call updates its own state (an nnx module, a linen module whose variables
            hold collections beside ``params``), else None.
        graphdef: an nnx module's ``GraphDef`` (for per-layer activation shapes), else None.
    """

    forward: Callable[..., Any]
    sample: tuple[Any, ...]
    variables: Any
    framework: Framework
    name: str
    module: Any = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    config: Any = None
    zoo: Any = None
    forward_state: Callable[..., Any] | None = None
    graphdef: Any = None

    def with_batch(self, batch: int) -> Model:
        """The same model with the batch dim of its batched sample inputs set to ``batch``.

        The batched inputs are the arrays (in any input's pytree) whose leading dim is the
        batch size (:attr:`batch_size`): an input of another leading size (a per-layer
        mask, like HF's ``head_mask``) is no batch and keeps its shape.

        >>> m = as_model(lambda v, x, s: x, ({"ids": jax.ShapeDtypeStruct((8, 4), "int32")},
        ...                                  jax.ShapeDtypeStruct((2, 4), "float32")), {})
        >>> [x.shape for x in jax.tree_util.tree_leaves(m.with_batch(32).sample)]
        [(32, 4), (2, 4)]
        """
        if self.zoo is not None:
            return replace(self, sample=tuple(self.zoo.sample_inputs(batch)))
        now = self.batch_size
        if now is None or now == batch:
            return self
        return replace(self, sample=jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype)
            if getattr(s, "shape", ()) and s.shape[0] == now else s, self.sample))

    def with_variables(self, variables: Any) -> Model:
        return replace(self, variables=variables)

    @property
    def batch_size(self) -> int | None:
        """Leading dim of the first sample array that has one (inputs may be pytrees)."""
        for leaf in jax.tree_util.tree_leaves(self.sample):
            if getattr(leaf, "shape", ()):
                return int(leaf.shape[0])
        return None


def abstract(x: Any) -> Any:
    """``x`` as a ``jax.ShapeDtypeStruct`` when it is array-like (anything else unchanged)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x


def is_zoo(model: Any) -> bool:
    from tpflax.zoo import ZooModel

    return isinstance(model, ZooModel)


def is_nnx(model: Any) -> bool:
    import sys

    if "flax" not in sys.modules:
        return False
    from flax import nnx

    return isinstance(model, nnx.Module)


def is_linen(model: Any) -> bool:
    import sys

    if "flax" not in sys.modules:
        return False
    import flax.linen as nn

    return isinstance(model, nn.Module)


def _samples(sample: Any, what: str) -> tuple[Any, ...]:
    if sample is None:
        raise TraceError(f"{what} needs sample inputs: pass sample=(x,) (shapes suffice: "
                         "jax.ShapeDtypeStruct((batch, ...), dtype))")
    if not isinstance(sample, (tuple, list)):
        sample = (sample,)
    return tuple(jax.tree_util.tree_map(abstract, s) for s in sample)


def as_model(model: Any, sample: Any = None, variables: Any = None) -> Model:
    """Wrap ``model`` (zoo, linen, nnx or a plain ``fn(variables, *sample)``) as a :class:`Model`.

    Args:
        model: the model (see the module docstring), or a :class:`Model` (returned
            as is, with ``sample``/``variables`` replaced when given).
        sample: example forward inputs (arrays or ``jax.ShapeDtypeStruct``); a
            single array is taken as a 1-tuple. Zoo models default to their own.
        variables: the variable tree; defaults as described in the module docstring.

    Raises:
        TraceError: the model type is not one of these, or ``sample`` is missing.

    >>> import jax, jax.numpy as jnp
    >>> m = as_model(lambda v, x: x @ v["w"], (jax.ShapeDtypeStruct((2, 4), jnp.float32),),
    ...              {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)})
    >>> m.framework, jax.eval_shape(m.forward, m.variables, *m.sample).shape
    ('callable', (2, 3))
    """
    if isinstance(model, Model):
        out = model
        if sample is not None:
            out = replace(out, sample=_samples(sample, out.name))
        return out.with_variables(variables) if variables is not None else out
    if is_zoo(model):
        return _zoo(model, sample, variables)
    if is_nnx(model):
        return _nnx(model, sample, variables)
    if is_linen(model):
        return _linen(model, sample, variables)
    if callable(model):
        name = getattr(model, "__name__", type(model).__name__)
        return Model(forward=_output_of(model), sample=_samples(sample, f"the model function {name}"),
                     variables=variables, framework="callable", name=name, forward_state=_state_of(model))
    raise TraceError(_not_a_model(model))


def _not_a_model(model: Any) -> str:
    shown = repr(model)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    hint = ""
    if isinstance(model, str):
        hint = f"; for a built-in model pass tpflax.zoo.get({model!r})"
    return (f"model= must be a flax linen Module or an nnx.Module (with sample=), a tpflax.zoo model, "
            f"or a function fn(variables, *sample) (with sample=), not {shown} "
            f"({type(model).__name__}){hint}; wrap anything else as a function, e.g. a Hugging Face "
            "Flax model as model=lambda v, ids: hf_model(ids, params=v)")


def _zoo(model: Any, sample: Any, variables: Any) -> Model:
    sample = _samples(sample, model.name) if sample is not None else tuple(model.sample_inputs(1))
    if variables is None:
        variables = model.abstract_variables()
    module = model.module if model.framework == "linen" else None
    forward = model.apply if module is None else _with_collections(model.apply)
    return Model(forward=forward, sample=sample, variables=variables, framework="zoo",
                 name=model.name, module=module, kwargs=dict(model.apply_kwargs),
                 config=model.config, zoo=model)


def _nnx(model: Any, sample: Any, variables: Any) -> Model:
    from flax import nnx

    graphdef, state = nnx.split(model)
    if isinstance(variables, nnx.Module):  # the module planned as its own tree: its state
        variables = nnx.state(variables)

    def forward(v, *x):
        return nnx.merge(graphdef, v)(*x)

    def forward_state(v, *x):  # and the state the call left: BatchNorm statistics, RNG counts
        module = nnx.merge(graphdef, v, copy=True)  # new Variables at this trace level: the call mutates them
        return module(*x), nnx.state(module)

    return Model(forward=forward, sample=_samples(sample, type(model).__name__),
                 variables=state if variables is None else variables, framework="nnx",
                 name=type(model).__name__, forward_state=forward_state, graphdef=graphdef)


def _linen(module: Any, sample: Any, variables: Any) -> Model:
    sample = _samples(sample, type(module).__name__)
    if variables is None:  # traced once per module and sample shapes; a fresh tree for each caller
        from tpflax._src.model_cache import cached

        inits = Model(forward=module.init, sample=sample, variables=None, framework="linen",
                      name=type(module).__name__, module=module)
        variables = jax.tree_util.tree_map(lambda x: x, cached("init", inits, lambda: _abstract_init(inits)))
    # the collections beside params (a training-mode BatchNorm's batch_stats) are the call's to update:
    # applied immutable, the call raises; the train step keeps what it leaves, as an nnx module's
    mutable = state_collections(variables)
    kwargs = {"mutable": mutable} if mutable else {}
    return Model(forward=_with_collections(module.apply, mutable), sample=sample, variables=variables,
                 framework="linen", name=type(module).__name__, module=module, kwargs=kwargs,
                 forward_state=_with_state(module.apply, mutable) if mutable else None)


def _abstract_init(inits: Model) -> Any:
    """The variables ``module.init`` makes, abstract; a module that cannot be initialised on the sample is a
    TraceError saying why, as a forward that cannot be traced is."""
    from tpflax._src.trace.dataflow import untraceable

    try:
        return traced_under(None, lambda: jax.eval_shape(
            lambda *x: inits.module.init(jax.random.key(0), *x), *inits.sample))
    except TpflaxError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is a model/sample mismatch
        raise TraceError(untraceable(inits, e)) from e


def state_collections(variables: Any) -> list[str]:
    """The collections of full linen variables other than ``params`` (``batch_stats``, a cache).

    >>> state_collections({"params": {"w": 0}, "batch_stats": {"mean": 0}})
    ['batch_stats']
    >>> state_collections({"dense": {"kernel": 0}})  # a bare params tree
    []
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        return []
    return [k for k in variables if k != "params" and jax.tree_util.tree_leaves(variables[k])]


def _full(v: Any) -> Any:
    """linen variables as ``apply`` wants them: a bare params tree becomes ``{"params": ...}``."""
    return {"params": v} if hasattr(v, "keys") and "params" not in v else v


def _with_collections(apply: Callable[..., Any], mutable: list[str] | None = None) -> Callable[..., Any]:
    """linen ``apply`` that also takes a bare params tree (it wants ``{"params": ...}``), its
    ``mutable`` collections updated and dropped (the output alone)."""

    def forward(v, *x):
        if mutable:
            return apply(_full(v), *x, mutable=mutable)[0]
        return apply(_full(v), *x)

    return forward


def _with_state(apply: Callable[..., Any], mutable: list[str]) -> Callable[..., Any]:
    """``(v, *x) -> (output, v with the mutable collections the call left)``."""

    def forward_state(v, *x):
        out, new = apply(v, *x, mutable=mutable)
        return out, _merged(v, new)

    return forward_state


def _merged(v: Any, new: Any) -> Any:
    """The variables ``v`` with the collections a linen call updated (``new``), in ``v``'s container."""
    merged = {**v, **new}
    return type(v)(merged) if type(v) is not dict else merged


def linen_update(out: Any, variables: Any) -> bool:
    """Whether ``out`` is linen's ``apply(v, x, mutable=[...])`` pair ``(output, {collection: ...})``.

    The second item names only collections ``variables`` holds beside ``params`` (a training-mode
    BatchNorm's ``batch_stats``): the call's new state, not part of the model's output.

    >>> linen_update((1.0, {"batch_stats": {}}), {"params": {}, "batch_stats": {}})
    True
    >>> linen_update((1.0, {"logits": 2.0}), {"params": {}, "batch_stats": {}})
    False
    """
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) and out[1]):
        return False
    return isinstance(variables, Mapping) and all(k != "params" and k in variables for k in out[1])


def _output_of(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with linen's updated collections dropped from its output (the output alone)."""

    def forward(v, *x):
        out = fn(v, *x)
        return out[0] if linen_update(out, v) else out

    forward.tpflax_wraps = fn  # the trace cache keys the user's function, not this wrapper made per call
    return forward


def _state_of(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``(v, *x) -> (output, v with the collections fn updated)``, or ``(output, None)`` when ``fn``
    returns its output alone (the step then keeps the variables it was given)."""

    def forward_state(v, *x):
        out = fn(v, *x)
        if not linen_update(out, v):
            return out, None
        return out[0], _merged(v, out[1])

    return forward_state


def labels_hint(e: Exception, sample: Any) -> str:
    """The fix for a model called on more sample inputs than it takes (a classifier's labels ride in the sample:
    the step calls ``model(*sample)`` and ``loss(output, *sample)``), else "".

    >>> labels_hint(TypeError("f() takes 2 positional arguments but 3 were given"), (1, 2))[:40]
    '; the model is called on the whole sampl'
    """
    if not isinstance(e, TypeError) or "positional argument" not in str(e) or len(sample or ()) < 2:
        return ""
    return ("; the model is called on the whole sample, labels too, and the loss as loss(output, *sample): accept "
            "them in its call (def __call__(self, x, y=None)), or pass a function fn(variables, *sample) that calls "
            "the model on its inputs only, e.g. fn = lambda v, x, y: module.apply(v, x) (linen), or "
            "fn = lambda state, x, y: nnx.merge(graphdef, state)(x) with graphdef, state = nnx.split(model) (nnx)")


def check_scalar_loss(value: Any) -> None:
    """OptionError unless the loss is one float scalar (the step differentiates it; no aux outputs): the
    check of :func:`tpflax.make_train_step`'s ``loss=``, and of :func:`tpflax.estimate`'s, which prices that step."""
    import jax.numpy as jnp

    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return
    got = f"{dtype}{list(shape)}" if shape is not None and dtype is not None else type(value).__name__
    raise OptionError(f"loss= must return one float scalar, got {got}; make_train_step differentiates it "
                      "and takes no auxiliary outputs (has_aux): return the loss alone and compute metrics "
                      "in a separate jitted function")
