"""A standard training step for any model, with abstract sharded arguments.

:func:`make_train_step` builds ``step(variables, opt_state, batch) -> (variables,
opt_state, loss)`` (forward, backward, optax update) for anything
:func:`tpflax._src.model.as_model` accepts, together with the step's arguments as
``jax.ShapeDtypeStruct`` trees that carry the plan's shardings, so that
:func:`tpflax.dry_run` can compile it without data and ``jax.jit`` can run it.

The batch the step takes:

* a zoo model without ``loss=``: the zoo's ``{"x": inputs, "y": labels}`` batch
  and the zoo's own loss (as before);
* any other model (or a zoo model with ``loss=``): the tuple of sample inputs,
  ``loss(model_output, *sample) -> scalar``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tpflax._src.apply.step import with_shardings
from tpflax._src.cost.batch import plain_batch, size_problem
from tpflax._src.cost.optstate import opt_state_specs
from tpflax._src.errors import OptionError, PlanMismatchError
from tpflax._src.facts.tree import is_nnx_state, keystr, unboxed, walk
from tpflax._src.mesh import batch_pspec
from tpflax._src.model import Model, as_model, check_scalar_loss, is_zoo, labels_hint
from tpflax._src.planner.decision import Decision
from tpflax._src.planner.params import planned_tree, split_params
from tpflax._src.planner.state import (
    is_lookahead_params,
    opt_state_problems,
    takes_lookahead_params,
)
from tpflax._src.scan_fsdp import zero3
from tpflax._src.specs import fsdp_axes
from tpflax._src.trace.collectives import shard_map_meshes


@dataclass(frozen=True)
class TrainStep:
    """A step function with abstract, sharded example arguments, ready for :func:`dry_run`.

    Attributes:
        fn: ``(variables, opt_state, batch) -> (variables, opt_state, loss)``.
        args: ``(variables, opt_state, batch)`` as ``ShapeDtypeStruct`` trees with shardings.
        in_shardings, out_shardings: NamedSharding trees for ``jax.jit``.
        donate_argnums: arguments whose buffers the outputs reuse.
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    in_shardings: Any
    out_shardings: Any
    donate_argnums: tuple[int, ...] = (0, 1)


# ---------------------------------------------------------------------------
# shardings for a step's arguments

def batch_shardings(plan, mesh, batch: Any, size: int | None = None) -> Any:
    """NamedShardings splitting dim 0 of every batch leaf over the plan's batch axes; a leaf carrying an
    explicit ``NamedSharding`` keeps its spec, and given the batch ``size`` a leaf of another leading dim stays
    replicated.

    Raises:
        SpecError: a leaf's batch dim does not divide the batch axes (before compiling).
    """
    from tpflax._src.apply.batch import batch_shardings as place

    return place(batch, mesh, batch_pspec(plan.mesh), size)


def _with_given_specs(abstract: Any, given: Any) -> Any:
    """``abstract`` (the step's batch) with the ``NamedSharding`` of each ``given`` sample leaf that carries one
    (a ``jax.ShapeDtypeStruct(..., sharding=...)``): the sample's explicit layouts, which the model's abstract
    inputs drop. ``abstract`` as is when ``given`` is not the same tree."""
    import jax

    from tpflax._src.apply.batch import explicit_spec

    if given is None:
        return abstract
    given = tuple(given) if isinstance(given, (tuple, list)) else (given,)
    got, treedef = jax.tree_util.tree_flatten(abstract)
    want, given_def = jax.tree_util.tree_flatten(given)
    if treedef != given_def or not any(explicit_spec(x) is not None for x in want):
        return abstract
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=g.sharding) if explicit_spec(g) is not None else a
        for a, g in zip(got, want, strict=True)])


