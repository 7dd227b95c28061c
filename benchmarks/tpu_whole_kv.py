"""A whole GQA key/value compiled for a TPU slice, against tpflax's TPU estimate.

Run: python benchmarks/tpu_whole_kv.py   (needs libtpu: pip install -e ".[tpu]"; about 4 minutes)
Writes benchmarks/results/tpu_whole_kv.md. The zoo Llama (2 layers, f32) with its key/value kernels kept whole
and every other kernel in tpflax's Megatron layout, its adamw step compiled for ``tpu-v5e:2x4``, against
``tpflax.estimate(..., target="tpu-v5e:2x4")``'s collective bytes: one row per mesh, layer stack and key/value
head count at the zoo's tiny width, then at a published width (d_model 2048, 16 query heads and 2 key/value heads
of 128, d_ff 5632, a 32000 vocabulary, 8 x 512 tokens; data=2,model=4) with each collective kind beside the
estimate's (``DryRun.compare``). What the compiled steps do is in benchmarks/tpu_aot_notes.md (twenty-ninth round).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import zoo  # noqa: E402

TARGET = "tpu-v5e:2x4"
KV = r"attn/[kv]_proj/kernel$"
WIDE = {"d_model": 2048, "n_heads": 16, "head_dim": 128, "d_ff": 5632, "vocab": 32000, "seq_len": 512}
HEADER = ["| mesh | layers | K | compiled comm | estimate | ratio |", "|---|---|---:|---:|---:|---:|"]


def rows(shapes, kvs, width, by_kind: bool) -> list[str]:
    out = []
    for shape in shapes:
        for scan in (False, True):
            for kv in kvs:
                m = zoo.get("llama", n_layers=2, scan_layers=scan, n_kv_heads=kv, **width)
                p = tpflax.plan(m.abstract_variables(), shape, rules=[(KV, "replicate")])
                mesh = tpflax.make_mesh(p.mesh, target=TARGET)
                dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
                est = tpflax.estimate(p, optax.adamw(1e-3), 8, model=m, target=TARGET)
                label = ",".join(f"{k}={v}" for k, v in shape.items())
                out.append(f"| {label} | 2 {'scanned' if scan else 'unrolled'} | {kv} | {dr.comm_total:,.0f} | "
                           f"{est.comm_total:,.0f} | {est.comm_total / dr.comm_total:.3f} |")
                if by_kind:
                    out += [f"|   {r.name} | | | {r.compiled or 0:,.0f} | {r.estimated:,.0f} | |"
                            for r in dr.compare(est).rows if r.section == "comm" and not r.name.startswith("total")]
                print("\n".join(out[-1:] if not by_kind else out[-4:]), flush=True)
    return out


def main() -> None:
    tiny = rows(({"data": 2, "model": 4}, {"fsdp": 2, "model": 4}), (1, 2), {}, by_kind=False)
    wide = rows(({"data": 2, "model": 4},), (2,), WIDE, by_kind=True)
    lines = ["# A whole GQA key/value on a TPU slice: the estimate against the TPU compiler", "",
             __doc__.split("\n\n", 1)[1].strip(), "", "## The zoo's tiny width", "", *HEADER, *tiny, "",
             "## A published width", "", *HEADER, *wide]
    out = Path(__file__).parent / "results" / "tpu_whole_kv.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
