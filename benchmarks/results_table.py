"""The markdown of ``benchmarks/third_party.py``: ratios to the hand Megatron layout, and a summary."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_rules import FOOTNOTES

PLANS = ("tree", "model", "megatron", "replicated", "fsdp")

# What the run of 2026-11-30 (after issue 11's third round) shows; update with the planner.
FINDINGS = (
    "**Seven architectures added this round** (36 in all, 72 architecture x mesh pairs, 360 plans), none written with tpflax in mind: mT5 (T5 v1.1: gated-gelu, untied head), mT5-small's ratios (6 heads, which model=4 does not divide), Marian (static sinusoidal positions, odd vocabulary), Blenderbot (pre-norm BART, learned positions without offset), the ViT+GPT-2 and Wav2Vec2+BART encoder-decoders (cross-attention; GPT-2's cross-attention fuses k and v into one `(2d, d)` Conv1D beside a square `q_attn`) and HF's ResNet (bottleneck blocks, BatchNorm in inference-stats mode). They showed three tree-mode classes, each fixed in general and each already right in the traced (`model=`) plan: a square query kernel beside a fused k/v kernel, oriented by neither name nor shape, was replicated (vit-gpt2 tree 1.04x comm; now an input projection of the block's attention pair); a tied-logits bias stored broadcast-ready as `(1, vocab)` (BART's `final_logits_bias`) was classified `other` and replicated (Blenderbot tree 1.002x bytes); and 2-D q/k/v/o kernels were split through a head when the head count does not divide the tensor axis (mT5-small tree 0.71x bytes, 1.79x comm, 0.53x flops: a per-head table, T5's `(buckets, heads)` relative bias, now gives the head count, and a split that cuts heads is refused).",
    '**data=2,model=4: every `model=` row is at or below the hand layout on all three numbers** (36 architectures); tree-only too except Wav2Vec2 (1.003x bytes, 1.005x flops, 0.94x comm: its untied 32-way CTC head is not named like a head, so the tree keeps it whole).',
    "**Rows still above 1.00x, all on fsdp=2,model=4, all at most 1.2% and all one trade-off:** tpflax also splits the position and token-type tables (and an odd vocabulary's rows) over fsdp, which the hand layout keeps whole or splits on the other dim: 0.3-0.8% more collective bytes on XLA:CPU, 0.2-1.4% fewer bytes per device (vit-gpt2: +10,496 B, exactly half of `wpe`, `position_embeddings` and `cls_token`; wav2vec2-bart: +8,480 B, half of `embed_positions` and `weight_g`). XLA:CPU all-reduces every fsdp gradient whole, so any fsdp split adds its all-gather there; on a TPU fsdp-only mesh the gather and the reduce-scatter cost what the whole all-reduce costs, and the chooser prices that (the split saves memory for nothing). Kernels pay the same on XLA:CPU, which is why the hand layout's own fsdp splits show up against replicated.",
    "**Strictly better than the hand layout** (below on a number, above on none) **on four architectures in this one run**: ResNet with `model=` on both meshes (0.84-0.87x bytes, 0.84x comm, 0.93x flops: by cost it pairs stage 3's 1x1 reduce conv with the 3x3 conv it feeds, channels over model, which the hand layout replicates as it does every conv of a CNN), Whisper on both meshes, tree-only and `model=` (0.93-0.94x bytes, 0.98-0.99x comm, 0.85x flops: conv1's output channels paired with conv2's input channels), CLIP with `model=` on both meshes (0.98x bytes, 0.99-1.00x comm: a dense without a partner is priced by the rows it reads in the trace, and CLIP's projections read one pooled row per example) and vit-gpt2 with `model=` on data=2,model=4 (0.99x bytes: the ViT encoder's pooler, which the decoder never reads, split for no collective). On the other 32 the plan is the hand layout or within the fsdp trade-off above.",
    '**Estimate: 360 of 360 rows within 10% of the compiled collectives.**',
)
NUMBERS = ("bytes", "comm", "flops")


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing; inf when only ``b`` is zero."""
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else ("inf" if math.isinf(r) else f"{r:.2f}")


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, n in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= n:
            return f"{v / n:.1f} {unit}"
    return f"{v:.0f} B"


def est_error(r: Any) -> float | None:
    """The estimate's relative error on collective bytes (None when either is missing)."""
    if r.est_comm is None or r.comm is None:
        return None
    return 0.0 if r.comm == 0 and r.est_comm == 0 else (
        math.inf if r.comm == 0 else (r.est_comm - r.comm) / r.comm)


