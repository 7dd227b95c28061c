"""Apply a plan: ``NamedSharding`` trees, arrays placed on the mesh, and back on the host.

The converter's core: :func:`shardings`, :func:`shard` (bit-exact, never
mutating the caller's tree unless ``donate=True``), :func:`unshard` and
:func:`constrain` for use inside a traced step. Optimizer state lives in
``apply/state.py``, batches in ``apply/batch.py``, init in ``apply/init.py``,
the jitted step in ``apply/step.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.apply import nnx as nnx_apply
from tpflax._src.apply.bind import (
    bind_mesh,
    is_graph_node,
    match_plan,
    plan_leaf_shardings,
    rebox,
    rebox_all,
)
from tpflax._src.apply.put import check_values, place_tree
from tpflax._src.apply.stored import has_layouts, reorder, tree_layouts
from tpflax._src.errors import TreeError
from tpflax._src.facts.tree import is_box, keystr, unbox, walk
from tpflax._src.mesh import as_written_or_auto, constrain_to, explicit_axes
from tpflax._src.planner.decision import require_plan
from tpflax._src.planner.plan import Plan
from tpflax._src.planner.state import is_lookahead_params
from tpflax._src.scan_fsdp import pin, zero3
from tpflax._src.specs import fsdp_axes, without_axes


def shardings(plan: Plan, mesh: Any, tree: Any = None) -> Any:
    """A ``NamedSharding`` tree for the plan on ``mesh``.

    Args:
        plan: the plan.
        mesh: a ``jax.sharding.Mesh`` or ``AbstractMesh`` (or a shape, to build a
            Mesh with :func:`make_mesh`).
        tree: lay the shardings out on this tree (matched by path); defaults to
            ``plan.specs``' own structure. For a plan of full linen variables,
            ``variables["params"]`` is accepted too.

    Raises:
        PlanMismatchError: the mesh or the tree differs from the plan.
        DeviceError: a mesh shape needs more devices than there are.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 1})
    >>> shardings(p, tpflax.make_mesh({"model": 1}))["w"].spec
    P(None, None)
    """
    if is_lookahead_params(tree):  # optax.lookahead's (fast, slow) pair: each copy as the plan says
        return type(tree)(*(shardings(plan, mesh, t) for t in tree))
    mesh = bind_mesh(plan, mesh, abstract=True)
    if tree is None:
        return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), plan.specs,
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves, treedef = walk(tree)
    paths = match_plan(plan, leaves)
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, plan.decisions[p].spec)
                                                  for p in paths])


def shard(tree: Any, plan: Plan, mesh: Any = None, *, per_shard: bool = False,
          donate: bool = False, check_finite: bool | None = None) -> Any:
    """Place an existing tree on the mesh, bit-exact, laid out as the plan says.

    Args:
        tree: the tree that was planned (params, full linen variables, a boxed
            tree, ``nnx.State``) holding numpy or jax arrays, or an ``nnx.Module``
            (split, placed, merged back into a new module). For a plan of full
            linen variables, ``variables["params"]`` alone is accepted too. An
            ``optax.LookaheadParams(fast, slow)`` pair (``optax.lookahead``'s
            parameters) gives a pair, each copy placed as the plan says.
        plan: the plan.
        mesh: a ``jax.sharding.Mesh`` of the plan's shape, or a shape to build one;
            defaults to the plan's mesh over the first devices.
        per_shard: build every leaf from per-device host slices with
            ``jax.make_array_from_callback``. Always done for leaves whose
            sharding spans other processes, and for ``np.memmap`` leaves (only
            the slices are read).
        donate: pass the jax arrays of ``tree`` to ``jax.device_put(..., donate=True)``
            and skip the copy that otherwise keeps the result from sharing a buffer with
            them. Best effort, as jax's: an input may be deleted and its memory reused,
            or stay alive (on CPU it is not deleted); either way the result may share
            its buffers, so treat ``tree`` as consumed. Not donated: numpy leaves, leaves
            built per shard (``per_shard``, memmaps, multi-host), an ``nnx.Module``.
            Without ``donate`` the result never shares a buffer with ``tree``.
        check_finite: warn (:class:`tpflax.TpflaxWarning`) about float leaves
            holding NaN or inf; they are still placed exactly as given. None
            (default): check values already in host memory (numpy, and jax arrays
            on CPU devices); True: also arrays on accelerators (one reduction
            per leaf); False: skip.

    Returns:
        A new tree of the same structure (flax boxes and nnx Variables kept)
        whose arrays carry ``NamedSharding(mesh, plan spec)``. Leaves with a
        ``Decision.layout`` (``plan(..., fused="aligned")``) are put into the
        stored order (new arrays: numpy reordered on the host, jax arrays by a
        jitted gather; a memmap is then read whole); ``unshard(tree, plan)``
        gives the model's order back. Arrays tpflax already put into a stored
        order (the output of ``shard``, ``init_sharded``, a restore) are known
        as stored: placed again they are not moved a second time (on a plan
        without the layout they are put back into the model's order).

    Raises:
        PlanMismatchError: the tree's paths, shapes or dtypes, or the mesh,
            differ from the plan. Nothing is placed.
        AbstractMeshError: the mesh is an ``AbstractMesh``, which holds no
            arrays (a MeshError and a PlanMismatchError).
        TreeError: a leaf was deleted (donated), or is 64-bit while
            ``jax_enable_x64`` is off (jax would cast it, losing bits).
        DeviceError: too few devices for a mesh given as a shape.

    >>> import jax.numpy as jnp, tpflax
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> tpflax.shard(params, p, tpflax.make_mesh({"model": 2}))["w"].sharding.spec
    P('model', None)
    """
    if is_lookahead_params(tree):  # optax.lookahead's (fast, slow) pair: each copy placed as the plan says
        fast, slow = (jax.tree_util.tree_leaves(t) for t in tree)
        shared = any(a is b for a, b in zip(fast, slow, strict=False))  # init_synced: one array, donated once (the slow copy)
        return type(tree)(*(shard(t, plan, mesh, per_shard=per_shard, donate=donate and not (shared and i == 0),
                                  check_finite=check_finite) for i, t in enumerate(tree)))
    if is_graph_node(tree):
        from flax import nnx

        _no_abstract_leaves(nnx.state(tree))
        return nnx_apply.shard_module(tree, plan, mesh, per_shard=per_shard)
    _no_abstract_leaves(tree)
    return place_tree(tree, plan, mesh, per_shard=per_shard, donate=donate, check_finite=check_finite)


def _no_abstract_leaves(tree: Any) -> None:
    """Raise :class:`TreeError` naming the abstract leaves (``jax.ShapeDtypeStruct``) of ``tree``."""
    # named as every other message names a leaf ("down/bias", not jax's "['down']['bias']")
    paths = [keystr(p) or "<tree>" for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
             if isinstance(unbox(x), jax.ShapeDtypeStruct)]
    if paths:
        raise TreeError(f"shard() places arrays, but {len(paths)} leaves are abstract (jax.ShapeDtypeStruct, "
                        f"e.g. {paths[0]}): initialise directly sharded with tpflax.init_sharded(init_fn, plan, "
                        "mesh), or take the shardings for jax.jit with tpflax.shardings(plan, mesh, tree)")


def unshard(tree: Any, plan: Plan | None = None) -> Any:
    """Gather every array of ``tree`` back to host numpy, bit-exact: new, writable arrays that share no memory
    with the placed ones.

    Works on any tree (params, optimizer state, boxed trees, ``nnx.State``) and on
    an ``nnx.Module`` (its ``nnx.State`` is returned). Arrays that span several
    processes are all-gathered, so every process gets the full values.

    ``plan``: the plan the tree was placed with. Pass it when the plan stores fused kernels
    head-aligned (``plan(..., fused="aligned")``): those leaves, and the optimizer-state leaves
    tied to them by path (adam's ``mu``/``nu``), come back in the model's order. Without it
    they come back as stored.

    >>> import jax.numpy as jnp
    >>> unshard({"w": jnp.arange(3)})["w"]
    array([0, 1, 2], dtype=int32)
    """
    if plan is not None:  # unshard(tree, mesh)
        require_plan(plan, "unshard(tree, plan)", "unshard needs no mesh (the arrays carry their own shardings): call "
                     "unshard(tree), or unshard(tree, plan) for a plan that stores fused kernels head-aligned")
    if is_lookahead_params(tree):
        return type(tree)(*(unshard(t, plan) for t in tree))
    if is_graph_node(tree):
        from flax import nnx

        tree = nnx.state(tree)
    boxes, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_box)
    values = [unbox(b) for b in boxes]
    check_values(tree, values, narrow=False, what="the tree", doing="read back")  # a donated array, by its path
    values = [_gather(x) for x in values]
    if plan is not None and has_layouts(plan):
        values = reorder(values, tree_layouts(plan, tree), back=True)
    return jax.tree_util.tree_unflatten(treedef, [rebox(b, v) for b, v in zip(boxes, values, strict=True)])


def _gather(x: Any) -> Any:
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # typed PRNG keys have no numpy form: their key data is gathered like any array and wrapped again, a
            # new key array on the default device (not the placed one, which a donating step deletes)
            return jax.random.wrap_key_data(_gather(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            out = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        else:
            out = np.asarray(jax.device_get(x))
        # jax hands out its cached host copy (or a view of a CPU device's buffer) read-only: an edit of the
        # result ("params['emb'][0] = 0") was numpy's bare "assignment destination is read-only", where a numpy
        # leaf given comes back as a copy of its own
        return out if out.flags.writeable else out.copy()
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def constrain(tree: Any, plan: Plan, mesh: Any = None, *, gathered: bool = False) -> Any:
    """``with_sharding_constraint`` every leaf to the plan's spec (use inside ``jax.jit``).

    Pins the layout of updated parameters (or of an nnx model's state) so XLA
    cannot pick another one for the step's outputs.

    Args:
        tree: params (or variables) matching the plan.
        plan: the plan.
        mesh: the mesh (or a shape; default: the plan's).
        gathered: pin the layout for compute instead: the plan's specs without
            the fsdp axes, so XLA all-gathers the fsdp shards before use and
            reduces the gradients back to them (ZeRO-3). Applied to the params
            inside the loss of a hand-written step of a model without scanned
            or rematerialised layers, that is the step
            :func:`tpflax.make_train_step` builds and :func:`tpflax.estimate`
            models. Without it XLA chooses per op whether to gather weights or
            move activations, and its collectives can differ from the estimate
            several-fold (``benchmarks/results/plain_step.md``). A scanned
            (``nn.scan``) stack is then gathered whole, every layer at once,
            before the scan, and a remat'd layer's weights outside its remat'd
            call: wrap the loss in :func:`gathered_loss` instead (the step
            :func:`tpflax.make_train_step` builds for every model), which
            gathers a stack one layer at a time inside the scan.

    >>> import jax, jax.numpy as jnp, tpflax
    >>> p = tpflax.plan({"w": jnp.ones((8, 4))}, {"model": 2}, rules=[("w", "row")])
    >>> mesh = tpflax.make_mesh({"model": 2})
    >>> out = jax.jit(lambda t: constrain(t, p, mesh))({"w": jnp.ones((8, 4))})
    >>> out["w"].sharding.is_equivalent_to(tpflax.shardings(p, mesh)["w"], 2)
    True
    """
    mesh = bind_mesh(plan, mesh, abstract=True)
    boxes, treedef, shards = plan_leaf_shardings(plan, mesh, tree)
    fsdp = fsdp_axes(plan) if gathered else frozenset()
    if fsdp:  # stored, then gathered: the gradient is reduce-scattered back
        values = [pin(unbox(b), s, NamedSharding(s.mesh, without_axes(s.spec, fsdp)))
                  for b, s in zip(boxes, shards, strict=True)]
        return rebox_all(boxes, values, treedef)
    values = [constrain_to(unbox(b), s) for b, s in zip(boxes, shards, strict=True)]
    return rebox_all(boxes, values, treedef)


def gathered_loss(loss_fn: Callable[..., Any], plan: Plan, mesh: Any = None) -> Callable[..., Any]:
    """``loss_fn(params, *args)`` with the params gathered for compute (ZeRO-3), scanned stacks per layer.

    What ``constrain(params, plan, mesh, gathered=True)`` does inside a loss, except
    that a scanned layer stack (a leaf with ``Decision.layers_dim`` 0, read by a
    ``lax.scan`` / ``nn.scan``) is all-gathered one layer at a time inside the
    scan body, and that layer's gradient reduce-scattered there, instead of every
    layer at once before the loop. This is the step :func:`tpflax.make_train_step`
    builds; use it in a hand-written step of a scanned model, around the loss
    you differentiate.

    Args:
        loss_fn: ``loss_fn(params, *args) -> loss``; ``params`` match the plan.
        plan: the plan.
        mesh: the mesh (or a shape; default: the plan's); an ``AbstractMesh`` too: it places nothing.

    >>> import jax, jax.numpy as jnp, tpflax
    >>> w = {"w": jnp.ones((3, 8, 4))}
    >>> p = tpflax.plan(w, {"fsdp": 1}, stacked="w")
    >>> loss = lambda t, x: jax.lax.scan(lambda c, w: (c @ w @ w.T, None), x, t["w"])[0].sum()
    >>> float(jax.jit(tpflax.gathered_loss(loss, p))(w, jnp.ones((2, 8))))
    524288.0
    """
    mesh = bind_mesh(plan, mesh, abstract=True)  # it places nothing: an AbstractMesh (a pod this host lacks) is fine
    fsdp = fsdp_axes(plan)

    def gathered(params: Any, *args: Any) -> Any:
        if not fsdp:
            return loss_fn(params, *args)
        leaves, _ = walk(params)
        decisions = [plan.decisions[p] for p in match_plan(plan, leaves)]
        return zero3(lambda t: loss_fn(t, *args), params, decisions=decisions, mesh=mesh, fsdp=fsdp)

    if not explicit_axes(mesh):
        return gathered
    whole = NamedSharding(mesh, PartitionSpec())

    def wrapped(params: Any, *args: Any) -> Any:
        # on a mesh with Explicit axes, a loss written for Auto axes runs with them Auto: its outputs (the
        # loss, and any aux) come back replicated
        return as_written_or_auto(gathered, mesh, (params, *args), whole)(params, *args)

    return wrapped


__all__ = ["constrain", "gathered_loss", "shard", "shardings", "unshard"]
