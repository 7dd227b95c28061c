"""What XLA:TPU reports as a tiny step's memory when a token table is split on its features (no TPU used).

Run: python benchmarks/tpu_tiny_temp.py          (needs libtpu; about 2 minutes)
     python benchmarks/tpu_tiny_temp.py --target tpu-v5p:2x2x2    (the LM on another topology)
     python benchmarks/tpu_tiny_temp.py --hf     (also the three third-party encoders; about 8 more minutes)

For each program, the table kept whole over model (split over fsdp/data as planned) and split on its features
over model, the rest of the plan as ``tpflax.plan`` chose it, the adamw step compiled for ``tpu-v5e:2x4``. Printed
per plan: XLA:TPU's own ``temp_size_in_bytes`` and ``peak_memory_in_bytes`` (its heap simulation), tpflax's peak
and reserved bytes (``dry_run``, ``tpflax._src.compiled``: the larger of argument + output - alias + temp and that
simulated peak, with the temp block's 16 KiB slots of tuple index tables set apart as ``reserved`` where they are
its larger part) and the compiled collective bytes. What it showed: ``benchmarks/tpu_aot_notes.md`` (round 57, the
feature-split table's "temp blow-up"; round 58, the slots set apart).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402
import tpflax._src.compiled as compiled_mod  # noqa: E402

_RAW: dict[str, int] = {}
_read_memory = compiled_mod.read_memory


def _recording(compiled, platform, warnings, *hlo_text):
    ma = compiled.memory_analysis()
    _RAW.update(temp=int(ma.temp_size_in_bytes), peak=int(ma.peak_memory_in_bytes))
    return _read_memory(compiled, platform, warnings, *hlo_text)


compiled_mod.read_memory = _recording
import tpflax._src.dryrun as dryrun_mod  # noqa: E402

if hasattr(dryrun_mod, "read_memory"):
    dryrun_mod.read_memory = _recording


class LM(nn.Module):
    """A pre-norm MLP LM whose 1003-row token table model=4 does not divide (the table's split is on features)."""

    layers: int = 2
    width: int = 128

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(1003, self.width, name="embed")(ids)
        for i in range(self.layers):
            h = nn.RMSNorm(name=f"norm_{i}")(x)
            x = x + nn.Dense(self.width, name=f"down_{i}")(nn.gelu(nn.Dense(4 * self.width, name=f"up_{i}")(h)))
        return nn.Dense(1003, name="head")(nn.RMSNorm(name="norm_f")(x))


def _measure(fn, plan, mesh, sample, **kw) -> str:
    _RAW.clear()
    dr = tpflax.dry_run(tpflax.make_train_step(fn, plan, mesh, optax.adamw(1e-3), sample=sample, **kw), plan, mesh)
    return (f"xla temp {_RAW['temp']:>10,} xla peak {_RAW['peak']:>10,} tpflax peak {dr.memory['peak']:>10,} "
            f"reserved {dr.memory['reserved']:>10,} comm {dr.comm_total:>10,.0f}")


def _with(plan, params, mesh_shape, table, spec):
    return tpflax.plan(params, mesh_shape, rules=[("^" + re.escape(k) + "$", spec if k == table else d.spec)
                                                 for k, d in plan.decisions.items()])


# (layers, width, batch, sequence): the 2-layer 128-wide LM of tests/test_stream_tpu.py, then one knob at a time;
# at width 512 a feature-split shard is 128 lanes, a whole tile (nothing padded)
CONFIGS = [(1, 128, 8, 32), (2, 128, 8, 32), (3, 128, 8, 32), (2, 128, 8, 64), (2, 128, 16, 32), (2, 64, 8, 32),
           (2, 256, 8, 32), (2, 512, 8, 32)]


def lm_rows(target: str = "tpu-v5e:2x4") -> None:
    ms = {"fsdp": 2, "model": 4}
    mesh = tpflax.make_mesh(ms, target=target)
    table = "params/embed/embedding"
    for layers, width, b, s in CONFIGS:
        ids = (jax.ShapeDtypeStruct((b, s), jnp.int32),)
        m = LM(layers, width)
        v = jax.eval_shape(m.init, jax.random.key(0), *ids)
        chosen = tpflax.plan(v, ms, batch=ids)
        for spec in (P(None, "fsdp"), P(None, "model")):
            p = _with(chosen, v, ms, table, spec)
            print(f"{target} LM layers={layers} width={width} batch={b}x{s} chosen {chosen.decisions[table].spec} | table "
                  f"{str(spec):18s} {_measure(m, p, mesh, ids, variables=v)}", flush=True)


def hf_rows() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from hf_models import BY_NAME
    from third_party import make_plans

    for name in ("bert-qa", "distilbert-tok", "xlm-roberta-cls"):
        arch = BY_NAME[name]
        built = arch.build()
        params = jax.eval_shape(lambda: built.params)  # noqa: B023
        for axis in ("data", "fsdp"):
            ms = {axis: 2, "model": 4}
            plans = make_plans(arch, built, params, ms)
            chosen = plans["model"]
            table = next(t for t in chosen.decisions if t.endswith("word_embeddings/embedding"))
            mesh = tpflax.make_mesh(ms, target="tpu-v5e:2x4")
            split = P(None, "model") if axis == "data" else P("fsdp", "model")
            whole = P(None, None) if axis == "data" else P("fsdp", None)
            for label, p in (("megatron", plans["megatron"]), (str(whole), _with(chosen, params, ms, table, whole)),
                             (str(split), _with(chosen, params, ms, table, split))):
                print(f"{name} {axis}=2,model=4 chosen {chosen.decisions[table].spec} | {label:20s} "
                      f"{_measure(built.fn, p, mesh, built.sample, loss=built.loss)}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", action="store_true", help="also the three third-party encoders (transformers)")
    ap.add_argument("--target", default="tpu-v5e:2x4", help="the LM's topology (tpu-v4:2x2x1, tpu-v5p:2x2x2, ...)")
    args = ap.parse_args()
    lm_rows(args.target)
    if args.hf:
        hf_rows()
