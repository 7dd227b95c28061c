"""Numerics: one sharded training step equals the unsharded one, for every zoo model.

Every tiny zoo model runs one full step (forward, backward, optax update) on
three CPU-emulated meshes, {model: 8}, {data: 2, model: 4} and {fsdp: 2,
model: 4} (planned with fsdp_min_bytes=0 so fsdp really shards tiny models), and
is compared with the same step compiled for one device.

Tolerances, from measurement (sgd with momentum, float32): the loss differs by
at most 1.0e-7 relative; updated parameters differ by at most 5.5e-7 absolute
(about 5 ulp of 1.0, where norm scales sit) and 1.8e-4 relative for elements
above 1e-3 (a few ulp of the larger terms that cancel into them). So each
element must satisfy |sharded - ref| <= 1e-5 * |ref| + 1e-6: the 1e-5 relative
target, with an absolute floor of ~8 ulp(1.0) for elements whose value is the
rounding remainder of a cancellation. Attention key biases are the extreme
case: their gradient is zero in exact arithmetic (softmax is shift-invariant),
so their update is pure rounding noise (~1e-10) in both programs. Adam would
turn that noise into +-lr steps, which is why the comparison uses sgd momentum.
Reductions are reordered across shards, so bit-exactness is not expected here
(placement itself is bit-exact: see test_apply.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

import tpflax
from tpflax import zoo
from tpflax._src.facts.tree import is_box, unbox

MODELS = ["mlp", "cnn", "gpt2", "llama", "llama-scan", "vit", "lstm", "gru", "moe", "nnx-mlp"]
MESHES = {"model8": {"model": 8}, "data2_model4": {"data": 2, "model": 4},
          "fsdp2_model4": {"fsdp": 2, "model": 4}}
# Backend optimisation level 0 halves LLVM time for these tiny programs; both the
# reference and the sharded step use it, and it does not change XLA's HLO passes.
FAST = {"xla_backend_optimization_level": 0}
RTOL, ATOL, LOSS_RTOL = 1e-5, 1e-6, 1e-6


def make_tx():
    return optax.sgd(0.1, momentum=0.9)


def make_step(m, tx):
    is_nnx = m.framework == "nnx"

    def step(variables, opt_state, batch):
        params = variables if is_nnx else variables["params"]

        def loss_fn(p):
            return m.loss(p if is_nnx else {**variables, "params": p}, batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params if is_nnx else {**variables, "params": params}), opt_state, loss

    return step


@functools.cache
def reference(name):
    """The unsharded step on one device: (model, variables, batch, new variables, loss)."""
    m = zoo.get(name)
    variables = jax.device_get(m.init(0))
    batch = jax.device_get(m.make_batch(1, 4))
    tx = make_tx()
    params = variables if m.framework == "nnx" else variables["params"]
    new, _, loss = jax.jit(make_step(m, tx), compiler_options=FAST)(variables, tx.init(params), batch)
    return m, variables, batch, jax.device_get(new), float(loss)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", MODELS)
def test_sharded_step_matches_unsharded(name, mesh_name):
    m, variables, batch, ref_new, ref_loss = reference(name)
    shape = MESHES[mesh_name]
    mesh = tpflax.make_mesh(shape)
    plan = tpflax.plan(variables, shape, fsdp_min_bytes=0)
    tx = make_tx()
    sv = tpflax.shard(variables, plan, mesh)
    params = sv if m.framework == "nnx" else sv["params"]
    so = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=params)
    step = tpflax.jit_step(make_step(m, tx), plan, mesh, optimizer=tx, compiler_options=FAST)
    new, new_opt, loss = step(sv, so, tpflax.shard_batch(batch, mesh))

    # Sharding really happened, and the outputs keep the plan's layout.
    specs = [d.spec for d in plan.decisions.values()]
    assert any(e is not None for s in specs for e in s), "nothing was sharded"
    if "fsdp" in shape:
        assert any("fsdp" in jax.tree_util.tree_leaves(tuple(s)) for s in specs)
    for path, x in jax.tree_util.tree_flatten_with_path(new, is_leaf=is_box)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        assert unbox(x).sharding.spec == plan.decisions[key].spec, key

    assert abs(float(loss) - ref_loss) <= LOSS_RTOL * abs(ref_loss), (float(loss), ref_loss)
    got = tpflax.unshard(new)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_new)[0]
    for (path, want), have in zip(flat_ref, jax.tree_util.tree_leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=RTOL, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
