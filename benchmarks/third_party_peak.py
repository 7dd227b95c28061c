"""Estimate.peak against the TPU compiler's peak for third-party models at published widths.

``benchmarks/third_party_tpu.py`` compiled the adamw train step of transformers 4.57's Flax
classes at their published widths (2 layers per stack, abstract parameters) for a v5e:2x4
topology and kept each step's memory analysis in ``results/third_party_tpu.json``. This script
reads the compiled peak (argument + output - alias + temp per device) of every ``model=`` plan
there and prices ``tpflax.estimate(plan, adamw, model=fn, sample=..., loss=..., backend="tpu")``'s
``Estimate.peak`` for the same plan: no compile, about two minutes. These models have no config
tpflax knows: their activations come from the traced contractions, their attention scores from
the traced ``q @ k`` products, their logits from the head or the tied table.

    pip install -e ".[thirdparty]"
    python benchmarks/third_party_peak.py            # writes results/third_party_peak.md
    python benchmarks/third_party_peak.py --arch bert opt --no-write

The notes below the table in the results file (``## ...`` sections) are kept on a rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from third_party_tpu import PUBLISHED, RESULTS, TARGET, published_plans  # noqa: E402

OUT = RESULTS / "third_party_peak.md"
MIB = 2 ** 20


def rows_for(names: list[str]) -> list[dict]:
    """One row per (arch, mesh) compiled with the ``model=`` plan: compiled and estimated peaks."""
    import optax

    import tpflax

    compiled = [r for r in json.loads((RESULTS / "third_party_tpu.json").read_text())
                if r["plan"] == "model" and r.get("temp") and r["arch"] in names]
    out = []
    for name in dict.fromkeys(r["arch"] for r in compiled):
        pub = PUBLISHED[name]
        built = pub.build()
        act = None if pub.dtype == "float32" else pub.dtype  # an HF apply takes int ids: say the compute dtype
        for r in (x for x in compiled if x["arch"] == name):
            mesh = {k: int(v) for k, v in (kv.split("=") for kv in r["mesh"].split(","))}
            plan = published_plans(pub, built, mesh)["model"]
            e = tpflax.estimate(plan, optax.adamw(1e-4), model=built.fn, sample=built.sample, loss=built.loss,
                                backend="tpu", act_dtype=act)
            peak = r["argument"] + r["output"] - r["alias"] + r["temp"]
            b = e.breakdown
            out.append({"arch": name, "mesh": r["mesh"], "dtype": pub.dtype, "compiled": peak, "estimate": e.peak,
                        "error": e.peak / peak - 1, "arguments": b.arguments, "activations": b.activations,
                        "scores": b.scores + b.attention, "logits": b.logits + b.logits_grad,
                        "compiled_temp": r["temp"]})
            print(f"{name} {r['mesh']}: compiled {peak / MIB:.1f} MiB, estimate {e.peak / MIB:.1f} MiB "
                  f"({e.peak / peak - 1:+.1%})", flush=True)
    return out


def table(rows: list[dict]) -> str:
    head = ("| arch | mesh | dtype | compiled peak | Estimate.peak | error | arguments | saved activations | "
            "scores (saved + in flight) | logits (+ their gradient) |\n|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['arch']} | {r['mesh']} | {r['dtype']} | {r['compiled'] / MIB:.1f} MiB | "
            f"{r['estimate'] / MIB:.1f} MiB | {r['error']:+.1%} | {r['arguments'] / MIB:.1f} | "
            f"{r['activations'] / MIB:.1f} | {r['scores'] / MIB:.1f} | {r['logits'] / MIB:.1f} |" for r in rows]
    within = sum(abs(r["error"]) <= 0.10 for r in rows)
    under = sum(r["error"] < -0.10 for r in rows)
    mean = sum(abs(r["error"]) for r in rows) / max(len(rows), 1)
    summary = (f"Within 10%: {within} of {len(rows)} rows; more than 10% under: {under}; "
               f"mean absolute error {mean:.1%}.")
    return "\n".join([summary, "", head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(PUBLISHED), choices=sorted(PUBLISHED))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    text = table(rows_for(args.arch))
    print(text)
    if not args.no_write:
        old = OUT.read_text() if OUT.exists() else ""
        notes = old[old.index("\n## "):] if "\n## " in old else ""
        OUT.write_text(
            "# Estimate.peak of third-party models at published widths, against the TPU compiler\n\n"
            f"`python benchmarks/third_party_peak.py`: every `model=` plan of `third_party_tpu.json` (transformers "
            f"4.57 Flax classes at published widths, 2 layers per stack, adamw, compiled for `{TARGET}`); "
            "compiled peak = argument + output - alias + temp per device; `Estimate.peak` priced with "
            "`backend=\"tpu\"` and the model's compute dtype. MiB per device.\n\n" + text + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