def group(rows: Sequence[Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(arch, mesh): {plan: row}}`` in first-seen order (the last row of a key wins)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        out.setdefault((r.arch, r.mesh), {})[r.plan] = r
    return out


def ratios(row: Any, ref: Any) -> tuple[float | None, ...]:
    return tuple(ratio(getattr(row, k), getattr(ref, k) if ref is not None else None) for k in NUMBERS)


def _summary_table(groups) -> list[str]:
    out = ["| arch | mesh | " + " | ".join(PLANS) + " |", "|---|---|" + "---|" * len(PLANS)]
    for (arch, mesh), plans in groups.items():
        ref = plans.get("megatron")
        cells = []
        for p in PLANS:
            r = plans.get(p)
            if r is None:
                cells.append("not run")
            elif r.error and r.bytes is None:
                cells.append("**failed**")
            else:
                cells.append(" / ".join(fmt_ratio(x) for x in ratios(r, ref)))
        out.append(f"| {arch} | {mesh} | " + " | ".join(cells) + " |")
    return out


def _detail_table(groups) -> list[str]:
    out = ["| arch | mesh | plan | bytes/device | x | comm/step | x | flops/device | x "
           "| est. comm | est. error | sharded leaves | note |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (arch, mesh), plans in groups.items():
        ref = plans.get("megatron")
        for p in PLANS:
            r = plans.get(p)
            if r is None:
                continue
            rb, rc, rf = ratios(r, ref)
            e = est_error(r)
            err = "-" if e is None else ("new" if math.isinf(e) else f"{100 * e:+.0f}%")
            flops = "-" if r.flops is None else f"{r.flops:.3g}"
            note = r.error.replace("|", "/").replace("\n", " ")[:160]
            out.append(f"| {arch} | {mesh} | {p} | {fmt_bytes(r.bytes)} | {fmt_ratio(rb)} | "
                       f"{fmt_bytes(r.comm)} | {fmt_ratio(rc)} | {flops} | {fmt_ratio(rf)} | "
                       f"{fmt_bytes(r.est_comm)} | {err} | {r.sharded_leaves} | {note} |")
    return out


def _worst(groups, plan: str) -> list[tuple[float, str]]:
    """Rows of ``plan`` ordered by their worst ratio to Megatron over the three numbers."""
    worst = []
    for (arch, mesh), plans in groups.items():
        r, ref = plans.get(plan), plans.get("megatron")
        if r is None or ref is None or r.bytes is None or ref.bytes is None:
            continue
        rs = ratios(r, ref)
        m = max(x for x in rs if x is not None)
        worst.append((m, f"{arch} {mesh}: bytes {fmt_ratio(rs[0])}x, comm {fmt_ratio(rs[1])}x, "
                         f"flops {fmt_ratio(rs[2])}x"))
    return sorted(worst, key=lambda t: -t[0])


def _strictly_better(groups, plan: str) -> list[str]:
    """Rows where ``plan`` beats Megatron by > 0.1% on some number and loses on none."""
    out = []
    for (arch, mesh), plans in groups.items():
        r, ref = plans.get(plan), plans.get("megatron")
        if r is None or ref is None or r.bytes is None or ref.bytes is None:
            continue
        rs = [x for x in ratios(r, ref) if x is not None]
        if rs and max(rs) <= 1.0005 and min(rs) < 0.999:
            out.append(f"{arch} {mesh}")
    return out


def _baseline_losses(groups, plan: str = "tree") -> list[str]:
    """Rows where ``plan`` is worse than replicated or pure FSDP on some number."""
    out = []
    for (arch, mesh), plans in groups.items():
        t = plans.get(plan)
        if t is None or t.bytes is None:
            continue
        for base in ("replicated", "fsdp"):
            b = plans.get(base)
            if b is None or b.bytes is None:
                continue
            worse = [k for k in NUMBERS if getattr(t, k) is not None and getattr(b, k) is not None
                     and getattr(t, k) > getattr(b, k) * 1.0001]
            if worse:
                out.append(f"{arch} {mesh}: {plan} worse than {base} on {', '.join(worse)}")
    return out


def _summary(groups, rows) -> list[str]:
    out = ["## Summary", ""]
    for plan, label in (("tree", "tree-only"), ("model", "model=")):
        w = _worst(groups, plan)
        above = [s for m, s in w if m > 1.0 + 1e-3]
        better = _strictly_better(groups, plan)
        out += [f"**{label}**: {len(above)} of {len(w)} rows above 1.00x Megatron on some number "
                "(target: none for model=, <= 1.10x for tree-only); strictly better than Megatron "
                f"(better on one number, worse on none): {', '.join(better) or 'none'}. Worst rows:", ""]
        out += [f"- {s}" for _, s in w[:8]] + [""]
        if above:
            out += [f"<details><summary>all {len(above)} {label} rows above 1.00x</summary>", ""]
            out += [f"- {s}" for s in above] + ["", "</details>", ""]
    losses = _baseline_losses(groups)
    own = _baseline_losses(groups, "megatron")
    out += [f"**tree-only vs the baselines**: {len(losses)} rows worse than replicated or pure FSDP "
            f"on some number (the hand Megatron layout itself: {len(own)}, nearly all on comm: "
            "tensor parallelism adds activation all-reduces that a replicated data-parallel step "
            "does not have)" + (":" if losses else "."), ""]
    out += [f"- {s}" for s in losses] + ([""] if losses else [])
    errs = [(abs(est_error(r)), r) for r in rows if est_error(r) is not None]
    off = sorted([t for t in errs if t[0] > 0.10], key=lambda t: -t[0])
    out += [f"**estimate vs compiled collective bytes**: {len(errs) - len(off)} of {len(errs)} rows "
            "within 10% (target: all). Worst:", ""]
    out += [f"- {r.arch} {r.mesh} {r.plan}: estimated {fmt_bytes(r.est_comm)}, compiled "
            f"{fmt_bytes(r.comm)} ({'new' if math.isinf(e) else f'{100 * e:.0f}%'} off)"
            for e, r in off[:10]] + [""]
    failed = [r for r in rows if r.error]
    out += [f"**failures** ({len(failed)}):" if failed else "**failures**: none.", ""]
    out += [f"- {r.arch} {r.mesh} {r.plan}: {r.error[:200]}" for r in failed] + [""]
    return out


def write_markdown(rows: Sequence[Any], path: Path, extra: Sequence[str] = ()) -> None:
    """Write the results file for ``rows`` (``third_party.Numbers``), then the ``extra`` lines."""
    import jax
    import transformers

    groups = group(rows)
    lines = [
        "# Third-party models: tpflax's plans vs a Megatron layout by hand",
        "",
        "`python benchmarks/third_party.py` (needs `pip install -e \".[thirdparty]\"`). transformers "
        f"{transformers.__version__} Flax classes, jax {jax.__version__}, Python "
        f"{platform.python_version()}; tiny configs with the published ratios "
        "(`benchmarks/hf_models.py`), abstract parameters, batch 8 x 32 tokens; the adamw train "
        "step of `tpflax.make_train_step` compiled by `tpflax.dry_run` on 8 CPU-emulated devices "
        f"({len(groups)} architecture x mesh pairs, {len(rows)} plans, "
        f"{sum(r.seconds for r in rows) / 60:.0f} min of compiles).",
        "",
        "- **bytes/device**: XLA memory analysis, argument + temp + output - alias (donated buffers "
        "once).",
        "- **comm/step**: collective bytes each device sends per step, from the compiled HLO "
        "(`tpflax.hlo`, ring-priced as the estimate).",
        "- **flops/device**: XLA cost analysis.",
        "- **x**: ratio to the hand Megatron layout of the same architecture and mesh (lower is better).",
        "- **est. comm / est. error**: `tpflax.estimate(plan, adamw, model=fn, sample=..., "
        "backend=\"cpu\")` collective bytes, and its error vs the compiled ones (target: within 10%).",
        "- plans: **tree** `tpflax.plan(params, mesh)`; **model** `... model=fn, sample=...` with fn "
        "the model's own apply (`lambda p, *x: hf(*x, params=p).logits`); **megatron** the layout by "
        "hand (`benchmarks/megatron_rules.py`); **replicated**; **fsdp** each leaf's largest dim "
        "dividing the fsdp (or, on data=2,model=4, the data) axis split over it, nothing over model.",
        "- Published widths (2 layers, abstract parameters) compiled by the TPU compiler for "
        "`tpu-v5e:2x4`: `python benchmarks/third_party.py --tpu-widths`, results in "
        "`third_party_tpu.md`.",
        "",
        "Hand layout choices:",
        "",
    ]
    lines += [f"{i}. {f}" for i, f in enumerate(FOOTNOTES, 1)] + [""]
    # FINDINGS are prose written by hand about one run: say which, so a regenerated table never
    # passes off old observations as describing its own numbers.
    lines += ["## Observations on the run of 2026-11-30 (after issue 11's sixth round; written by "
              "hand, not regenerated with the table)", ""] + [f"- {f}" for f in FINDINGS] + [""]
    lines += _summary(groups, rows)
    lines += ["## Ratios to Megatron (bytes / comm / flops)", ""] + _summary_table(groups) + [""]
    lines += ["## All numbers", ""] + _detail_table(groups) + [""] + list(extra)
    path.write_text("\n".join(lines))