def _warn_uneven(batch: Any) -> None:
    """A TpflaxWarning when the step's inputs disagree on their leading dim and no batch size says which is the
    batch: each is split over the batch axes (a dual encoder's 8 images and 16 captions), and an input shared by
    every example (a positional table) would be too, which XLA gathers back whole at every step."""
    import warnings

    import jax

    from tpflax._src.apply.batch import explicit_spec
    from tpflax._src.errors import TpflaxWarning

    sizes = [(f"input {keystr(p)}", x.shape) for p, x in jax.tree_util.tree_flatten_with_path(batch)[0]
             if getattr(x, "shape", ()) and explicit_spec(x) is None]
    if len({shape[0] for _, shape in sizes}) < 2:
        return
    first = sizes[0][1][0]
    others = [f"{w} {shape}" for w, shape in sizes if shape[0] != first]
    warnings.warn(f"the step's inputs disagree on their leading dim ({sizes[0][0]} {sizes[0][1]}; "
                  f"{', '.join(others[:4])}): each input's leading dim is split over the batch axes. If an input is "
                  f"shared by every example (a positional table), pass batch={first} (inputs of another leading "
                  "dim stay replicated) or give it in sample= as jax.ShapeDtypeStruct(shape, dtype, "
                  "sharding=NamedSharding(mesh, P())); if its batch is another dim (a memory laid out (layers, "
                  "batch, ...)), give that dim the batch axes there (P(None, 'data'))", TpflaxWarning, stacklevel=3)


def named_shardings(mesh, specs: Any) -> Any:
    """A PartitionSpec tree as NamedShardings on ``mesh``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---------------------------------------------------------------------------
# the loss

def next_token_loss(logits: Any, ids: Any, *_: Any) -> Any:
    """Mean next-token cross-entropy: ``logits[:, t]`` predicts ``ids[:, t + 1]``.

    >>> import jax.numpy as jnp
    >>> float(next_token_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]])))  # uniform over 4
    1.38...
    """
    import jax.numpy as jnp
    import optax

    logits = _logits(logits).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _logits(output: Any) -> Any:
    """Hugging Face models return an output record whose ``logits`` are the logits."""
    return getattr(output, "logits", output)


class NoDefaultLoss(OptionError):
    """:func:`default_loss` found no loss to infer (the CLI names its ``--loss`` flag in the message)."""


def _forward_failed(m: Model, e: Exception) -> OptionError:
    return OptionError(f"running {m.name} on its sample inputs failed ({type(e).__name__}: {e}); "
                       f"check sample= and variables={labels_hint(e, m.sample)}")


def default_loss(m: Model, variables: Any, out: Any = None) -> Callable[..., Any]:
    """Next-token cross-entropy when the output is logits over integer ids, else an error. ``out``: the forward
    pass's abstract output where the caller traced it already (else it is run abstractly here)."""
    import jax
    import jax.numpy as jnp

    if out is None:
        try:
            out = jax.eval_shape(m.forward, variables, *m.sample)
        except Exception as e:  # noqa: BLE001 - the user's forward pass; said once with the fix
            raise _forward_failed(m, e) from e
    out = _logits(out)
    first = m.sample[0] if m.sample else None
    ids = first if hasattr(first, "dtype") and hasattr(first, "shape") else None  # not a dict of inputs
    shape, lead = tuple(getattr(out, "shape", ())), tuple(getattr(ids, "shape", ()))
    if (len(shape) >= 3 and jnp.issubdtype(getattr(out, "dtype", jnp.int32), jnp.floating)
            and ids is not None and jnp.issubdtype(ids.dtype, jnp.integer) and shape[:-1] == lead):
        return next_token_loss
    ids_text = (f"{ids.dtype}{list(lead)}" if ids is not None
                else "none" if first is None else f"a {type(first).__name__}")
    raise NoDefaultLoss(f"make_train_step cannot infer a loss for {m.name}: its output is "
                      f"{getattr(out, 'dtype', type(out).__name__)}{list(shape)} and its first input "
                      f"{ids_text} (next-token cross-entropy needs float logits (batch, seq, vocab) over "
                      "int ids (batch, seq)); pass loss=lambda output, *sample: scalar")


# ---------------------------------------------------------------------------
# the step

def _zoo_parts(model: Any, batch: Any) -> tuple[Any, Callable[..., Any]]:
    """The zoo's own batch ``{"x", "y"}`` and ``(variables, batch) -> loss``."""
    return _zoo_batch(model, batch), lambda v, b: (model.loss(v, b), None)


