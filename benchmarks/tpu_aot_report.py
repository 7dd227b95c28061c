"""Write benchmarks/results/tpu_aot.md from the cached compiles (see tpu_aot.py)."""

from __future__ import annotations

from pathlib import Path

G = 2 ** 30


def _estimate(key: str):
    import jax
    from tpu_aot import build, optimizer

    import tpflax

    name, mesh, remat, dtype = key.split("|")
    m, p, _, batch = build((name, mesh, remat == "remat=on", dtype))
    # the zoo's MoE runs every expert on every token (dense dispatch)
    return tpflax.estimate(p, optimizer(), jax.eval_shape(lambda: m.make_batch(0, batch)), model=m,
                           expert_dispatch="dense" if name == "moe" else "all-to-all")


def _total(comm: dict) -> float:
    return sum(v for by in comm.values() for v in by.values())


def _err(est: float, got: float) -> str:
    return f"{100 * (est - got) / got:+.1f}%" if got else ("0" if not est else "new")


def _rows(tpu: dict) -> tuple[list[str], list[tuple[float, str]]]:
    lines = ["| model | mesh | remat | dtype | compiled peak | Estimate.peak | error | compiled comm | "
             "estimated comm | error | by kind (compiled / estimated GiB) | peak at | largest terms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = []
    for key, r in tpu.items():
        e = _estimate(key)
        b = e.breakdown
        at = "backward start" if b.activations + b.scores + b.working >= b.grads + b.gathered_last else "end"
        terms = sorted(((k, v) for k, v in b.to_dict().items() if k != "total"), key=lambda kv: -kv[1])[:3]
        got_comm = _total(r["comm"])
        perr = (e.peak - r["peak"]) / r["peak"]
        cerr = (e.comm_total - got_comm) / got_comm if got_comm else 0.0
        worst.append((abs(perr), abs(cerr), key, perr, cerr))
        mark = "" if r.get("reparsed") else " †"
        lines.append("| " + " | ".join(key.split("|")) + f" | {r['peak'] / G:.2f} GiB | {e.peak / G:.2f} GiB | "
                     f"{_err(e.peak, r['peak'])} | {got_comm / G:.2f} GiB{mark} | {e.comm_total / G:.2f} GiB | "
                     f"{_err(e.comm_total, got_comm)} | {_by_kind(r['comm'], e.comm)} | {at} | "
                     + ", ".join(f"{k} {v / G:.2f}" for k, v in terms) + " |")
    return lines, worst


def _by_kind(got: dict, est: dict) -> str:
    short = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
             "collective-permute": "CP"}
    kinds = sorted(set(got) | set(est))
    return ", ".join(f"{short.get(k, k)} {sum(got.get(k, {}).values()) / G:.2f} / {sum(est.get(k, {}).values()) / G:.2f}"
                     for k in kinds if sum(got.get(k, {}).values()) + sum(est.get(k, {}).values()) >= G / 1000)


