"""The bad-input catalogue: every mistake gets a clear tpflax answer.

Each row is one bad input to the public API or the CLI, the exception type (or
exit code) it must produce, and the words its message must contain: the leaf
path or axis, the size, and the fix. A bad input may never end in a bare
traceback from jax or flax internals, a partially placed tree, or a modified
caller tree. Edge inputs that are legal (typed PRNG keys, ``None`` leaves, 0-size
dims, NaN/inf values) are in their own table with what must happen instead.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax
import tpflax.zoo
from tpflax import EstimateError
from tpflax._src.loading import load_model
from tpflax.cli import main

S = jax.ShapeDtypeStruct


def bare_tree():
    """A CLI model factory that returns only a variable tree (no model to trace or train)."""
    return {"up": {"kernel": S((64, 256), "float32")}, "down": {"kernel": S((256, 64), "float32")}}


@functools.cache
def mesh(**axes: int):
    return tpflax.make_mesh(axes)


def tree():
    """A fresh small concrete tree (numpy, so placement copies and never aliases it)."""
    return {"a": {"kernel": np.arange(32, dtype=np.float32).reshape(4, 8)},
            "b": {"kernel": np.arange(32, dtype=np.float32).reshape(8, 4)}}


TREE = tree()
PLAN = tpflax.plan(TREE, {"model": 2})


def plan_json(**edit: Any) -> str:
    """PLAN's JSON with the first decision hand-edited."""
    data = json.loads(PLAN.to_json())
    data["decisions"][0].update(edit)
    return json.dumps(data)


class Dropping(nn.Module):
    """A linen model in training mode: its dropout needs a 'dropout' rng to run."""

    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x))


class Widened(nn.Module):
    """Dropping's Dense at twice the width: another model than PLAN_DROP was made for."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(x)


PLAN_DROP = tpflax.plan({"params": {"Dense_0": {"kernel": S((4, 8), "float32"), "bias": S((8,), "float32")}}},
                        {"model": 2})


def deleted():
    x = jnp.ones((4, 8))
    x.delete()  # what donating it to a jitted step does
    return {"a": {"kernel": x}, "b": {"kernel": np.ones((8, 4), np.float32)}}


def adam_state_as_saved_with_x64():
    """An adam state as a numpy checkpoint written with jax_enable_x64 on gives it back: an int64 count past
    2**32 and float64 moments (shard_optimizer_state narrowed them to int32 and float32 without a word)."""
    st = jax.tree_util.tree_map(np.asarray, optax.adam(1e-3).init(TREE))
    mu = jax.tree_util.tree_map(lambda x: x.astype(np.float64), st[0].mu)
    return (st[0]._replace(count=np.int64(2**32 + 5), mu=mu), st[1])


def train_state(**fields):
    from flax.training import train_state as ts

    return ts.TrainState.create(apply_fn=None, params=TREE, tx=optax.adam(1e-3)).replace(**fields)


def donated(tree_):
    """``tree_`` after a jitted step that donated it: every array deleted."""
    for x in jax.tree_util.tree_leaves(tree_):
        x.delete()
    return tree_


def init_with_outside_rngs():
    """init_sharded of a function closing over an nnx.Rngs made outside it (flax's TraceContextError before)."""
    from flax import nnx

    rngs = nnx.Rngs(0)
    plan = tpflax.plan(nnx.state(nnx.Linear(4, 8, rngs=nnx.Rngs(0))), {"model": 2})
    return tpflax.init_sharded(lambda: nnx.Linear(4, 8, rngs=rngs), plan, mesh(model=2))


def step_with_labels(nnx_module: bool):
    """make_train_step (nnx) or plan(model=) (linen) of a classifier whose call takes its inputs only, given a
    sample that carries the labels (an nnx module's bare TypeError before)."""
    from flax import nnx

    x, y = S((8, 4), "float32"), S((8,), "int32")
    loss = lambda out, x, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()  # noqa: E731
    if nnx_module:
        class Classifier(nnx.Module):
            def __init__(self):
                self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

            def __call__(self, x):
                return self.head(x)

        m = Classifier()
        return tpflax.make_train_step(m, tpflax.plan(m, {"model": 1}), mesh(model=1), optax.sgd(0.1),
                                      sample=(x, y), loss=loss)
    m = nn.Dense(3)
    return tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"model": 1}, model=m, sample=(x, y))


class Bad(NamedTuple):
    id: str
    call: Callable[[], Any]
    error: type[Exception]
    words: tuple[str, ...]
    keeps: Callable[[], Any] | None = None  # a tree factory: the same tree must come through unchanged