def _zoo_batch(model: Any, batch: Any) -> Any:
    """A zoo model's abstract batch ``{"x", "y"}`` for ``batch``: a size, a shape of its inputs as estimate takes
    it (``(8, 32)``, ``"8x32"``), or an abstract batch itself; OptionError for anything else, or for a shape
    whose per-example dims are not the ones the model's config fixes."""
    import jax

    from tpflax._src.cost.batch import shape_text
    from tpflax._src.cost.workload import fixed_inputs_message

    def accepts() -> str:
        return (f"batch= of a zoo model is its size (batch=8), the shape of its inputs (({per_example_text(8)}), as "
                f"estimate takes it) or an abstract batch (jax.eval_shape(lambda: model.make_batch(0, 8)))")

    def per_example_text(n: int) -> str:
        return ", ".join(map(str, (n, *per)))

    per = tuple(jax.eval_shape(lambda: model.make_batch(0, 1))["x"].shape[1:])
    shape = batch
    if isinstance(batch, str):
        try:
            shape = shape_text(batch)
        except ValueError:
            raise OptionError(f"batch={batch!r} is not a size or a shape; {accepts()}") from None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        if len(shape) > 1 and tuple(shape[1:]) != per:
            raise OptionError(fixed_inputs_message(model.name, tuple(shape), per))
        return jax.eval_shape(lambda: model.make_batch(0, shape[0]))
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    bad = [f"{keystr(p) or '<batch>'} = {x!r}" for p, x in flat if not (hasattr(x, "shape") and hasattr(x, "dtype"))]
    if not flat or bad:
        raise OptionError(f"batch={batch!r} is not a batch of {model.name}: {accepts()}", bad[:8])
    return batch


def _model_parts(m: Model, loss: Any, variables: Any, out: Any = None) -> tuple[Any, Callable[..., Any], Any]:
    """The sample tuple as batch, ``(variables, sample) -> (loss(forward(...), *sample), variables
    after the forward pass)`` (an nnx module's call updates its BatchNorm statistics and RNG counts), and the
    loss itself (``loss``, else :func:`default_loss` of the abstract output ``out``)."""
    loss = loss if loss is not None else default_loss(m, variables, out)
    forward, forward_state = m.forward, m.forward_state

    def loss_of(v, sample):
        if forward_state is None:
            return loss(forward(v, *sample), *sample), None
        out, state = forward_state(v, *sample)
        return loss(out, *sample), state

    return tuple(m.sample), loss_of, loss


def _linen_own_variables(model: Any, sample: Any, batch: Any) -> Any:
    """A linen module's own abstract variables (``model.init``), made outside the step's context mesh as
    :func:`tpflax.plan` and the user's ``jax.eval_shape(model.init, ...)`` make them; None for other
    models, or when the init needs that mesh (a ``jax.shard_map`` without ``mesh=``: made in it then).

    Under a context mesh flax applies every ``nn.with_partitioning`` box's sharding constraint at init:
    one naming an axis the plan's mesh does not have, or a ``DenseGeneral`` kernel boxed with names for
    its 3-D shape while flax constrains the 2-D kernel it reshapes, fails there."""
    from tpflax._src.model import is_linen

    if isinstance(batch, (tuple, list)) and sample is None:
        sample = batch
    if sample is None or not is_linen(model):
        return None
    try:
        return as_model(model, sample).variables
    except Exception:  # noqa: BLE001 - the user's init: tried again under the step's mesh, where it says why
        return None


def _resolve(model: Any, plan, batch: Any, sample: Any, loss: Any, variables: Any, traced: bool = False):
    """(variables, abstract batch, loss_of(variables, batch), the jaxprs the step's loss runs when ``traced``
    (the loss checked to be a float scalar), else None) for any model.

    Without ``loss=``, a model's forward pass is traced once: its abstract output chooses the default loss, and
    the loss is traced apart on it (before, the default loss ran the forward pass abstractly and the check traced
    it again with the loss: half of ``make_train_step``'s time on transformers' GPT-2). A given loss is traced
    with the forward pass, once."""
    import jax

    if is_zoo(model) and loss is None:
        if sample is not None:
            batch = int(sample[0].shape[0]) if isinstance(sample, (tuple, list)) else int(sample.shape[0])
        variables = model.abstract_variables() if variables is None else variables
        abstract, fn = _zoo_parts(model, 8 if batch is None else batch)
        return variables, abstract, fn, (_loss_jaxpr(fn, bare_variables(variables), abstract),) if traced else None
    if isinstance(batch, (tuple, list)) and sample is None:
        batch, sample = None, batch  # a tuple batch is the sample inputs
    m = as_model(model, sample, variables)
    if m.variables is None:
        m = m.with_variables(planned_tree(plan))  # a plain function: the tree that was planned
    if isinstance(batch, int):
        m = m.with_batch(batch)
    elif batch is not None:
        raise OptionError(f"batch={type(batch).__name__} is only for zoo models; pass sample=(inputs, ...) "
                          "for this model, or batch=N to set the batch size of its sample")
    bare = bare_variables(m.variables)
    if not traced or loss is not None:
        # a given loss is traced with the forward pass in one: the output stays inside the trace (it may hold
        # Python values a loss reads, which an abstract output could not carry)
        abstract, loss_of, _ = _model_parts(m, loss, bare)
        try:
            return m.variables, abstract, loss_of, (_loss_jaxpr(loss_of, bare, abstract),) if traced else None
        except TypeError as e:  # the model (or the loss) called with more inputs than it takes: the labels
            if not labels_hint(e, m.sample):
                raise
            raise _forward_failed(m, e) from e
    call = m.forward if m.forward_state is None else m.forward_state
    try:
        closed, out = jax.make_jaxpr(call, return_shape=True)(bare, *m.sample)
    except Exception as e:  # noqa: BLE001 - the user's forward pass; said once with the fix
        raise _forward_failed(m, e) from e
    out = out if m.forward_state is None else out[0]
    abstract, loss_of, chosen = _model_parts(m, None, bare, out)
    return m.variables, abstract, loss_of, (closed.jaxpr, _loss_jaxpr(chosen, out, *abstract, paired=False))