def _cpu_rows(tpu: dict, cpu: dict) -> list[str]:
    lines = ["| config | | argument | output | alias | temp | peak | collectives (kind over axis: GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, c in cpu.items():
        t = tpu.get(key)
        for label, r in (("CPU", c), ("TPU", t)):
            if r is None:
                continue
            comm = "; ".join(f"{k} {a}: {v / G:.2f}" for k, by in sorted(r["comm"].items()) for a, v in by.items())
            lines.append(f"| {key.replace('|', ' ')} | {label} | " + " | ".join(f"{r[k] / G:.3f}" for k in
                                                          ("argument", "output", "alias", "temp", "peak"))
                         + f" | {comm} |")
    return lines


NOTES = """
## How the peak is modelled (tpflax/_src/cost/peak.py)

`Estimate.peak = arguments + max(saved activations + saved attention probabilities + saved expert
hidden + logits + one layer's working set, gradients + the last layer's gathered weights)`. The
coefficients come from the TPU buffer assignment of the 2-layer Llama-2-7B step (`XLA_FLAGS=
--xla_dump_to=...`, `*-memory-usage-report.txt`): at the peak (the start of the backward pass)
the allocation held four bf16 `[32, 4096, 4096]` score buffers (one saved per layer, two in
flight), one f32 `[1, 4096, 32000]` logits buffer, and the gathered bf16 weights of about two
layers plus the output head. The TPU keeps the softmax's float32 inside its fusions: scores are
stored in the activation dtype. XLA's temp bytes also include allocator fragmentation (the
live set at the peak summed to 5.2 GiB of the 6.8 GiB temp); the coefficients absorb it.
Two more rules came from compiles: with the heads split over a tensor axis (fsdp=2,model=4, a
second buffer dump) the scores in flight are two float32 buffers `f32[4, 8, 4096, 4096]`; in a
float32 model one score buffer is in flight (the gradient is formed in place). Fitted on: Llama
fsdp=8 bf16, fsdp=2,model=4 bf16 and fsdp=8 f32. Predicted before being compiled (held out):
Llama data=2,fsdp=4 bf16, Llama remat on, GPT-2.

## Where the CPU and TPU compilers differ

- Temp bytes: XLA:CPU needs 2.3x (Llama: 15.6 vs 6.8 GiB) and 2x (GPT-2) the TPU's temp for the
  same step (the TPU's buffers hold the scores in bf16 with the softmax's float32 fused away); a
  peak calibrated on the CPU compiler overstates the TPU's.
- Gradient reduction over fsdp: tpflax's step pins each gradient to its shards (the parameter
  is constrained to its stored sharding, then to the gathered one). XLA:TPU then reduce-scatters
  the gradients of leaves of two or more dims on an fsdp-only mesh (Llama-2-7B fsdp=8: 1.11 GiB
  of reduce-scatter where the step without the pin all-reduced 2.17 GiB); with a free data axis
  or a tensor axis in the mesh, and for 1-D leaves, it all-reduces the whole gradient and slices
  it (one tuple all-reduce over `data+fsdp`). XLA:CPU all-reduces whole in every case.
- Gathers in bfloat16: XLA:TPU gathers a float32 matmul kernel as bfloat16 (default precision
  multiplies in bfloat16, so it converts before gathering): the f32 Llama row gathers 1.30 GiB,
  not 2.17. Lookup tables and norms are gathered as stored.
- Weight gathers: XLA:TPU gathers each fsdp weight once per step, also at real size (Llama-2-7B:
  1.09 GiB, the estimate to the byte). XLA:CPU gathers twice at real size (2.17 GiB).
- Async collective fusions: the TPU splits a gather into an `async-collective-start` fusion,
  `async_collective_fusion.*` continuations and an `async-collective-done` fusion, each holding a
  copy of the all-gather with the same `channel_id`, shape and groups. `tpflax.hlo.parse_collectives`
  now counts such copies once (`Collective.pieces` says how many there were); before, the
  compiled comm over-counted gathers 2.65x for Llama, which read as a "backward re-gather". Rows
  marked † were read by that old parser (their HLO was not kept); rows without the mark are
  re-read from the kept HLO (`benchmarks/results/tpu_hlo/`, not committed).
- Memory layout: TPU tiles arrays in (8, 128) blocks: a minor dim is padded to 128 lanes. A
  transformer's widths are multiples of 128; a conv net's channels are not (ResNet's 64-channel
  stage is stored at twice its size, its 3-channel images at 43x). At real size a transformer's
  arguments match the estimate exactly (0.466 GiB for the 2-layer 7B step).
- `cost_analysis()["optimal_seconds"]` is negative on the AOT path: no step time from it.

## ResNet-18

The TPU compiler partitions ResNet over image width, not over the batch the step shards: its
buffers are `[rows, the whole batch of 32, a width slice (+ halo), channels]`. From its buffer
dump (peak live set 121 MiB): the stem's 3-channel input images held lane-padded for the 7x7
kernel's taps, `bf16[224, 32, 32, 3, 7]` = 49 MiB (exactly 4 images x 224 x 224 x 128 lanes x
2 bytes), and the 64-channel feature maps of the first stage at 128 lanes (`bf16[56, 32, 8, 64]`
at 3.5 MiB, 2x their bytes, plus the width halo). `Estimate.peak` now counts both on TPU
(`peak.lane_padding`: conv feature maps at 128 lanes; the images of an overlapping-kernel conv
on the input at 128 lanes; a patchify conv such as ViT's keeps no such copy). Error -57% ->
-14.6% (fsdp=8) and -13.5% (data=2,fsdp=4); what remains is the width halo (8/7 of the first
stage) and a second tap-expanded layout of the first stage (`bf16[56, 4, 8, 7, 64]`, 18 MiB),
which the estimate does not model. With a tensor axis (fsdp=2,model=4, -20.5%) the compiler
spreads the feature maps over that axis as well, so no padding is counted there (counting it
read +120%).

## ViT-B/16: over (open)

At 2 layers and 4 images per device ViT's step is small (53 MiB compiled). The estimate counts
35 MiB of saved activations, 7 MiB of saved scores and 7 MiB of scores in flight, plus two
whole layers of gathered weights (27 MiB); the compiler's temp is 39 MiB. Its buffer assignment
(the dump is written within a minute; the TPU code generation after it takes 29 minutes on 2
shared cores, which is why ViT rows are few) holds at most about one layer of gathered weights
(the attention kernels of both layers, `bf16[768, 12, 64]` x 6 and `[12, 64, 768]` x 2, and one
MLP kernel `bf16[768, 3072]`: 13.5 MiB, half the estimate's term), one MLP hidden
`bf16[4, 197, 3072]` at a time, and q, k, v at `bf16[4, 197, 12, 64]`. Counting one gathered
layer would leave +42%: the rest is in the saved activations of a step this small (the fused
LayerNorm and GELU outputs it does not keep) and is not modelled yet.

## Communication

With the parser counting each collective once, the pinned gradients' reduce-scatter (fsdp-only
meshes) or whole all-reduce (any other mesh, 1-D leaves), float32 kernels gathered as bfloat16,
one input-gradient all-reduce per pair on TPU (q, k, v share their input: XLA:TPU sums their
partial gradients first) and a tied table's second gradient all-reduced whole, every row compiled
from kept HLO is within 2% except ResNet-18 fsdp=8 (-3.6%). The MoE step's reduce-scatter is the
fsdp-only rule. ViT's row (†) predates the parser fix and was not recompiled (its code
generation takes 29 minutes here). Loops: XLA:TPU's optimised HLO drops `known_trip_count`;
`tpflax.hlo` reads a scan's trip count from its condition (`counter < N`), so collectives
inside a scanned stack count once per layer.

## The previous round, for comparison

Worst rows before the parser fix, the TPU gradient rule and the lane padding: ViT-B/16 fsdp=8
peak +67.9%; ResNet-18 fsdp=8 peak -57.2%, comm -62.2%; MoE fsdp=8 comm -67.5%; Llama-2-7B
fsdp=8 comm -57.1% (then read by the old parser).
"""


def write_report(out: Path, tpu: dict, cpu: dict) -> None:
    from tpu_aot import grid

    lines, worst = _rows(tpu)
    worst.sort(reverse=True)
    head = ["# Estimate.peak and communication against the TPU compiler", "",
            "Generated by `python benchmarks/tpu_aot.py` (compiles: `--compile`, `--cpu`). Every row is one",
            "train step (adamw, params and optimizer state donated) compiled by libtpu 0.0.42.1 for a",
            "v5e:2x4 topology with no TPU attached. Compiled peak = argument + output - alias + temp bytes",
            "per device (`memory_analysis()`); compiled comm = ring bytes of the collectives in the TPU HLO",
            "(`tpflax.hlo.parse_collectives`). The transformers are compiled at 2 layers of real width,",
            "sequence and vocabulary; the estimate is priced for the same config (its per-layer terms are",
            "linear in the layer count, so a full-depth model adds the same per-layer error per layer).",
            "", f"{len(tpu)} of the {len(grid())} configs of the grid compiled so far (on 2 shared cores a 2-layer 7B",
            "compile took 4-10 minutes); `--compile` resumes where the cache stops.",
            "Worst rows (by peak error, then comm error):", ""]
    for _, _, key, perr, cerr in worst[:5]:
        head.append(f"- {key}: peak {100 * perr:+.1f}%, comm {100 * cerr:+.1f}%")
    worst.sort(key=lambda w: (w[1], w[0]), reverse=True)
    for _, _, key, perr, cerr in worst[:3]:
        head.append(f"- by comm: {key}: comm {100 * cerr:+.1f}%, peak {100 * perr:+.1f}%")
    body = ["", "## Accuracy", ""] + lines
    if cpu:
        body += ["", "## CPU and TPU compilers side by side (same step, same mesh, GiB per device)", ""]
        body += _cpu_rows(tpu, cpu)
    out.write_text("\n".join(head + body) + "\n" + NOTES)