BAD = [
    # --- rules and forced specs
    Bad("non-divisible forced spec",
        lambda: tpflax.plan({"w": S((6, 4), "float32")}, {"model": 4}, rules=[("w", P("model"))]),
        tpflax.SpecError, ("w:", "(6, 4)", "size 6", "model=4", "leave dim 0 None")),
    Bad("every bad leaf listed at once",
        lambda: tpflax.plan({"a": S((6,), "float32"), "b": S((10,), "float32")}, {"model": 4},
                            rules=[(".", P("model"))]),
        tpflax.SpecError, ("a:", "size 6", "b:", "size 10", "model=4")),
    Bad("rule names an unknown mesh axis",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=[("w", P("tensor"))]),
        tpflax.RuleError, ("rule 0", "'tensor'", "model=2", "use one of model")),
    Bad("rule with an unknown strategy",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=[("w", "colum")]),
        tpflax.RuleError, ("rule 0", "'colum'", "use one of column")),
    Bad("rule regex that does not compile",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=[("w(", "row")]),
        tpflax.RuleError, ("rule 0", "'w('", "does not compile")),
    Bad("rule that is not a pair",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=["w"]),
        tpflax.RuleError, ("rule 0", "'w'", "(regex, PartitionSpec or strategy) pair")),
    Bad("forced spec longer than the leaf's rank",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=[("w", P(None, None, "model"))]),
        tpflax.SpecError, ("w:", "rank 2", "(4, 4)", "give at most 2 entries")),
    Bad("forced spec using one axis twice",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, rules=[("w", P("model", "model"))]),
        tpflax.SpecError, ("w:", "'model' twice", "only one dim")),
    Bad("forced strategy that cannot apply",
        lambda: tpflax.plan({"w": S((5,), "float32")}, {"model": 2}, rules=[("w", "column")]),
        tpflax.SpecError, ("w:", "(5,)", "model=2", "use another strategy or a PartitionSpec")),
    Bad("threshold that is not a number",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, fsdp_min_bytes="big"),
        tpflax.OptionError, ("fsdp_min_bytes='big'", "non-negative", "fsdp_min_bytes=262144")),
    Bad("negative threshold",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, min_channels=-1),
        tpflax.OptionError, ("min_channels=-1", "non-negative")),
    Bad("stacked= regex that does not compile",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, stacked="("),
        tpflax.RuleError, ("stacked='('", "stacked=r'layers'")),
    Bad("malformed logical_rules",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"model": 2}, logical_rules=[("mlp",)]),
        tpflax.RuleError, ("logical_rules[0]", "('mlp',)", "('mlp', 'model')")),
    # --- meshes and devices
    Bad("mesh string with a duplicate axis",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, "model=2,model=2"),
        tpflax.MeshError, ("'model' appears twice", "give each axis once")),
    Bad("mesh pairs with a duplicate axis",
        lambda: tpflax.mesh_shape([("model", 2), ("model", 4)]),
        tpflax.MeshError, ("'model' appears twice", "must be unique")),
    Bad("mesh axis of size zero",
        lambda: tpflax.plan({"w": S((4, 4), "float32")}, {"data": 2, "model": 0}),
        tpflax.MeshError, ("'model'", "size 0", "integers >= 1")),
    Bad("mesh axis of negative size",
        lambda: tpflax.mesh_shape({"data": -2}),
        tpflax.MeshError, ("'data'", "size -2", "integers >= 1")),
    Bad("mesh string that does not parse",
        lambda: tpflax.mesh_shape("data=2,model"),
        tpflax.MeshError, ("'model'", "not name=size", "'model=4'")),
    Bad("mesh axis with no known role",
        lambda: tpflax.mesh_shape({"x": 2}),
        tpflax.MeshError, ("'x'", "no known role", "axis_roles={'x'")),
    Bad("unknown axis role",
        lambda: tpflax.mesh_shape({"x": 2}, axis_roles={"x": "tensr"}),
        tpflax.MeshError, ("'tensr'", "tensor, fsdp, data, expert")),
    Bad("not a mesh at all",
        lambda: tpflax.mesh_shape(8),
        tpflax.MeshError, ("int", "{'data': 2, 'model': 4}", "AbstractMesh")),
    Bad("more devices than exist",
        lambda: tpflax.make_mesh({"data": 2, "model": 8}),
        tpflax.DeviceError, ("data=2,model=8", "16 devices", "only 8", "device_count=16", "abstract mesh")),
    Bad("the same device twice",
        lambda: tpflax.make_mesh({"model": 2}, devices=[jax.devices()[0]] * 2),
        tpflax.DeviceError, ("model=2", "device id(s) [0]", "2 distinct", "jax.devices()[:n]")),
    Bad("device ids where devices go (a bare AttributeError before)",
        lambda: tpflax.make_mesh({"model": 2}, devices=[0, 1]),
        tpflax.DeviceError, ("model=2", "must be jax devices", "jax.devices()[:2]", "0 (int)")),
    # --- trees
    Bad("empty tree", lambda: tpflax.plan({}, {"model": 2}),
        tpflax.TreeError, ("empty", "model.init(...)", "nnx.state(model)")),
    Bad("tree of None leaves only", lambda: tpflax.plan({"a": None, "b": {"c": None}}, {"model": 2}),
        tpflax.TreeError, ("empty",)),
    Bad("string leaf", lambda: tpflax.plan({"w": S((4,), "float32"), "name": "llama"}, {"model": 2}),
        tpflax.TreeError, ("name:", "str", "remove it")),
    Bad("object-dtype array leaf",
        lambda: tpflax.plan({"w": np.array([object(), object()])}, {"model": 2}),
        tpflax.TreeError, ("w:", "object", "(2,)", "encode it as numbers")),
    Bad("string array leaf", lambda: tpflax.plan({"tok": np.array(["a", "b"])}, {"model": 2}),
        tpflax.TreeError, ("tok:", "<U1", "not numeric")),
    Bad("two leaves with one path",
        lambda: tpflax.plan({"a/b": S((2,), "float32"), "a": {"b": S((2,), "float32")}}, {"model": 2}),
        tpflax.TreeError, ("a/b", "rename one")),
    # --- placing a tree
    Bad("tree changed since planning: shape",
        lambda: tpflax.shard({**TREE, "a": {"kernel": np.ones((4, 6), np.float32)}}, PLAN, mesh(model=2)),
        tpflax.PlanMismatchError, ("a/kernel", "(4, 6)", "(4, 8)", "re-plan")),
    Bad("tree changed since planning: dtype",
        lambda: tpflax.shard({**TREE, "a": {"kernel": np.ones((4, 8), np.float16)}}, PLAN, mesh(model=2)),
        tpflax.PlanMismatchError, ("a/kernel", "float16", "float32", "cast the tree back")),
    Bad("tree changed since planning: a leaf added",
        lambda: tpflax.shard({**TREE, "c": np.ones(3, np.float32)}, PLAN, mesh(model=2)),
        tpflax.PlanMismatchError, ("c:", "(3,)", "not in the plan", "re-plan")),
    Bad("tree changed since planning: a leaf missing",
        lambda: tpflax.shard({"a": TREE["a"]}, PLAN, mesh(model=2)),
        tpflax.PlanMismatchError, ("b/kernel", "missing from the tree", "pass the full tree")),
    Bad("mesh of another shape",
        lambda: tpflax.shard(TREE, PLAN, mesh(model=4)),
        tpflax.PlanMismatchError, ("{'model': 4}", "{'model': 2}", "tpflax.make_mesh({'model': 2})")),
    Bad("abstract mesh for placement",
        lambda: tpflax.shard(TREE, PLAN, tpflax.abstract_mesh({"model": 2})),
        tpflax.PlanMismatchError, ("AbstractMesh", "no devices", "tpflax.make_mesh({'model': 2})")),
    Bad("arguments swapped", lambda: tpflax.shard(PLAN, TREE, mesh(model=2)),
        tpflax.OptionError, ("expected a tpflax.Plan", "dict", "shard(tree, plan, mesh)")),
    Bad("plan for more devices than exist",
        lambda: tpflax.shard({"w": np.ones((16,), np.float32)}, tpflax.plan({"w": S((16,), "float32")},
                                                                           {"model": 16})),
        tpflax.DeviceError, ("model=16", "only 8", "device_count=16")),
    Bad("float64 leaf jax would narrow",
        lambda: tpflax.shard(*(lambda t: (t, tpflax.plan(t, {"model": 2})))({"w": np.arange(8.0) + 1e-12}),
                             mesh(model=2)),
        tpflax.TreeError, ("w:", "float64", "(8,)", "float32", ".astype('float32')", "jax_enable_x64")),
    Bad("int64 leaf jax would narrow",
        lambda: tpflax.shard(*(lambda t: (t, tpflax.plan(t, {"model": 2})))(
            {"step": np.array(2**40, np.int64)}), mesh(model=2)),
        tpflax.TreeError, ("step:", "int64", "int32", ".astype('int32')")),
    Bad("a Python int past int32 (a bare OverflowError from jax before)",
        lambda: tpflax.shard(*(lambda t: (t, tpflax.plan(t, {"model": 2})))(
            {"w": np.ones(4, np.float32), "tokens_seen": 5_000_000_000}), mesh(model=2)),
        tpflax.TreeError, ("tokens_seen:", "Python int 5000000000", "int32", "jax_enable_x64")),
    Bad("a donated (deleted) array", lambda: tpflax.shard(deleted(), PLAN, mesh(model=2)),
        tpflax.TreeError, ("a/kernel", "(4, 8)", "deleted", "donated", "live copy")),
    Bad("an optimizer state with 64-bit leaves jax would narrow",
        lambda: tpflax.shard_optimizer_state(optax.adam(1e-3), adam_state_as_saved_with_x64(), PLAN, mesh(model=2)),
        tpflax.TreeError, ("optimizer state", "0/count", "int64", "int32", "0/mu/a/kernel", "float64",
                           "jax_enable_x64")),
    Bad("a train state whose step jax would narrow",
        lambda: tpflax.shard_train_state(train_state(step=np.int64(2**32 + 5)), PLAN, mesh(model=2)),
        tpflax.TreeError, ("train state", "step:", "int64", "int32")),
    Bad("a donated optimizer state",
        lambda: tpflax.shard_optimizer_state(optax.adam(1e-3), donated(
            tpflax.shard_optimizer_state(optax.adam(1e-3), None, PLAN, mesh(model=2))), PLAN, mesh(model=2)),
        tpflax.TreeError, ("optimizer state", "0/mu/a/kernel", "(4, 8)", "deleted", "donated")),
    Bad("a donated train state",
        lambda: tpflax.shard_train_state(donated(tpflax.shard_train_state(train_state(), PLAN, mesh(model=2))),
                                         PLAN, mesh(model=2)),
        tpflax.TreeError, ("train state", "params/a/kernel", "deleted", "donated")),
    Bad("unshard of a donated tree", lambda: tpflax.unshard(deleted()),
        tpflax.TreeError, ("cannot be read back", "a/kernel", "(4, 8)", "deleted", "live copy")),
    Bad("a donated batch", lambda: tpflax.shard_batch(donated({"x": jnp.ones((4, 3))}), mesh(data=2)),
        tpflax.TreeError, ("the batch", "x:", "(4, 3)", "deleted", "donated")),
    Bad("int64 ids that do not fit int32 (wrapped without a word before: 2**40 + 7 read back as 7)",
        lambda: tpflax.shard_batch({"ids": np.array([2**40 + 7, 5], np.int64)}, mesh(data=2)),
        tpflax.TreeError, ("the batch", "ids:", "int64", "(2,)", "5..1099511627783", "int32", "wrap")),
    Bad("a process-local batch that does not split (jax's bare IndivisibleError before)",
        lambda: tpflax.shard_batch({"ids": np.ones((7, 16), np.int32)}, mesh(data=2, model=4), process_local=True),
        tpflax.SpecError, ("ids:", "(7, 16)", "data=2", "multiple of 2")),
    Bad("batch that does not split",
        lambda: tpflax.shard_batch({"x": np.ones((3, 4), np.float32)}, mesh(data=2)),
        tpflax.SpecError, ("x:", "(3, 4)", "data=2", "multiple of 2")),
    Bad("init_fn returning a leaf that is no array (a bare jax TypeError before)",
        lambda: tpflax.init_sharded(lambda: {"a": {"kernel": jnp.ones((4, 8))}, "b": {"kernel": jnp.ones((8, 4))},
                                             "name": "encoder"}, PLAN, mesh(model=2)),
        tpflax.TreeError, ("the tree init_fn returned has leaves that are not arrays",
                           "name: leaf of type str is not an array")),
    Bad("init chunk size that is not a size (a bare TypeError before)",
        lambda: tpflax.init_sharded(lambda: {"a": {"kernel": jnp.ones((4, 8))}}, PLAN, mesh(model=2),
                                    chunk_bytes="lots"),
        tpflax.OptionError, ("chunk_bytes 'lots' cannot be parsed", "'95GiB'", "None for one program")),
    Bad("init_fn returning another tree",
        lambda: tpflax.init_sharded(lambda k: {"a": {"kernel": jnp.ones((4, 8))}}, PLAN, mesh(model=2),
                                    jax.random.key(0)),
        tpflax.PlanMismatchError, ("b/kernel", "missing from the tree")),
    Bad("optimizer state with a string leaf",
        lambda: tpflax.shard_optimizer_state(optax.sgd(0.1), {"note": "x"}, PLAN, mesh(model=2)),
        tpflax.TreeError, ("note:", "str", "not an array")),
    Bad("optimizer state made for other parameters",
        lambda: tpflax.shard_optimizer_state(optax.adam(1e-3), optax.adam(1e-3).init(
            {"a": {"kernel": jnp.zeros((4, 6))}, "b": {"kernel": jnp.zeros((16, 4))}}), PLAN, mesh(model=2)),
        tpflax.PlanMismatchError, ("a/kernel", "(4, 6)", "optimizer.init(params)")),
    Bad("an optimizer name instead of an optimizer",
        lambda: tpflax.shard_optimizer_state("adam", None, PLAN, mesh(model=2)),
        tpflax.OptionError, ("'adam'", "has no init()", "optax.adamw")),
    Bad("init_fn closing over an nnx.Rngs made outside it", init_with_outside_rngs,
        tpflax.TraceError, ("nnx state created outside it",
                            "create the nnx.Rngs inside the function", "pass it as a positional argument")),
    Bad("init_sharded given a non-callable",
        lambda: tpflax.init_sharded(42, PLAN, mesh(model=2)),
        tpflax.OptionError, ("init_fn must be callable", "int")),
    Bad("report of something that is not a plan",
        lambda: tpflax.report(42),
        tpflax.OptionError, ("expects a tpflax.Plan", "int", "tpflax.plan(tree, mesh)")),
    Bad("step with an unknown argument role",
        lambda: tpflax.jit_step(lambda p: p, PLAN, mesh(model=2), in_roles=("parms",)),
        tpflax.PlanMismatchError, ("'parms'", "use one of")),
    Bad("plan.spec of a mistyped path (a bare KeyError before)", lambda: PLAN.spec("a/kernal"),
        tpflax.UnknownPathError, ("'a/kernal'", "not a leaf of this plan", "did you mean 'a/kernel'")),
    Bad("plan.decisions of a mistyped path", lambda: PLAN.decisions["b/kernal"],
        KeyError, ("'b/kernal'", "did you mean 'b/kernel'")),
    # --- plan JSON
    Bad("plan JSON from a newer format version",
        lambda: tpflax.Plan.from_json(json.dumps({**json.loads(PLAN.to_json()), "version": 99})),
        tpflax.PlanFormatError, ("version 99", "reads versions 1..3", "upgrade tpflax or re-plan")),
    Bad("plan JSON that does not parse", lambda: tpflax.Plan.from_json("{nope"),
        tpflax.PlanFormatError, ("does not parse", "Plan.to_json()")),
    Bad("JSON that is not a plan", lambda: tpflax.Plan.from_json("[]"),
        tpflax.PlanFormatError, ("not a tpflax plan", "format='tpflax.plan'")),
    Bad("plan JSON edited to a non-divisible spec",
        lambda: tpflax.Plan.from_json(plan_json(shape=[5, 8], bytes=160, spec=["model", None])),
        tpflax.PlanFormatError, ("a/kernel", "size 5", "model=2", "re-plan")),
    Bad("plan JSON edited to an unknown dtype", lambda: tpflax.Plan.from_json(plan_json(dtype="float99")),
        tpflax.PlanFormatError, ("a/kernel", "'float99'", "'float32'")),
    Bad("plan JSON edited to a wrong byte count",
        lambda: tpflax.Plan.from_json(plan_json(bytes_per_device=1)),
        tpflax.PlanFormatError, ("a/kernel", "bytes_per_device 1", "gives 64", "re-plan")),
    Bad("plan JSON edited to a negative dim", lambda: tpflax.Plan.from_json(plan_json(shape=[-4, 8])),
        tpflax.PlanFormatError, ("a/kernel", "(-4, 8)", "negative")),
    Bad("plan JSON with a path listed twice",
        lambda: tpflax.Plan.from_json(json.dumps({**json.loads(PLAN.to_json()), "decisions": 2 * json.loads(
            PLAN.to_json())["decisions"]})),
        tpflax.PlanFormatError, ("a/kernel", "2 times", "keep one entry per leaf")),
    Bad("plan JSON missing a field", lambda: tpflax.Plan.from_json(plan_json(shape=None)),
        tpflax.PlanFormatError, ("malformed", "Plan.to_json()")),
    # --- estimate, loading, report, checkpoints, tracing
    Bad("global batch that does not divide",
        lambda: tpflax.estimate(tpflax.plan(TREE, {"data": 2, "model": 2}), None, {"x": (3, 4)}),
        EstimateError, ("global batch 3", "data=2", "multiple of 2")),
    *(Bad(f"estimate at batch={b!r} ({was})",
          lambda b=b: tpflax.estimate(PLAN, optax.adam(1e-3), b, model=lambda v, x: x @ v["a"]["kernel"],
                                      sample=(S((2, 4), "float32"),)),
          EstimateError, (f"batch={b!r}", "not a positive whole number", "batch=8"))
      for b, was in ((-8, "negative activation bytes before"), (0, "priced as no activations before"),
                     (8.5, "'the global batch 1 does not divide' before"))),
    Bad("estimate at a bare shape with a zero dim",
        lambda: tpflax.estimate(PLAN, optax.adam(1e-3), (8, 0), model=lambda v, x: x @ v["a"]["kernel"],
                                sample=(S((2, 4), "float32"),)),
        EstimateError, ("batch=(8, 0)", "not a positive whole number", "(8, 64)")),
    *(Bad(f"a training step at batch={b} (built with inputs of that leading dim before)",
          lambda b=b: tpflax.make_train_step(lambda v, x: x @ v["a"]["kernel"], PLAN, mesh(model=2), optax.sgd(0.1),
                                             b, sample=(S((2, 4), "float32"),), loss=lambda out, x: out.mean()),
          tpflax.OptionError, (f"batch={b}", "not a positive whole number", "batch=8"))
      for b in (0, -2)),
    Bad("unknown activation dtype", lambda: tpflax.estimate(PLAN, None, {"x": (2, 4)}, act_dtype="float99"),
        EstimateError, ("act_dtype='float99'", "'bfloat16'")),
    Bad("integer gradient dtype", lambda: tpflax.estimate(PLAN, None, {"x": (2, 4)}, grad_dtype="int8"),
        EstimateError, ("grad_dtype='int8'", "not a floating dtype", "'bfloat16'")),
    Bad("boolean activation dtype", lambda: tpflax.estimate(PLAN, None, {"x": (2, 4)}, act_dtype=bool),
        EstimateError, ("act_dtype=<class 'bool'>", "not a floating dtype")),
    Bad("optimizer that is not an optax transformation", lambda: tpflax.estimate(PLAN, "adam", {"x": (2, 4)}),
        EstimateError, ("optimizer 'adam' is a name", "pass the optax optimizer itself", "optax.adam(1e-3)")),
    Bad("an object that is no optax transformation", lambda: tpflax.estimate(PLAN, object(), {"x": (2, 4)}),
        EstimateError, ("of type object is no optax.GradientTransformation", "it has no init()")),
    Bad("an input whose batch is not its leading dim (Transformer-XL's memory laid out (layers, batch, ...)): "
        "was 'use a batch size that is a multiple of 2' with a batch of 8",
        lambda: tpflax.make_train_step(lambda v, x, mems: x @ v["a"]["kernel"] + mems[0],
                                       tpflax.plan(TREE, {"data": 2}), mesh(data=2), optax.sgd(0.1),
                                       sample=(S((8, 4), "float32"), S((3, 8, 8), "float32")),
                                       loss=lambda out, x, mems: out.mean()),
        tpflax.SpecError, ("1:", "(3, 8, 8)", "leading dim (3", "taken as the batch", "lead with 8 examples",
                           "If its batch is dim 1", "sharding=NamedSharding(mesh, P(None, 'data'))", "batch=8")),
    Bad("an optimizer name for a training step",  # was an EstimateError from inside the cost model
        lambda: tpflax.make_train_step(lambda v, x: x @ v["a"]["kernel"], PLAN, mesh(model=2), "adamw",
                                       sample=(S((2, 4), "float32"),), loss=lambda out, x: out.mean()),
        tpflax.OptionError, ("'adamw'", "not an optax GradientTransformation", "optax.adamw(1e-3)")),
    Bad("estimate with a loss that is not a scalar (priced; make_train_step refuses it)",
        lambda: tpflax.estimate(PLAN, optax.adam(1e-3), model=lambda v, x: x @ v["a"]["kernel"] @ v["b"]["kernel"],
                                sample=(S((2, 4), "float32"),), loss=lambda out, x: out),
        tpflax.OptionError, ("loss= must return one float scalar", "float32[2, 4]")),
    Bad("an nnx classifier's step given a sample with labels its call does not take", lambda: step_with_labels(True),
        tpflax.OptionError, ("takes 2 positional arguments", "labels too", "def __call__(self, x, y=None)",
                             "nnx.merge(graphdef, state)(x)")),  # the function form for nnx, too
    Bad("a linen classifier traced on a sample with labels its call does not take", lambda: step_with_labels(False),
        tpflax.TraceError, ("takes 2 positional arguments", "labels too", "fn(variables, *sample)")),
    Bad("estimate of something that is not a plan", lambda: tpflax.estimate(None, None, {"x": (2, 4)}),
        EstimateError, ("expected a tpflax.Plan", "NoneType", "tpflax.plan(tree, mesh)")),
    Bad("model factory string that does not import", lambda: load_model("no_such_pkg.models:make"),
        tpflax.ModelLoadError, ("'no_such_pkg.models'", "cannot import", "PYTHONPATH")),
    Bad("model factory returning None (planned as an empty tree before)", lambda: load_model("gc:enable"),
        tpflax.ModelLoadError, ("gc:enable() returned NoneType None", "neither a model nor a variable tree")),
    Bad("device memory that is not finite (a bare OverflowError before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("mlp"), 8, float("inf")),
        tpflax.SuggestError, ("device memory", "inf", "finite number of bytes")),
    Bad("less than a byte of device memory (read as none before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("mlp"), 8, 0.5),
        tpflax.SuggestError, ("0.5", "at least 1")),
    Bad("an ICI bandwidth that is NaN (a bare ValueError from the ranking before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("mlp"), 8, "1GiB", ici_bandwidth=float("nan")),
        tpflax.SuggestError, ("nan", "finite rate of at least 1 byte/s")),
    Bad("a DCN bandwidth too small to price (an Infinity in --json before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("mlp"), 8, "1GiB", dcn_bandwidth=1e-320),
        tpflax.SuggestError, ("1e-320", "at least 1 byte/s")),
    Bad("a reserve given as text (a bare TypeError before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("mlp"), 8, "1GiB", reserve="0.1"),
        tpflax.SuggestError, ("'0.1'", "[0, 1)", "fraction of device memory")),
    Bad("a zoo model's batch of another sequence length (ranked anyway, an AttributeError with verify= before)",
        lambda: tpflax.suggest_mesh(tpflax.zoo.get("gpt2"), 8, "64MiB", optimizer=optax.adamw(1e-3),
                                    batch=(12, 64), verify=1),
        tpflax.SuggestError, ("batch (12, 64)", "gpt2", "(32,) per example", "seq_len=64", "(12, 32)")),
    Bad("report of a plan with another mesh's estimate (rendered together before)",
        lambda: tpflax.report(PLAN, tpflax.estimate(tpflax.plan(TREE, {"data": 2}), optax.adam(1e-3), (8, 4))),
        tpflax.PlanMismatchError, ("estimate was made for mesh data=2", "the plan is for model=2",
                                   "tpflax.estimate(plan")),
    Bad("notebook report of a plan with another mesh's estimate (rendered together before)",
        lambda: tpflax.show(PLAN, tpflax.estimate(tpflax.plan(TREE, {"data": 2}), optax.adam(1e-3), (8, 4))),
        tpflax.PlanMismatchError, ("estimate was made for mesh data=2", "the plan is for model=2")),
    Bad("report of no width (textwrap's bare ValueError before)", lambda: tpflax.report(PLAN, width=0),
        tpflax.OptionError, ("width 0", "positive number of columns")),
    Bad("a negative layer count among the config hints (negative activation bytes before)",
        lambda: tpflax.estimate(PLAN, optax.adam(1e-3), (8, 32), config={"d_model": 64, "n_layers": -2,
                                                                          "seq_len": 32, "n_heads": 4}),
        tpflax.EstimateError, ("n_layers=-2", "positive whole number")),
    Bad("zoo size the model does not have", lambda: tpflax.zoo.get("llama-2-7b", size="tiny"),
        tpflax.ModelLoadError, ("'llama-2-7b'", "'tiny'", "available: real")),
    Bad("report in an unknown format", lambda: tpflax.report(PLAN, fmt="xml"),
        tpflax.OptionError, ("'xml'", "'text', 'json' or 'html'")),
    Bad("why file that cannot be written (a bare OSError before)",
        lambda: tpflax.report(PLAN, why="/nonexistent/dir/why.txt"),
        tpflax.OptionError, ("why='/nonexistent/dir/why.txt'", "cannot be written", "directory that exists")),
    Bad("why given as no path (a bare TypeError from pathlib before)", lambda: tpflax.report(PLAN, why=True),
        tpflax.OptionError, ("why=True", "file path")),
    Bad("checkpoint that does not exist",
        lambda: tpflax.restore_checkpoint("/nonexistent/tpflax-ckpt", PLAN, mesh(model=2)),
        tpflax.CheckpointError, ("/nonexistent/tpflax-ckpt", "check the path")),
    Bad("tracing a module without sample inputs",
        lambda: tpflax.plan({"params": {"kernel": S((4, 8), "float32"), "bias": S((8,), "float32")}},
                            {"model": 2}, model=nn.Dense(8)),
        tpflax.TraceError, ("Dense", "sample=(x,)")),
    Bad("estimate of a model function that cannot run (priced by the formula, 'pass model=', before)",
        lambda: tpflax.estimate(PLAN, optax.adam(1e-3), model=lambda v, x: x @ v["no_such"]["kernel"],
                                sample=(S((2, 4), "float32"),)),
        tpflax.TraceError, ("could not trace", "KeyError", "no_such")),
    Bad("estimate of another model than the plan's (its activations priced beside the plan's parameters before)",
        lambda: tpflax.estimate(PLAN_DROP, optax.adam(1e-3), model=Widened(), sample=(S((2, 4), "float32"),)),
        tpflax.PlanMismatchError, ("not the model the plan was made for", "Dense_0/kernel", "(4, 8)", "(4, 16)")),
    Bad("estimate of a model whose call needs a dropout rng (a bare flax InvalidRngError before)",
        lambda: tpflax.estimate(PLAN_DROP, None, {"x": (2, 4)}, model=Dropping(), sample=(S((2, 4), "float32"),)),
        tpflax.TraceError, ("Dropping", "InvalidRngError", "rngs={'dropout'")),
]