def _loss_jaxpr(fn: Callable[..., Any], *args: Any, paired: bool = True) -> Any:
    """The jaxpr of ``fn(*args)``, a loss (``paired``: ``(loss, state)``) checked to be one float scalar."""
    import jax

    closed, value = jax.make_jaxpr(fn, return_shape=True)(*args)
    check_scalar_loss(value[0] if paired else value)
    return closed.jaxpr


def make_train_step(model: Any, plan, mesh: Any, optimizer: Any, batch: Any = None, *,
                    sample: Any = None, loss: Callable[..., Any] | None = None, variables: Any = None,
                    gather_fsdp: bool = True) -> TrainStep:
    """A standard training step for any model: forward, backward, optax update.

    Args:
        model: a :mod:`tpflax.zoo` model, a linen Module (with ``sample``), an
            nnx Module (with ``sample``) or a function ``fn(variables, *sample)``.
        plan: a plan for the model's variables.
        mesh: a ``jax.sharding.Mesh`` matching the plan (or its shape, to build one; an
            ``AbstractMesh`` for a step only :func:`dry_run` compiles, on a mesh of that shape).
        optimizer: an ``optax.GradientTransformation`` (or ``optax.MultiSteps``). For
            ``optax.lookahead`` the step takes and returns ``optax.LookaheadParams(fast, slow)`` in
            place of the variables, two copies of the planned tree, placed alike
            (``tpflax.shard(optax.LookaheadParams.init_synced(variables), plan, mesh)``, which places
            each copy as its own array: a donating jit cannot take one jax array twice); the loss reads the fast copy, the slow copy's other leaves
            (batch statistics) follow the fast run's.
        batch: the global batch size (sets the sample's leading dim), or for a zoo
            model an abstract zoo batch ``{"x": ..., "y": ...}`` or the shape of its inputs
            (``(8, 32)`` or ``"8x32"``, as :func:`tpflax.estimate` takes it) (default 8).
        sample: the forward inputs (arrays or ``ShapeDtypeStruct``); the step's
            batch is this tuple. A zoo model defaults to its own. Which inputs are split over the
            mesh's batch (data, fsdp) axes: an input given as ``jax.ShapeDtypeStruct(shape, dtype,
            sharding=NamedSharding(mesh, spec))`` keeps its spec (an explicit spec always wins; over Auto
            axes: over Explicit ones every abstract value carries its type's sharding); given
            ``batch=N``, an input whose leading dim is not N (a positional table, a per-layer mask) stays
            replicated; without it each input's leading dim is split (a dual encoder's 8 images and 16
            captions both), with a :class:`~tpflax.TpflaxWarning` when they disagree.
        loss: ``loss(output, *sample) -> scalar``. Default: a zoo model's own
            loss; next-token cross-entropy when the output is float logits
            ``(batch, seq, vocab)`` over int ids ``(batch, seq)`` (the first
            input); otherwise an :class:`~tpflax.OptionError` asks for one.
        variables: abstract variables (default: the model's; for a plain
            function, the planned tree). Linen variables boxed in ``nn.Partitioned`` /
            ``nn.LogicallyPartitioned`` are trained on their arrays (the plan lays them out,
            not the boxes' names) and returned boxed; the optimizer state may be bare or boxed.
        gather_fsdp: implement fsdp as ZeRO-3: inside the step, constrain the
            parameters to their specs without the fsdp axes, so XLA all-gathers
            them for compute (and reduces the gradients back to the shards).
            Without it GSPMD may instead keep weights in place and move
            activations, which is not what an fsdp plan means.

    Returns:
        A :class:`TrainStep`; ``dry_run(ts, plan, mesh)`` compiles it.

    >>> import jax, jax.numpy as jnp, optax, tpflax
    >>> w = {"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}
    >>> p = tpflax.plan(w, {"model": 1})
    >>> ts = make_train_step(lambda v, x: x @ v["w"], p, tpflax.make_mesh({"model": 1}), optax.sgd(0.1),
    ...                      sample=(jax.ShapeDtypeStruct((4, 16), jnp.float32),),
    ...                      loss=lambda out, x: jnp.mean(out ** 2))
    >>> ts.args[2][0].shape
    (4, 16)
    """
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from tpflax._src.apply.bind import bind_mesh, check_mesh
    from tpflax._src.mesh import as_written_or_auto
    from tpflax._src.planner.decision import require_plan

    require_plan(plan, "make_train_step(model, plan, mesh, optimizer)")
    check_mesh(plan, mesh)
    # a shape ({"data": 2, "model": 4}, "data=2,model=4") builds the mesh, as shard() and shardings() take it: it
    # was a bare AttributeError ("'dict' object has no attribute 'size'"); an AbstractMesh is kept
    mesh = bind_mesh(plan, mesh, abstract=True)
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise OptionError(f"optimizer {optimizer!r} is not an optax GradientTransformation (no init() and "
                          "update()); pass one, e.g. optax.adamw(1e-3)")
    if (why := size_problem(batch)) is not None:  # before it sets a sample's leading dim
        raise OptionError(why)
    # np.int64(8) (from np.prod, a numpy config) is a size as 8 is: read as a leaf, a zoo model's batch was that
    # one 0-d array, and any other model's step refused it as "only for zoo models"
    batch = plain_batch(batch)
    orig_batch = batch
    given = variables
    if variables is None:
        variables = _linen_own_variables(model, sample, batch)
    own, context = variables, mesh  # the step's context mesh, for a model's jax.shard_map without mesh=

    def resolved(traced: bool) -> tuple[Any, Any, Any, Any]:
        """(variables, abstract batch, loss of them, the jaxprs it runs when ``traced``, its scalar checked)."""
        v, abstract, fn, jaxprs = _resolve(model, plan, batch, sample, loss, own, traced)
        return (in_plan_containers(plan, v) if given is None else v), abstract, fn, jaxprs

    try:
        with mesh_context(mesh):  # the zoo calls no shard_map: spare the extra trace (0.1 -> 0.8 s, Llama-2-7B)
            variables, abstract_batch, loss_of, jaxprs = resolved(not is_zoo(model))
            for jaxpr in jaxprs or ():
                _check_shard_maps(jaxpr, mesh)
    except (ValueError, OptionError) as e:  # jax's: "The context mesh ... should match the mesh passed to shard_map"
        if "passed to shard_map" not in str(e) or isinstance(e, PlanMismatchError):
            raise
        # a model building its shard_map over its own mesh of the same devices (EasyDeL's experts, over (dp, ep,
        # tp) beside its (dp, fsdp, ep, tp, sp) mesh): runs without a context mesh
        context = None
        variables, abstract_batch, loss_of, jaxprs = resolved(True)
        if not all(same_devices(m, mesh) for j in jaxprs for m in shard_map_meshes(j, concrete=True)):
            raise PlanMismatchError(_MESHES_DIFFER, [f"{str(e).splitlines()[0]}; {_FIX}"]) from e
    from tpflax._src.apply.stored import has_layouts

    if has_layouts(plan):  # fused kernels stored head-aligned
        from tpflax._src.apply.aligned import aligned

        loss_of = aligned(loss_of, plan)
    try:
        var_specs = plan.specs_for(variables)
    except PlanMismatchError as e:
        if given is not None:
            raise
        raise PlanMismatchError(f"{e}. make_train_step took the model's own variables (model.init): pass "
                                "variables= the tree you planned (e.g. one cast to bfloat16)") from e
    params, _ = split_params(plan, bare_variables(variables))  # the step trains bare arrays
    opt_state, opt_specs = opt_state_specs(plan, optimizer, params)
    if not (is_zoo(model) and loss is None):  # a zoo's own batch {"x", "y"} holds examples only
        abstract_batch = _with_given_specs(abstract_batch, sample if sample is not None else
                                           orig_batch if isinstance(orig_batch, (tuple, list)) else None)
        if not isinstance(batch, int):
            _warn_uneven(abstract_batch)
    made = opt_state  # what the step's optimizer keeps (the step's own opt_state argument shadows it)
    # optax.lookahead updates a second, slow copy of the parameters: the step takes and returns the pair
    pair = takes_lookahead_params(opt_state)
    var_sh, opt_sh = named_shardings(mesh, var_specs), named_shardings(mesh, opt_specs)
    batch_sh = batch_shardings(plan, mesh, abstract_batch, batch if isinstance(batch, int) else None)
    gather = fsdp_gather(plan, mesh, param_decisions(plan, variables)) if gather_fsdp else None
    # frozen leaves split over fsdp (a LoRA base, plan(trainable=)) are gathered for compute too: left to
    # itself XLA reads a frozen fsdp-split table by masked lookups summed over the tensor axis and
    # collective-permutes (measured: nnx LoRA decoder, fsdp=2,model=4)
    frozen = frozen_fsdp(plan, variables) if gather is not None else []
    gather_frozen = fsdp_gather(plan, mesh, [d for _, d in frozen]) if frozen else None

    def step(variables, opt_state, batch):
        given_pair = variables
        if pair:
            variables = _fast_of(variables)
        # linen boxes (nn.Partitioned / nn.LogicallyPartitioned) stripped: the model, the gradients and the
        # optimizer see arrays laid out by the plan alone (applied boxed, flax would add each box's sharding
        # constraint, its own names, to the forward pass); the outputs are boxed again as given
        bare_vars = bare_variables(variables)
        params, merge = split_params(plan, bare_vars)
        bare, restore = _checked_opt_state(plan, opt_state, made)
        leaves, treedef = jax.tree_util.tree_flatten(bare_vars)

        def loss_fn(p):
            def run(kept=()):  # kept: the frozen fsdp leaves, gathered
                v = bare_vars
                if kept:
                    vl = list(leaves)
                    for (i, _), x in zip(frozen, kept, strict=True):
                        vl[i] = x
                    v = jax.tree_util.tree_unflatten(treedef, vl)
                with mesh_context(context):  # a jax.shard_map without mesh= runs on the step's
                    return loss_of(merge(v, p), batch)

            return run() if gather_frozen is None else gather_frozen(run)([leaves[i] for i, _ in frozen])

        # the optimizer updates the parameters; the rest of the state is what the forward pass left
        # (an nnx module's), else the variables passed in (never the gathered parameters: returning
        # them would make XLA keep every fsdp weight gathered whole)
        (value, state), grads = jax.value_and_grad(gather(loss_fn) if gather is not None else loss_fn,
                                                   has_aux=True)(params)
        if not pair:
            updates, new_state = optimizer.update(grads, bare, params)
            new = merge(bare_vars if state is None else state, optax.apply_updates(params, updates))
            return in_form_of(variables, new), restore(new_state), value
        slow_given = given_pair.slow
        both = optax.LookaheadParams(fast=params, slow=split_params(plan, bare_variables(slow_given))[0])
        updates, new_state = optimizer.update(grads, bare, both)
        moved = optax.apply_updates(both, updates)
        fast = merge(bare_vars if state is None else state, moved.fast)
        # the slow copy's other leaves (batch statistics, integer leaves) follow the fast run's: the
        # optimizer keeps a slow copy of the parameters only
        slow = merge(fast, moved.slow)
        return (optax.LookaheadParams(fast=in_form_of(variables, fast), slow=in_form_of(slow_given, slow)),
                restore(new_state), value)

    var_args = with_shardings(variables, var_sh)
    if pair:
        var_sh, var_args = optax.LookaheadParams(var_sh, var_sh), optax.LookaheadParams(var_args, var_args)
    args = (var_args, with_shardings(opt_state, opt_sh), with_shardings(abstract_batch, batch_sh))
    loss_sh = NamedSharding(mesh, PartitionSpec())
    out_sh = (var_sh, opt_sh, loss_sh)
    # on a mesh with Explicit axes (jax.make_mesh's default) a model written for Auto axes runs with them Auto
    return TrainStep(as_written_or_auto(step, mesh, args, out_sh), args, (var_sh, opt_sh, batch_sh), out_sh)


