"""A training step jitted for a plan's mesh: in/out shardings from argument roles, donation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpflax._src.apply.batch import batch_shardings, batch_spec
from tpflax._src.apply.bind import bind_mesh
from tpflax._src.apply.place import shardings
from tpflax._src.apply.state import state_shardings
from tpflax._src.errors import PlanMismatchError, TreeError
from tpflax._src.facts.tree import keystr
from tpflax._src.mesh import as_written_or_auto, explicit_axes
from tpflax._src.planner.params import abstract_params
from tpflax._src.planner.plan import Plan

ROLES = ("params", "state", "batch", "replicated", None)
_DONATED = ("params", "state")


def _role_shardings(step: Step, role: Any, tree: Any) -> Any:
    """The sharding tree for one argument (or output) of ``step`` with ``role``."""
    if role is None:
        return None
    if role == "params":
        return shardings(step.plan, step.mesh, tree)
    if role == "state":
        params = abstract_params(step.plan) if step.optimizer is not None else None
        return state_shardings(tree, step.plan, step.mesh, optimizer=step.optimizer, params=params)
    if role == "batch":
        return batch_shardings(tree, step.mesh, batch_spec(step.mesh, axis_roles=dict(step.plan.mesh.roles)))
    if role == "replicated":
        return NamedSharding(step.mesh, PartitionSpec())
    raise PlanMismatchError(f"unknown role {role!r}; use one of {ROLES}")


def _out_shardings(step: Step, out_shape: Any) -> Any:
    if not isinstance(step.out_roles, tuple):
        return _role_shardings(step, step.out_roles, out_shape)
    if not isinstance(out_shape, tuple) or len(out_shape) != len(step.out_roles):
        raise PlanMismatchError(
            f"out_roles {step.out_roles} names {len(step.out_roles)} outputs but the step "
            f"returns {type(out_shape).__name__}"
            f"{'' if not isinstance(out_shape, tuple) else f' of {len(out_shape)}'}; "
            "give one role per output")
    return tuple(_role_shardings(step, r, o) for r, o in zip(step.out_roles, out_shape, strict=True))


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree``'s leaves as ShapeDtypeStructs carrying the matching sharding.

    Leaves are matched in order, so a sharding may stand where ``tree`` has a
    one-leaf node (an ``nnx.Param`` holding its value); one sharding alone stands for every leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    sh = sh * len(leaves) if len(sh) == 1 else sh
    if len(sh) != len(leaves):
        raise PlanMismatchError(f"{len(sh)} shardings for a tree of {len(leaves)} leaves; build the "
                                "shardings from the same tree (plan.specs_for(tree))")
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s) for x, s in zip(leaves, sh, strict=True)])


def _filled(step: Step, shardings: Any, out_shape: Any) -> Any:
    """``shardings`` with the outputs of no role (None) replicated: ``jax.sharding.auto_axes`` needs every one."""
    whole = NamedSharding(step.mesh, PartitionSpec())
    if shardings is None:
        return jax.tree_util.tree_map(lambda _: whole, out_shape)
    if isinstance(step.out_roles, tuple):
        return tuple(jax.tree_util.tree_map(lambda _: whole, o) if s is None else s
                     for s, o in zip(shardings, out_shape, strict=True))
    return shardings


@dataclasses.dataclass(frozen=True)
class Step:
    """A step function compiled for a plan's mesh; see :func:`jit_step`.

    Calling it compiles once per argument structure (cached), with in/out
    shardings from the argument roles, and donates the params/state arguments.
    """

    fn: Callable[..., Any]
    plan: Plan
    mesh: jax.sharding.Mesh
    in_roles: tuple[Any, ...]
    out_roles: Any
    optimizer: Any
    donate: bool
    compiler_options: Any = None
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def jitted(self, *args: Any):
        """The ``jax.jit`` object for these arguments (built on first use)."""
        if len(args) != len(self.in_roles):
            raise PlanMismatchError(
                f"the step was given {len(args)} arguments but in_roles names {len(self.in_roles)} "
                f"({self.in_roles}); pass one role per positional argument")
        key = tuple(jax.tree_util.tree_structure(a) for a in args) + tuple(
            (np.shape(x), str(getattr(x, "dtype", ""))) for x in jax.tree_util.tree_leaves(args))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        in_shardings = tuple(_role_shardings(self, role, a) for role, a in
                             zip(self.in_roles, args, strict=True))
        fn = self.fn
        if explicit_axes(self.mesh):  # a step written for Auto axes runs with them Auto
            typed = tuple(a if s is None else with_shardings(a, s) for a, s in zip(args, in_shardings, strict=True))
            fn = as_written_or_auto(fn, self.mesh, typed, lambda out: _filled(self, _out_shardings(self, out), out))
            args = typed
        out_shardings = _out_shardings(self, jax.eval_shape(fn, *args))
        donate = tuple(i for i, r in enumerate(self.in_roles) if self.donate and r in _DONATED)
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate, compiler_options=self.compiler_options)
        self.cache[key] = jitted
        return jitted

    def __call__(self, *args: Any) -> Any:
        _check_live(args)
        return self.jitted(*args)(*args)

    def lower(self, *args: Any):
        """``jax.jit(...).lower(*args)``: for ``.compile().memory_analysis()`` and HLO text."""
        return self.jitted(*args).lower(*args)


def _check_live(args: Sequence[Any]) -> None:
    """TreeError naming the arguments' deleted arrays: the params a step donated, passed again instead of its
    output. jax 0.10's XLA:CPU client then crashed the process (a segmentation fault) after logging "Buffer has
    been deleted or donated"."""
    def deleted(x: Any) -> bool:
        return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()

    if not any(deleted(x) for x in jax.tree_util.tree_leaves(args)):  # every call: no key paths unless needed
        return
    dead = [f"argument {i}{'/' + keystr(path) if path else ''}: shape {tuple(x.shape)}"
            for i, a in enumerate(args) for path, x in jax.tree_util.tree_flatten_with_path(a)[0] if deleted(x)]
    if dead:
        raise TreeError("the step was given arrays that were deleted, donated to an earlier call of it: pass that "
                        "call's outputs (params, state = step(params, state, batch)), not its inputs",
                        dead[:5] + ([f"... and {len(dead) - 5} more"] if len(dead) > 5 else []))