def _snapshot(tree_):
    return [(np.asarray(x).tobytes(), np.shape(x)) if not (isinstance(x, jax.Array) and x.is_deleted())
            else "deleted" for x in jax.tree_util.tree_leaves(tree_)]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_gets_a_clear_error(case):
    before = _snapshot(TREE)
    with pytest.raises(case.error) as info:
        case.call()
    assert isinstance(info.value, tpflax.TpflaxError)
    message = str(info.value)
    missing = [w for w in case.words if w not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    assert _snapshot(TREE) == before  # the caller's tree is never modified, even on failure


def test_catalogue_is_large_enough():
    assert len(BAD) >= 30 and len({c.id for c in BAD}) == len(BAD)


def test_failed_placement_leaves_caller_arrays_alive():
    live = {"a": {"kernel": jnp.arange(24.0).reshape(4, 6)}, "b": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(tpflax.PlanMismatchError):
        tpflax.shard(live, PLAN, mesh(model=2))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(live))
    assert float(live["a"]["kernel"].sum()) == sum(range(24))


# ---------------------------------------------------------------------------
# warnings: the plan or the placement goes ahead, and says what looked wrong

def test_rule_matching_nothing_is_a_warning():
    p = tpflax.plan(TREE, {"model": 2}, rules=[("zzz", "row")])
    assert any("rule 0 ('zzz' -> row) matches no leaf" in w and "Plan.decisions paths" in w for w in p.warnings)


def test_overlapping_rules_are_a_warning():
    p = tpflax.plan(TREE, {"model": 2}, rules=[("kernel", "row"), ("a/kernel", "column")])
    assert p.decisions["a/kernel"].spec == P("model", None)  # first match wins
    assert any("rule 1" in w and "never wins" in w and "earlier rule" in w for w in p.warnings)


def test_annotation_naming_a_missing_axis_is_a_warning():
    # "ep" (expert) is a role the mesh lacks (a role the mesh has, e.g. "tensor", is read as its axis)
    boxed = {"w": nn.Partitioned(np.ones((4, 8), np.float32), names=(None, "ep"))}
    p = tpflax.plan(boxed, {"model": 2})
    assert p.decisions["w"].spec == P(None, None)
    assert any("w:" in w and "'ep'" in w and "dim 1 left unsharded" in w for w in p.warnings)


def test_nan_and_inf_are_placed_bit_exact_with_a_warning():
    bad = np.array([np.nan, np.inf, -np.inf, 1.0, -0.0, 2.5, np.nan, 0.0], np.float32)
    bad.view(np.uint32)[6] = 0x7FC0_1234  # a NaN with a payload must survive too
    t = {"w": bad, "ok": np.ones(4, np.float32)}
    p = tpflax.plan(t, {"model": 2}, rules=[("w", P("model"))])
    with pytest.warns(tpflax.TpflaxWarning, match=r"w \(shape \(8,\), float32\): 4 NaN/inf") as rec:
        placed = tpflax.shard(t, p, mesh(model=2))
    assert "ok" not in str(rec[0].message)
    assert placed["w"].sharding.spec == P("model")
    assert tpflax.unshard(placed)["w"].tobytes() == bad.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpflax.shard(t, p, mesh(model=2), check_finite=False)


# ---------------------------------------------------------------------------
# legal edge inputs: what must happen instead of an error

def test_typed_prng_key_leaves_are_replicated_and_round_trip():
    keys = {"rng": jax.random.split(jax.random.key(0), 4), "w": np.ones((4, 4), np.float32)}
    p = tpflax.plan(keys, {"model": 2})
    assert p.decisions["rng"].strategy == "replicate" and p.decisions["rng"].dtype.startswith("key<")
    forced = tpflax.plan(keys, {"model": 2}, rules=[("rng", P("model"))])
    for plan_, per_shard in ((p, False), (forced, True)):
        placed = tpflax.shard(keys, plan_, mesh(model=2), per_shard=per_shard)
        back = tpflax.unshard(placed)["rng"]
        assert jnp.array_equal(jax.random.key_data(back), jax.random.key_data(keys["rng"]))


def test_none_leaves_are_kept_as_none():
    t = {"w": np.ones((4, 4), np.float32), "no_bias": None}
    p = tpflax.plan(t, {"model": 2})
    assert list(p.decisions) == ["w"]
    placed = tpflax.shard(t, p, mesh(model=2))
    assert placed["no_bias"] is None and placed["w"].shape == (4, 4)


def test_zero_size_dims_plan_and_place():
    t = {"empty": np.ones((0, 8), np.float32), "w": np.ones((4, 8), np.float32)}
    p = tpflax.plan(t, {"model": 2}, rules=[("empty", P(None, "model"))])
    assert p.decisions["empty"].bytes == 0 and p.decisions["empty"].bytes_per_device == 0
    placed = tpflax.shard(t, p, mesh(model=2))
    assert tpflax.unshard(placed)["empty"].shape == (0, 8)


def test_zero_size_leaf_beside_a_column_row_pair_is_replicated_and_moves_no_other_leaf():
    """Regression: a (0, 64) leaf beside an MLP divided the fused-kernel search by its 0 width
    (ZeroDivisionError), and with fsdp it was split over fsdp though it holds nothing.
    A scanned stack of zero layers crashed the same way."""
    mlp = {"up": {"kernel": np.ones((64, 256), np.float32)}, "down": {"kernel": np.ones((256, 64), np.float32)}}
    t = {**mlp, "empty": np.zeros((0, 64), np.float32)}
    for axes in ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4}):
        p = tpflax.plan(t, axes, fsdp_min_bytes=0)
        d = p.decisions["empty"]
        assert (d.spec, d.strategy, d.reason) == (P(None, None), "replicate", "zero-size leaf: nothing to split")
        assert {k: p.decisions[k].spec for k in ("up/kernel", "down/kernel")} == \
            {k: d.spec for k, d in tpflax.plan(mlp, axes, fsdp_min_bytes=0).decisions.items()}
        placed = tpflax.shard(t, p, mesh(**axes))
        assert tpflax.unshard(placed)["empty"].shape == (0, 64) and placed["empty"].sharding.spec == P(None, None)
    # a scanned stack of no layers divided the pricing of its options by its layer count (0)
    stack = {"layers": {"mlp": {"up": {"kernel": S((0, 64, 256), "float32")},
                                "down": {"kernel": S((0, 256, 64), "float32")}}}}
    p = tpflax.plan(stack, {"fsdp": 2, "model": 4}, stacked={"layers": 0})
    assert {d.spec for d in p.decisions.values()} == {P(None, None, None)}



