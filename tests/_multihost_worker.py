"""One of two JAX processes for test_multihost.py (4 CPU devices each, loopback coordinator).

usage: python _multihost_worker.py PROCESS_ID PORT OUT_JSON VARIABLES_PICKLE

Shards the tiny Llama's variables (the parent's, from VARIABLES_PICKLE) and optimizer
state on a global {data: 2, model: 4} mesh spanning both processes (each process supplies
only its own shards through jax.make_array_from_callback), runs one training step and
writes the loss, a checksum of the gathered parameters and what it saw to OUT_JSON.
"""

import json
import os
import pickle
import sys

# LLVM's optimisations off (the same HLO passes: FAST_XLA in _util.py), as in the parent's reference
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, port, out_path, variables_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

MESH = {"data": 2, "model": 4}
m = zoo.get("llama")
# Every process starts from the same host values (the parent's m.init(0), compiled as here) and keeps
# them on the host.
with open(variables_path, "rb") as f:
    variables = pickle.load(f)
batch = jax.device_get(m.make_batch(1, 4))
tx = optax.sgd(0.1, momentum=0.9)


def step(v, opt_state, batch):
    loss, g = jax.value_and_grad(lambda p: m.loss({"params": p}, batch))(v["params"])
    u, opt_state = tx.update(g, opt_state, v["params"])
    return {"params": optax.apply_updates(v["params"], u)}, opt_state, loss


mesh = tpflax.make_mesh(MESH)  # all 8 global devices
plan = tpflax.plan(variables, MESH)
sv = tpflax.shard(variables, plan, mesh)
leaves = jax.tree_util.tree_leaves(sv)
so = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=sv["params"])
sb = tpflax.shard_batch(batch, mesh)
host_in = tpflax.unshard(sv)  # all-gathered across processes, before sv is donated
seen = {"fully_addressable": any(x.is_fully_addressable for x in leaves),
        "local_shards": sum(len(x.addressable_shards) for x in leaves),
        "global_shards": sum(len(x.sharding.device_set) for x in leaves)}
new, _, loss = tpflax.jit_step(step, plan, mesh, optimizer=tx)(sv, so, sb)
gathered = tpflax.unshard(new)
report = {
    "process_index": jax.process_index(), "process_count": jax.process_count(),
    "devices": jax.device_count(), "local_devices": jax.local_device_count(),
    **seen,
    "roundtrip_exact": all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                           for a, b in zip(jax.tree_util.tree_leaves(host_in),
                                           jax.tree_util.tree_leaves(variables), strict=True)),
    "loss": float(np.asarray(loss.addressable_data(0))),
    "params": {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x).tolist()
               for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]},
}
with open(out_path, "w") as f:
    json.dump(report, f)
jax.distributed.shutdown()
