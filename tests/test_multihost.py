"""Multi-host placement for real: 2 JAX processes x 4 CPU devices on loopback.

Each process supplies only its addressable shards (jax.make_array_from_callback
inside tpflax.shard), both run one training step of the tiny Llama on a global
{data: 2, model: 4} mesh with gloo CPU collectives, and the loss and updated
parameters must match the single-process unsharded step. The host variables are
initialised once, here, and handed to both workers (the same values every process
would compute from the seed, without compiling the init three times).
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from _util import FAST_XLA

from tpflax import zoo

WORKER = Path(__file__).with_name("_multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_variables():
    """The tiny Llama's variables on the host, as every process starts from them."""
    key = jax.random.key(0)
    return jax.device_get(jax.jit(zoo.get("llama").init).lower(key).compile(FAST_XLA)(key))


def reference(variables):
    # compiled as the workers compile (their XLA_FLAGS): LLVM's optimisations change a float's last bits
    m = zoo.get("llama")
    batch = jax.device_get(m.make_batch(1, 4))
    tx = optax.sgd(0.1, momentum=0.9)

    def step(v, opt_state, batch):
        loss, g = jax.value_and_grad(lambda p: m.loss({"params": p}, batch))(v["params"])
        u, opt_state = tx.update(g, opt_state, v["params"])
        return {"params": optax.apply_updates(v["params"], u)}, opt_state, loss

    args = (variables, tx.init(variables["params"]), batch)
    new, _, loss = jax.jit(step).lower(*args).compile(FAST_XLA)(*args)
    return float(loss), jax.device_get(new)


@pytest.mark.multiprocess
def test_two_processes_shard_and_step_like_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    logs = [tmp_path / f"{i}.log" for i in range(2)]  # files, not pipes: nobody reads while reference() runs
    variables = host_variables()
    (tmp_path / "variables.pkl").write_bytes(pickle.dumps(variables))
    port = free_port()  # just before the workers bind it
    procs = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), str(i), str(port), str(tmp_path / f"{i}.json"),
                     str(tmp_path / "variables.pkl")],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
        ref_loss, ref_new = reference(variables)  # in this process while the workers start up and compile
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-4000:]
    ref_flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
                for p, x in jax.tree_util.tree_flatten_with_path(ref_new)[0]}
    for i in range(2):
        r = json.loads((tmp_path / f"{i}.json").read_text())
        assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 8, 4)
        # No leaf is fully addressable: each process placed only its own shards.
        assert not r["fully_addressable"] and r["local_shards"] * 2 == r["global_shards"]
        assert r["roundtrip_exact"]
        assert abs(r["loss"] - ref_loss) <= 1e-6 * abs(ref_loss), (r["loss"], ref_loss)
        assert sorted(r["params"]) == sorted(ref_flat)
        for key, want in ref_flat.items():
            np.testing.assert_allclose(np.asarray(r["params"][key], np.float32), want,
                                       rtol=1e-5, atol=1e-6, err_msg=key)