def test_a_python_float_param_is_planned_as_the_float32_jax_holds(tmp_path):
    """Regression: ``self.param("temperature", lambda _: 0.07)`` leaves a Python float in linen's
    variables. It was planned as float64, which jax cannot hold (x64 off): shard placed float32, and
    then restore_checkpoint with that very plan and make_train_step both refused the float32 leaf."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(x) / self.param("temperature", lambda _: 0.07)

    x = jnp.ones((8, 16))
    v = Net().init(jax.random.key(0), x)
    assert type(v["params"]["temperature"]) is float
    p = tpflax.plan(v, {"data": 2, "model": 4})
    d = p.decisions["params/temperature"]
    assert (d.dtype, d.bytes) == ("float32", 4)
    placed = tpflax.shard(v, p, mesh(data=2, model=4))
    assert placed["params"]["temperature"].dtype == np.float32
    tpflax.save_checkpoint(tmp_path / "ck", placed, plan=p)
    back = tpflax.restore_checkpoint(tmp_path / "ck", p, mesh(data=2, model=4))
    assert float(back["params"]["temperature"]) == float(np.float32(0.07))
    ts = tpflax.make_train_step(Net(), p, mesh(data=2, model=4), optax.sgd(0.1), sample=(x,),
                                loss=lambda out, x: jnp.mean(out ** 2))
    assert ts.args[0]["params"]["temperature"].dtype == np.float32


# ---------------------------------------------------------------------------
# the CLI: exit codes, streams, help

class Cli(NamedTuple):
    id: str
    argv: tuple[str, ...]
    code: int
    words: tuple[str, ...]


CLI = [
    Cli("no subcommand", (), 2, ("required: command",)),
    Cli("unknown subcommand", ("bogus",), 2, ("invalid choice: 'bogus'",)),
    Cli("missing --mesh", ("plan", "gpt2"), 2, ("required: --mesh",)),
    Cli("--mesh that does not parse", ("plan", "gpt2", "--mesh", "data=2,model"), 2,
        ("'model' is not name=size", "'model=4'")),
    Cli("--mesh with a zero axis", ("plan", "gpt2", "--mesh", "model=0"), 2, ("'model'", "size 0")),
    Cli("--mesh with a duplicate axis", ("plan", "gpt2", "--mesh", "model=2,model=2"), 2,
        ("'model' appears twice",)),
    Cli("--mesh axis with no role", ("plan", "gpt2", "--mesh", "x=2"), 2, ("'x'", "axis_roles")),
    Cli("--axis-role not NAME=ROLE", ("plan", "gpt2", "--mesh", "x=2", "--axis-role", "x"), 2,
        ("--axis-role 'x'", "'x=tensor'")),
    Cli("unknown zoo model", ("plan", "gpt5", "--mesh", "model=2"), 2, ("unknown model 'gpt5'", "gpt2")),
    Cli("factory that does not import", ("plan", "no_such_pkg.models:make", "--mesh", "model=2"), 2,
        ("cannot import 'no_such_pkg.models'", "PYTHONPATH")),
    Cli("factory that is not there", ("plan", "json:make_model", "--mesh", "model=2"), 2,
        ("no callable 'make_model'",)),
    Cli("factory returning strings", ("plan", "tpflax.zoo:names", "--mesh", "model=2"), 2,
        ("- 0: leaf of type str", "not an array")),
    Cli("factory returning a bare number (planned as a one-leaf tree before)",
        ("plan", "os:getpid", "--mesh", "model=2"), 2,
        ("os:getpid() returned int", "neither a model nor a variable tree", "(module, *sample)")),
    Cli("zoo size the model lacks", ("plan", "llama-2-7b", "--size", "tiny", "--mesh", "model=2"), 2,
        ("'llama-2-7b'", "'tiny'", "available: real")),
    Cli("--rule without =", ("plan", "gpt2", "--mesh", "model=2", "--rule", "nonsense"), 2,
        ("'nonsense'", "REGEX=TARGET")),
    Cli("--rule naming an unknown axis", ("plan", "gpt2", "--mesh", "model=2", "--rule", "c_fc=colum"), 2,
        ("names mesh axis 'colum'",)),
    Cli("--rule that does not divide", ("plan", "gpt2", "--mesh", "model=3", "--rule", "c_fc/kernel=None,model"),
        2, ("params/h_0/mlp/c_fc/kernel", "model=3", "not divisible")),
    Cli("negative --fsdp-min-bytes", ("plan", "gpt2", "--mesh", "model=2", "--fsdp-min-bytes", "-5"), 2,
        ("--fsdp-min-bytes: '-5' is not a size", "1GiB, 512KiB, 256k, 1e6")),
    Cli("more devices than exist", ("plan", "gpt2", "--mesh", "model=16", "--devices", "8"), 2,
        ("needs 16 devices", "only 8")),
    Cli("--batch that does not parse", ("estimate", "gpt2", "--mesh", "model=2", "--batch", "abc"), 2,
        ("--batch 'abc'", "32x1024")),
    Cli("--batch that does not divide", ("estimate", "gpt2", "--mesh", "data=2,model=2", "--batch", "3"), 2,
        ("global batch 3", "data=2", "multiple of 2")),
    Cli("--optimizer unknown", ("estimate", "gpt2", "--mesh", "model=2", "--optimizer", "adamx"), 2,
        ("invalid choice: 'adamx'",)),
    Cli("--act-dtype unknown", ("estimate", "gpt2", "--mesh", "model=2", "--act-dtype", "float99"), 2,
        ("act_dtype='float99'",)),
    Cli("--json with an --html path that cannot be written (the JSON was printed, then exit 2)",
        ("plan", "mlp", "--mesh", "model=2", "--json", "--html", "/nonexistent/dir/r.html"), 2,
        ("/nonexistent/dir/r.html",)),
    Cli("estimate --json with an --html path that cannot be written",
        ("estimate", "mlp", "--mesh", "model=2", "--json", "--html", "/nonexistent/dir/r.html"), 2,
        ("/nonexistent/dir/r.html",)),
    Cli("--grad-dtype int8", ("estimate", "gpt2", "--mesh", "model=2", "--grad-dtype", "int8"), 2,
        ("grad_dtype='int8'", "not a floating dtype")),
    Cli("--trace on a bare tree", ("plan", "test_bad_inputs:bare_tree", "--mesh", "model=2", "--trace"), 2,
        ("--trace needs a model", "(fn, variables, *sample)")),
    Cli("dry-run of a bare tree", ("dry-run", "test_bad_inputs:bare_tree", "--mesh", "model=2"), 2,
        ("dry-run needs a model", "(linen_module, *sample)")),
    Cli("--json with a bad input", ("plan", "gpt2", "--mesh", "model=0", "--json"), 2, ("size 0",)),
]


def run_cli(argv, capsys):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CLI, ids=[c.id for c in CLI])
def test_cli_bad_input_exits_2_on_stderr(case, capsys):
    code, out, err = run_cli(case.argv, capsys)
    assert code == case.code
    assert out == ""  # nothing on stdout: a script piping --json never reads an error as data
    missing = [w for w in case.words if w not in err]
    assert not missing, f"stderr lacks {missing}:\n{err}"
    assert "Traceback" not in err


def test_cli_json_goes_to_stdout_only(capsys):
    code, out, err = run_cli(("plan", "mlp", "--mesh", "data=2,model=4", "--json"), capsys)
    assert code == 0 and err == ""
    assert json.loads(out)["format"] == "tpflax.plan"
    code, out, err = run_cli(("estimate", "mlp", "--mesh", "data=2,model=4", "--json"), capsys)
    assert code == 0 and err == "" and "estimate" in json.loads(out)


def test_cli_strict_exits_1_on_warnings(capsys):
    argv = ("plan", "mlp", "--mesh", "model=2", "--rule", "matches_nothing=replicate")
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "matches no leaf" in out
    code, out, _ = run_cli(argv + ("--strict",), capsys)
    assert code == 1 and "matches no leaf" in out
    code, _, _ = run_cli(("plan", "mlp", "--mesh", "model=2", "--strict"), capsys)
    assert code == 0  # --strict alone is not a failure


@pytest.mark.parametrize("sub", [(), ("plan",), ("estimate",), ("dry-run",), ("zoo",)])
def test_cli_help_has_examples(sub, capsys):
    code, out, err = run_cli(sub + ("--help",), capsys)
    assert code == 0 and err == ""
    assert "example" in out and "tpflax " in out.split("example", 1)[1]


def test_cli_bad_input_in_a_real_process_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "tpflax.cli", "plan", "gpt2", "--mesh", "model=3", "--rule",
                        "c_fc/kernel=None,model"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("tpflax: error:") and "Traceback" not in r.stderr
    assert "params/h_0/mlp/c_fc/kernel" in r.stderr and "not divisible" in r.stderr


def test_shard_of_an_abstract_tree_says_what_to_use_instead():
    # the trees plan() accepts (jax.eval_shape output) cannot be placed: a TreeError names a leaf and
    # points to init_sharded / shardings, where numpy raised from inside the finiteness check
    import flax.linen as nn

    v = jax.eval_shape(nn.Dense(8).init, jax.random.key(0), jnp.ones((2, 4)))
    p = tpflax.plan(v, {"model": 2})
    with pytest.raises(tpflax.TreeError, match=r"abstract.*params/bias.*init_sharded"):
        tpflax.shard(v, p, tpflax.make_mesh({"model": 2}))


def test_rule_written_against_a_boxed_leafs_value_path_says_where_the_path_ends():
    # jax.tree_util on a tree of flax boxes (nn.with_logical_partitioning) names each array .../kernel/value;
    # tpflax's paths end at the box. A rule built from the former matched nothing, with no hint why
    import flax.linen as nn

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                        ("embed", "mlp")))(x)

    v = jax.eval_shape(Boxed().init, jax.random.key(0), jnp.ones((1, 4)))
    path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(v)[0][1][0], simple=True, separator="/")
    assert path == "params/Dense_0/kernel/value"
    p = tpflax.plan(v, {"model": 2}, rules=[(f"^{path}$", "replicate"), ("zzz", "row")])
    assert p.warnings[0] == (
        "rule 0 ('^params/Dense_0/kernel/value$' -> replicate) matches no leaf (it matches "
        "params/Dense_0/kernel/value: a flax-boxed leaf's path ends at the box, params/Dense_0/kernel); "
        "check the regex against Plan.decisions paths")
    assert p.warnings[1] == "rule 1 ('zzz' -> row) matches no leaf; check the regex against Plan.decisions paths"


def test_a_refused_report_writes_no_why_file(tmp_path):
    """The why file is written once the arguments are known good (it was written, then fmt="xml" refused)."""
    path = tmp_path / "why.txt"
    with pytest.raises(tpflax.OptionError, match="'xml'"):
        tpflax.report(PLAN, fmt="xml", why=path)
    assert not path.exists()
    tpflax.report(PLAN, why=path)
    assert "a/kernel" in path.read_text()
