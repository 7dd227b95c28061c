"""Can tests/test_tpu.py's scanned-remat test (Llama-2-7B width, 2 scanned bf16 layers, 1024 tokens, fsdp=8 on
v5e:2x4) be compiled smaller? One config a run: its XLA:TPU compile's CPU seconds and whether every assertion of
``test_a_scanned_remat_stacks_backward_loop_carries_its_gradients_and_the_temp_counts_them_again`` holds there.

    TPU_SKIP_MDS_QUERY=1 python benchmarks/scan_width_probe.py '{"d_model": 2048, "n_heads": 16, "n_kv_heads": 16}'

(``llama-2-7b-scan`` overrides as JSON; default: the test's own config). Results: results/compile_keys.md.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile

import jax.numpy as jnp
import optax
import tpu_live

import tpflax
from tpflax import zoo


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: XLA:TPU compiles in its own
    return r.ru_utime + r.ru_stime


def probe(**kw) -> dict:
    kw = {"n_layers": 2, "seq_len": 1024, **kw}
    m = zoo.get("llama-2-7b-scan", "real", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kw)
    seq, d = m.config.seq_len, m.config.d_model
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-4), 8)
    dump = tempfile.mkdtemp()
    c0 = _cpu()
    dr = tpflax.dry_run(ts, p, mesh, compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
    compile_cpu = _cpu() - c0
    b = tpflax.estimate(p, optax.adamw(1e-4), 8, model=m, target="tpu-v5e:2x4", remat=True).breakdown
    temp, grads, stack_est, (name, terms) = dr.memory["temp"], b.scan_grads, b.scan_stack, b.phase()
    # the test's reading of the dump, verbatim but for the stack's shape
    vals, heap = tpu_live.read(dump)
    loop = tpu_live.carried(dump, vals)
    peak = max(tpu_live.starts(vals), key=lambda t: tpu_live.in_use(vals, t))
    held = [v for v in vals if v[0] in loop and v[4] <= peak <= v[5] and v[3].startswith("bf16[")]
    stack = sum(v[2] for v in held if len(v[3].split(",")) == 4 and v[3].endswith(f",{seq},{d}]"))
    flat_vals = [v for v in vals if v[0] not in loop and not v[0].startswith("async-collective")]
    flat = max(tpu_live.in_use(flat_vals, t) for t in tpu_live.starts(flat_vals))
    sync_vals = [v for v in vals if not v[0].startswith("async-collective")]
    without = max(tpu_live.in_use(sync_vals, t) for t in tpu_live.starts(sync_vals))
    law_flat = (temp - (2 * heap - flat)) / 2**20
    law_without = (temp - (2 * heap - without) - (grads + stack_est)) / 2**20
    ok = (stack == stack_est == m.config.n_layers * seq * d * 2 and sum(v[2] for v in held) - stack_est == grads
          and name == "backward start: last layer" and terms.get("scan_grads") == grads
          and terms.get("loop_carried") == grads + stack_est and abs(law_flat) < 1 and abs(law_without) < 1)
    return {"overrides": kw, "compile_cpu_s": round(compile_cpu, 1), "test_holds": ok, "phase": name,
            "stack_dump_vs_estimate": (stack, stack_est), "grads_dump_vs_estimate": (sum(v[2] for v in held) - stack_est, grads),
            "law_flat_MiB": round(law_flat, 2), "law_without_MiB": round(law_without, 2),
            "carried_MiB": round((grads + stack_est) / 2**20, 1)}


if __name__ == "__main__":
    print(json.dumps(probe(**(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))))
