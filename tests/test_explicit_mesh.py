"""Steps on a mesh with Explicit axis types, ``jax.make_mesh``'s default in jax 0.10.

Such a mesh carries each array's layout in its type, and code written for Auto axes (every unannotated
Flax model) fails to trace: a matmul whose contracting dims are split is "ambiguous" without an
``out_sharding=``. tpflax's steps run such code with the axes Auto (``jax.sharding.auto_axes``), and keep
code written for explicit mode as written.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import RUN_XLA, assert_bit_exact, tiny_lm, zoo_init
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax.hlo import parse_collectives


def _meshes(shape):
    explicit = jax.make_mesh(tuple(shape.values()), tuple(shape))
    assert set(explicit.axis_types) == {AxisType.Explicit}  # jax.make_mesh's default
    return explicit, tpflax.make_mesh(shape)


def _run(step, plan, mesh, tx, variables, batch):
    v = tpflax.shard(variables, plan, mesh)
    o = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    fn = jax.jit(step.fn, in_shardings=step.in_shardings, out_shardings=step.out_shardings)
    compiled = fn.lower(v, o, batch).compile(RUN_XLA)
    return compiled(v, o, batch), compiled


@pytest.mark.parametrize("name,shape", [("llama", {"fsdp": 2, "model": 4}),
                                        ("llama-scan", {"fsdp": 4, "model": 2})])
def test_make_train_step_on_an_explicit_mesh_is_the_auto_meshs_step(name, shape):
    """The zoo's Llama (a linen model, fsdp gathered per layer in the scanned one) trains on jax.make_mesh's
    mesh: before, its step failed to trace ("Contracting dimensions are sharded and it is ambiguous ...").
    It compiles to the Auto mesh's collectives and computes the same values, to the bit: the two programs' HLO is
    the same but for instruction names and metadata (checked when this test was written), so no tolerance is
    needed on any machine."""
    m = zoo.get(name)
    plan = tpflax.plan(m.abstract_variables(), shape)
    explicit, auto = _meshes(shape)
    tx = optax.adamw(1e-3)
    variables, batch = zoo_init(name), m.make_batch(0, 8)
    (got, on_explicit), (want, on_auto) = (
        _run(tpflax.make_train_step(m, plan, mesh, tx, 8), plan, mesh, tx, variables, batch) for mesh in (explicit, auto))
    comm = [sorted((c.kind, c.axes, c.bytes) for c in parse_collectives(c.as_text(), shape)) for c in (on_explicit, on_auto)]
    assert comm[0] == comm[1] and comm[1]
    assert_bit_exact(got, want)
    specs = tpflax.shardings(plan, explicit)
    for a, s in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(specs), strict=True):
        assert a.sharding.spec == s.spec and a.sharding.mesh.axis_types == explicit.axis_types


def test_traced_linen_model_and_hand_written_steps_on_an_explicit_mesh():
    """README's traced step (a linen module, make_train_step with sample=), its hand-written step with
    gathered_loss, and the same step through jit_step all train on jax.make_mesh's mesh, to the same values
    as on the Auto mesh. Each failed to trace before."""
    model = tiny_lm()
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 128)
    variables = model.init(jax.random.key(0), ids)
    shape = {"fsdp": 2, "model": 4}
    plan = tpflax.plan(variables, shape, model=model, sample=(ids,))
    tx = optax.adamw(1e-3)
    explicit, auto = _meshes(shape)
    made = {k: _run(tpflax.make_train_step(model, plan, mesh, tx, sample=(ids,)), plan, mesh, tx, variables, (ids,))[0]
            for k, mesh in (("explicit", explicit), ("auto", auto))}
    assert_bit_exact(made["explicit"], made["auto"])

    def loss(p, ids):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def by_hand(mesh):
        def train_step(v, opt_state, ids):
            value, g = jax.value_and_grad(tpflax.gathered_loss(loss, plan, mesh))(v["params"], ids)
            updates, opt_state = tx.update(g, opt_state, v["params"])
            return {"params": optax.apply_updates(v["params"], updates)}, opt_state, value

        v = tpflax.shard(variables, plan, mesh)
        o = tpflax.shard_optimizer_state(tx, None, plan, mesh)
        ids_on = tpflax.shard_batch(ids, mesh)
        jitted = jax.jit(train_step, in_shardings=(tpflax.shardings(plan, mesh),
                                                   tpflax.optimizer_shardings(tx, plan, mesh),
                                                   tpflax.batch_sharding(mesh)),
                         out_shardings=(tpflax.shardings(plan, mesh), tpflax.optimizer_shardings(tx, plan, mesh), None))
        hand = jitted.lower(v, o, ids_on).compile(RUN_XLA)(v, o, ids_on)
        if mesh is auto:
            return hand, None
        v, o = tpflax.shard(variables, plan, mesh), tpflax.shard_optimizer_state(tx, None, plan, mesh)
        return hand, tpflax.jit_step(train_step, plan, mesh, optimizer=tx, compiler_options=RUN_XLA)(v, o, ids_on)

    (hand_e, step_e), (hand_a, _) = by_hand(explicit), by_hand(auto)
    assert_bit_exact(hand_e, hand_a)
    assert_bit_exact(step_e, hand_a)
    assert_bit_exact(hand_e[2], made["auto"][2])  # the same loss as make_train_step's


def test_code_written_for_explicit_axes_is_kept_as_written():
    """A step annotated for explicit mode (a matmul's out_sharding=) would fail inside auto_axes (its spec names
    an axis made Auto): jit_step and gathered_loss run it as written."""
    shape = {"data": 2, "model": 4}
    explicit, _ = _meshes(shape)
    params = {"w": jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32) / 512}
    plan = tpflax.plan(params, shape, rules=[("w", P(None, "model"))])

    def loss(p, x):
        y = jnp.dot(x, p["w"], out_sharding=NamedSharding(explicit, P("data", "model")))
        return jnp.sum(y ** 2)

    def step(p, x):
        value, g = jax.value_and_grad(tpflax.gathered_loss(loss, plan, explicit))(p, x)
        return jax.tree_util.tree_map(lambda a, b: a - 0.01 * b, p, g), value

    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(explicit, P("data")))
    new, value = tpflax.jit_step(step, plan, explicit, in_roles=("params", "batch"))(tpflax.shard(params, plan, explicit), x)
    want = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum((x @ p["w"]) ** 2)))(params, np.ones((8, 16), np.float32))
    np.testing.assert_allclose(float(value), float(want[0]), rtol=1e-6)
    assert new["w"].sharding.spec == P(None, "model")


def test_a_plain_step_dry_run_on_an_explicit_mesh_says_how_to_fix_it():
    """dry_run of a hand-written function (no roles to lay out its outputs by) on jax.make_mesh's mesh keeps
    jax's error, and says what the mesh's Explicit axes need."""
    model = tiny_lm()
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    shape = {"data": 2, "model": 4}
    plan = tpflax.plan(variables, shape)
    explicit, _ = _meshes(shape)
    with pytest.raises(tpflax.CompileError, match="Explicit axis types.*tpflax.make_train_step") as e:
        tpflax.dry_run(lambda v, ids: model.apply(v, ids).sum(), plan, explicit, (variables, ids))
    assert "ShardingTypeError" in str(e.value)