def _fast_of(variables: Any) -> Any:
    """The fast tree of the ``optax.LookaheadParams`` an ``optax.lookahead`` step takes, or OptionError."""
    if is_lookahead_params(variables):
        return variables.fast
    raise OptionError(
        f"the optimizer is optax.lookahead, whose update takes optax.LookaheadParams(fast, slow), and the step "
        f"was given {type(variables).__name__}: pass optax.LookaheadParams(fast=tpflax.shard(variables, plan, mesh), "
        "slow=tpflax.shard(variables, plan, mesh)) (two placed copies, both the planned tree; the loss reads "
        "the fast one) and take the pair back from the step")


def in_plan_containers(plan, variables: Any) -> Any:
    """``variables`` (a model's own, from ``model.init``) in the containers of the planned tree, when
    they differ only there (a FrozenDict or tuples planned, dicts or lists made): the step then takes
    what :func:`tpflax.shard` and :func:`tpflax.shard_optimizer_state` return for the plan."""
    import jax
    from jax.sharding import PartitionSpec

    if is_nnx_state(variables):
        return variables
    got, treedef = jax.tree_util.tree_flatten_with_path(variables)
    want, plan_def = jax.tree_util.tree_flatten_with_path(plan.specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if treedef == plan_def or [keystr(p) for p, _ in got] != [keystr(p) for p, _ in want]:
        return variables
    return jax.tree_util.tree_unflatten(plan_def, [x for _, x in got])


def mesh_context(mesh: Any) -> Any:
    """``mesh`` as the context mesh unless one is set: a model's ``jax.shard_map`` without ``mesh=`` uses it."""
    import contextlib

    import jax

    if not jax.sharding.get_abstract_mesh().empty or not hasattr(mesh, "abstract_mesh"):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def same_devices(a: Any, b: Any) -> bool:
    """Whether the mesh ``a`` of a model's ``jax.shard_map`` holds the step mesh ``b``'s devices in the same order
    over axes ``b`` names too, however it sizes them (an abstract one: the same axes of size > 1). The shard_map
    then runs on arrays placed over ``b``, resharded where the specs differ: EasyDeL runs its experts over
    ``(dp, ep, tp)``, its fsdp devices as ``ep``, beside parameters placed over ``(dp, fsdp, ep, tp, sp)``. A
    mesh over axes the step does not have is another mesh."""
    import numpy as np

    if not set(a.axis_names) <= set(b.axis_names):
        return False
    if getattr(a, "devices", None) is None or getattr(b, "devices", None) is None:
        live = [tuple((n, m.shape[n]) for n in m.axis_names if m.shape[n] > 1) for m in (a, b)]
        return live[0] == live[1]
    return [d.id for d in np.asarray(a.devices).flat] == [d.id for d in np.asarray(b.devices).flat]


def _check_shard_maps(jaxpr: Any, mesh: Any) -> None:
    """Raise PlanMismatchError for a ``shard_map`` in the model over another mesh than the step's."""
    want = dict(mesh.shape)
    bad = [m for m in shard_map_meshes(jaxpr) if m != want]
    if bad:
        raise PlanMismatchError(_MESHES_DIFFER, [f"shard_map over {m}; the step's mesh is {want}: {_FIX}"
                                                 for m in dict.fromkeys(map(str, bad))])


_MESHES_DIFFER = "the model calls jax.shard_map over another mesh than the one the plan is applied on"
_FIX = ("build the model's shard_map with mesh=tpflax.make_mesh(plan.mesh) (the mesh given to make_train_step), "
        "or without mesh= (tpflax runs the step with its mesh as the context mesh)")


def param_decisions(plan, variables: Any) -> list[Decision]:
    """The plan's Decision of each leaf the optimizer updates, in ``split_params`` leaf order."""
    import jax

    return jax.tree_util.tree_leaves(split_params(plan, plan_decisions(plan, variables))[0],
                                     is_leaf=lambda x: isinstance(x, Decision))


def _checked_opt_state(plan, opt_state: Any, made: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(opt_state as the step's optimizer takes it, restore(new state) in the caller's form)``, or
    PlanMismatchError naming every leaf that differs from the bare state the step's optimizer makes for
    the parameters it trains. A state whose leaves sit in boxes is taken unboxed and handed back boxed:
    an nnx state's Variables (``tx.init(nnx.state(model, nnx.Param))``), a boxed linen model's
    ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` moments (``tx.init(variables["params"])``)."""
    import jax

    want = jax.tree_util.tree_structure(made)
    if jax.tree_util.tree_structure(opt_state) == want:
        return opt_state, lambda new: new
    bare = unboxed(opt_state)
    if jax.tree_util.tree_structure(bare) == want:
        return bare, lambda new: in_form_of(opt_state, new)
    raise PlanMismatchError(
        "the optimizer state does not fit the step: it differentiates and updates the float parameters "
        "only (integer, bool and PRNG-key leaves, and an nnx module's BatchStats and RNG state, pass "
        "through unchanged) and its optimizer keeps state for those alone; build the state with "
        "tpflax.shard_optimizer_state(optimizer, None, plan, mesh) (params=... for optimizers whose "
        "state copies the parameters), or optimizer.init of the parameters with the other leaves set "
        "to None (left out of an nnx State)", opt_state_problems(bare, made, plan))


def bare_variables(variables: Any) -> Any:
    """Linen variables with every flax box (``nn.Partitioned``, ``nn.LogicallyPartitioned``) replaced by
    its array; an ``nnx.State`` as it is (:func:`split_params` takes its parameters out of their Variables).

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> bare_variables({"params": {"w": nn.Partitioned(jnp.ones(2), names=("model",))}})["params"]["w"].shape
    (2,)
    """
    return variables if is_nnx_state(variables) else unboxed(variables)


def in_form_of(given: Any, new: Any) -> Any:
    """``new`` (bare arrays) in the boxes ``given`` holds its leaves in (flax boxes, nnx Variables), the
    same leaves in the same order; ``new`` itself when ``given`` has none.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> in_form_of({"w": nn.Partitioned(jnp.ones(2), names=("model",))}, {"w": jnp.zeros(2)})["w"].names
    ('model',)
    """
    import jax

    given_def = jax.tree_util.tree_structure(given)
    new_leaves, new_def = jax.tree_util.tree_flatten(new)
    if new_def == given_def or given_def.num_leaves != len(new_leaves):
        return new
    return jax.tree_util.tree_unflatten(given_def, new_leaves)


def plan_decisions(plan, tree: Any) -> Any:
    """``tree`` with each leaf (or flax box) replaced by its plan Decision."""
    import jax

    leaves, treedef = walk(tree)
    return jax.tree_util.tree_unflatten(treedef, [plan.decisions[x.path] for x in leaves])


def frozen_fsdp(plan, variables: Any) -> list[tuple[int, Decision]]:
    """``(leaf index in tree_leaves(variables), Decision)`` of the frozen leaves split over an fsdp axis:
    float ones (a LoRA base) and quantized integer kernels, gathered as stored (int8: a quarter of the
    bytes XLA would move gathering the dequantized float32 kernel)."""
    import jax

    from tpflax._src.specs import used_axes

    decs = jax.tree_util.tree_leaves(plan_decisions(plan, variables), is_leaf=lambda x: isinstance(x, Decision))
    leaves = jax.tree_util.tree_leaves(variables)
    if len(decs) != len(leaves):  # a box holding several arrays: leave it to XLA
        return []
    fsdp = fsdp_axes(plan)
    return [(i, d) for i, (x, d) in enumerate(zip(leaves, decs, strict=True))
            if not d.trainable and used_axes(d.spec) & fsdp
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def fsdp_gather(plan, mesh, decisions: Any) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]] | None:
    """``loss(params) -> loss(params gathered for compute)`` (ZeRO-3), or None without fsdp.

    See :func:`tpflax._src.scan_fsdp.zero3`: scanned stacks are gathered one layer
    at a time inside the scan that reads them.
    """
    import jax

    fsdp = fsdp_axes(plan)
    if not fsdp:
        return None
    decs = jax.tree_util.tree_leaves(decisions, is_leaf=lambda x: isinstance(x, Decision))
    return lambda loss_fn: partial(zero3, loss_fn, decisions=decs, mesh=mesh, fsdp=fsdp)