def _state_role(r: Any) -> Any:
    return "state" if r == "opt_state" else r  # "opt_state" is an alias


def jit_step(fn: Callable[..., Any], plan: Plan, mesh: Any = None, *,
             in_roles: Sequence[Any] = ("params", "state", "batch"), out_roles: Any = "mirror",
             optimizer: Any = None, donate: bool = True,
             compiler_options: Mapping[str, Any] | None = None) -> Step:
    """Compile a training step with the plan's in/out shardings and buffer donation.

    Each positional argument has a role: ``"params"`` (must match the plan),
    ``"state"`` (optimizer state, TrainState or anything derived from the
    params: see :func:`state_shardings`), ``"batch"`` (leading dim over the
    data/fsdp axes), ``"replicated"``, or ``None`` (jax infers it from the
    argument). ``params`` and ``state`` arguments are donated when ``donate``.

    The equivalent by hand::

        step = jax.jit(train_step,
                       in_shardings=(tpflax.shardings(plan, mesh),
                                     tpflax.optimizer_shardings(tx, plan, mesh),
                                     tpflax.batch_sharding(mesh)),
                       out_shardings=(tpflax.shardings(plan, mesh),
                                      tpflax.optimizer_shardings(tx, plan, mesh), None),
                       donate_argnums=(0, 1))

    Args:
        fn: the step, e.g. ``(params, opt_state, batch) -> (params, opt_state, loss)``.
        plan: the parameters' plan.
        mesh: the mesh (or a shape).
        in_roles: one role per positional argument.
        out_roles: a role, or a tuple of roles for a tuple output. ``"mirror"``
            (default): output ``i`` takes input ``i``'s role when that is params or
            state, else ``None``.
        optimizer: the optax optimizer, to tie state leaves to params exactly.
        donate: donate params/state inputs.
        compiler_options: passed to ``jax.jit`` (XLA options).

    >>> import jax, jax.numpy as jnp, tpflax
    >>> params = {"w": jnp.ones((8, 4))}
    >>> p = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    >>> mesh = tpflax.make_mesh({"model": 2})
    >>> step = jit_step(lambda w, x: (jax.tree.map(lambda a: a * 2, w), (x @ w["w"]).sum()), p,
    ...                 mesh, in_roles=("params", "batch"))
    >>> w, loss = step(tpflax.shard(params, p, mesh), jnp.ones((2, 8)))
    >>> float(loss), w["w"].sharding.spec
    (64.0, P('model', None))
    """
    mesh = bind_mesh(plan, mesh)
    for r in in_roles:
        if r not in ROLES and r != "opt_state":
            raise PlanMismatchError(f"unknown role {r!r} in in_roles; use one of {ROLES}")
    in_roles = tuple(_state_role(r) for r in in_roles)
    if out_roles == "mirror":
        out_roles = tuple(r if r in _DONATED else None for r in in_roles)
    elif isinstance(out_roles, (list, tuple)):
        out_roles = tuple(_state_role(r) for r in out_roles)
    else:
        out_roles = _state_role(out_roles)
    return Step(fn=fn, plan=plan, mesh=mesh, in_roles=in_roles, out_roles=out_roles,
                optimizer=optimizer, donate=donate,
                compiler_options=dict(compiler_options) if compiler_options else None)


__all__ = ["ROLES", "Step", "jit_step", "with_shardings"]
