"""What XLA:TPU reduces a position table's gradient with, split over fsdp or whole (issue 11; tpu_aot_notes.md).

A 1000-row token table and a 640 x 768 position table looked up at ``arange(512)``, either broadcast
to the ids' shape before the lookup (HF's ``position_ids``) or ``[None, :]`` and broadcast by the add,
a dense layer and a head; 8 x 512 ids; the position table pinned by ``rules=``; the adamw step of
``tpflax.make_train_step`` compiled by ``tpflax.dry_run`` for ``tpu-v5e:2x4`` (needs libtpu).

    TPU_SKIP_MDS_QUERY=1 python benchmarks/positional_probe.py     # ~2 min, 8 compiles

Prints, per mesh, lookup and layout, the collectives that carry the position table (its 640 rows, or
the 512 looked-up rows of the batch-free lookup), the estimate's and the compiled bytes per kind.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import tpflax


class Net(nn.Module):
    rows: int = 640
    width: int = 768
    broadcast: bool = True  # the position ids broadcast to the batch before the lookup, as HF's are

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[1]
        pos = jnp.broadcast_to(jnp.arange(t), ids.shape) if self.broadcast else jnp.arange(t)[None, :]
        x = nn.Embed(1000, self.width, name="tok")(ids) + nn.Embed(self.rows, self.width, name="wpe")(pos)
        return nn.Dense(1000, name="head")(nn.Dense(self.width, name="mix")(x))


def run(mesh_shape: dict[str, int], spec: P, broadcast: bool) -> None:
    net, ids = Net(broadcast=broadcast), jax.ShapeDtypeStruct((8, 512), jnp.int32)
    variables = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(variables, mesh_shape, model=net, sample=(ids,), rules=[(r"wpe/embedding$", spec)])
    mesh = tpflax.make_mesh(mesh_shape, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss)
    dr = tpflax.dry_run(ts, p, mesh, keep_hlo=True)
    mine = [(c.kind, c.ring_bytes, c.shapes) for c in dr.collectives
            if "640" in str(c.shapes) or (not broadcast and "(1, 512, 768)" in str(c.shapes))]
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), backend="tpu")
    print(mesh_shape, spec, "broadcast ids" if broadcast else "batch-free ids", "->", mine,
          "| estimate", est.comm, "| compiled", dr.comm(), flush=True)


def main() -> None:
    for mesh_shape in ({"fsdp": 8}, {"fsdp": 2, "model": 4}):
        for broadcast in (True, False):
            for spec in (P("fsdp", None), P(None, None)):
                run(mesh_shape, spec, broadcast)


if __name__ == "__main__":
    main()
