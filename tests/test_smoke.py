"""Smoke subset: one fast test per stage, run by CI on every supported jax.

`.ci/run` runs ``python -m pytest -m smoke`` on Python 3.12 with the newest jax,
flax and optax pip serves, besides the whole suite on the pinned versions. Each
test here takes well under a second of compile on 8 CPU devices.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpflax
from tpflax import zoo
from tpflax.cli import main

pytestmark = pytest.mark.smoke
S = jax.ShapeDtypeStruct


def test_plan_zoo_tree():
    p = tpflax.plan(zoo.get("gpt2").abstract_variables(), {"data": 2, "model": 4})
    assert tuple(p.decisions["params/h_0/mlp/c_fc/kernel"].spec) == (None, "model")
    assert tuple(p.decisions["params/h_0/mlp/c_proj/kernel"].spec) == ("model", None)


def test_plan_json_round_trip():
    p = tpflax.plan(zoo.get("mlp").abstract_variables(), {"model": 4})
    assert tpflax.Plan.from_json(p.to_json()).specs == p.specs


@pytest.mark.parametrize("name", ["llama", "llama-scan"])
def test_traced_plan(name):
    m = zoo.get(name)
    p = tpflax.plan(m.abstract_variables(), {"model": 4}, model=m)
    traced = [d for d in p.decisions.values() if d.source == "trace"]
    assert traced and any(d.strategy == "column" for d in traced)


def test_estimate():
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 4, "model": 2}, fsdp_min_bytes=1024)
    est = tpflax.estimate(p, optax.adamw(1e-3), {"x": (32, 32)}, model=m)
    assert est.per_device.opt_state > 0 and est.comm["all-gather"]["fsdp"] > 0


def test_dry_run_zoo():
    m = zoo.get("mlp")
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), 16), p, mesh)
    assert dr.memory["argument"] and dr.collectives


def test_dry_run_plain_function():
    variables = {"wte": S((64, 32), jnp.float32), "w": S((32, 128), jnp.float32)}

    def apply(v, ids):
        return jnp.tanh(v["wte"][ids] @ v["w"]) @ v["w"].T @ v["wte"].T

    p = tpflax.plan(variables, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    ts = tpflax.make_train_step(apply, p, mesh, optax.adamw(1e-3), sample=(S((8, 16), jnp.int32),))
    assert tpflax.dry_run(ts, p, mesh).memory["argument"] > 0


def test_shard_unshard_bit_exact():
    x = {"w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16), "b": np.arange(16, dtype=jnp.bfloat16)}
    p = tpflax.plan(x, {"data": 2, "model": 4}, rules=[("w", "column")])
    placed = tpflax.shard(x, p, tpflax.make_mesh(p.mesh))
    assert tuple(placed["w"].sharding.spec) == (None, "model")
    back = tpflax.unshard(placed)
    for k in x:
        assert back[k].dtype == x[k].dtype and back[k].tobytes() == x[k].tobytes()


def test_optimizer_state_and_jit_step():
    m = zoo.get("mlp")
    variables = m.init(0)
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    tx = optax.sgd(0.1)
    sv = tpflax.shard(variables, p, mesh)
    so = tpflax.shard_optimizer_state(tx, None, p, mesh, params=sv["params"])

    def step(v, s, batch):
        loss, g = jax.value_and_grad(lambda q: m.loss({"params": q}, batch))(v["params"])
        u, s = tx.update(g, s, v["params"])
        return {"params": optax.apply_updates(v["params"], u)}, s, loss

    _, _, loss = tpflax.jit_step(step, p, mesh, optimizer=tx)(sv, so, tpflax.shard_batch(m.make_batch(0, 8), mesh))
    assert np.isfinite(float(loss))


def test_cli_version_and_plan(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and tpflax.__version__ in capsys.readouterr().out
    assert main(["plan", "gpt2", "--mesh", "data=2,model=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "tpflax.plan"


def test_the_tests_compile_options_are_ones_this_xla_has():
    # tests/_util.py's RUN_XLA/COMM_XLA named an option jaxlib 0.12's XLA:CPU no longer has
    # (xla_cpu_use_fusion_emitters): every test compiling with them failed there. They keep only
    # the options the running XLA takes, and the examples' XLA_FLAGS are spelled from them.
    from _util import COMM_XLA, FAST_XLA, RUN_XLA, xla_flags, xla_takes

    assert xla_takes("xla_backend_optimization_level", 0)
    assert not xla_takes("xla_no_such_option", 1)
    assert RUN_XLA.items() >= FAST_XLA.items()
    assert xla_flags({"xla_a": False, "xla_b": 0}) == "--xla_a=false --xla_b=0"
    f = jax.jit(lambda x: (x * 2).sum())
    for opts in (RUN_XLA, COMM_XLA):
        assert f.lower(jnp.arange(4.0)).compile(opts)(jnp.arange(4.0)) == 12.0
