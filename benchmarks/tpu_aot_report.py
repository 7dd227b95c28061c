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
Two more rules came from compiles: with the heads split over a tensor axis (fsdp=2,model=4, the
Llama and MoE buffer dumps) each layer's probabilities are saved in float32, `f32[4, 8, 4096,
4096]` live from the layer's forward to its backward pass (next to two bf16 buffers in flight in
the Llama step's last attention backward; the first reading took them for two f32 buffers in
flight, the same total at 2 layers but not at 32); in a float32 model one score buffer is in
flight (the gradient is formed in place). Fitted on: Llama
fsdp=8 bf16, fsdp=2,model=4 bf16 and fsdp=8 f32. Predicted before being compiled (held out):
Llama data=2,fsdp=4 bf16, Llama remat on, GPT-2. Conv nets on TPU keep their convs' and norms'
inputs rather than their layers' outputs (`peak.conv_maps`, see ResNet-18 below). A residual
block's row projection output (`o_proj`, `down_proj`, an expert layer's combine) and the module
returning it (`attn`, `mlp`) feed only the residual add, whose backward reads nothing: on TPU they
leave the saved activations and the recomputed layer under remat (`cost/residual.py`, see "Row
outputs" below).

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
buffers are `[rows, the whole batch of 32, a width slice (+ halo), channels, taps]`. Its buffer
assignment (`XLA_FLAGS=--xla_dump_to=DIR`; the HBM values live at the peak, from
`*-live-range.txt` and `*-buffer-assignment.txt`) shows what a conv net keeps for the backward
pass: not its layers' outputs but what their backward passes read.

- Each 3x3 conv's input, once per kernel column: `bf16[56, 32, 8, 64, 3]` (10.5 MiB, a ReLU
  output padded for the halo, 3 taps) for each of the five 3x3 convs reading a 56x56 map,
  `[28, 32, 4, 128, 3]` for the four reading a 28x28 map, `[14, 32, 2, 256, 3]` for the next
  four: the weight gradient is then one matmul per tap column.
- Each norm's input (the conv output it normalises), e.g. the stem's `bf16[112, 32, 16, 64]`,
  and a max-pool's input (its select-and-scatter reads it: `f32[112, 32, 17, 64]` in the f32 step).
- The stem's 3-channel input images lane-padded for the 7x7 kernel's taps,
  `bf16[224, 32, 32, 3, 7]` = 49 MiB (exactly 4 images x 224 x 224 x 128 lanes x 2 bytes).
- Conv inputs in bfloat16 even in the float32 step (the conv multiplies in bfloat16 at default
  precision, as a float32 kernel is gathered in bfloat16): its taps are `bf16[56, 32, 8, 64, 3]`
  next to `f32` norm and pool inputs.
- Channels in 128 lanes: a 64-channel stage takes twice its bytes.
- Not kept: a block's output, a norm's output, a ReLU's (they are the next conv's input, kept
  expanded there); a 1x1 projection conv reads the input its block's 3x3 conv keeps.

`peak.conv_maps` counts exactly that on TPU in place of the conv layers' outputs (ResNet-18 bf16,
4 images per device: 49 MiB of images, 61 MiB of tap-expanded conv inputs, 31 MiB of norm
inputs, 12 MiB of pool input). Errors: bf16 fsdp=8 -11.7% -> +10.5%, data=2,fsdp=4 -13.4% ->
+6.9%; f32 (new rows; the previous rule read +28.7% on fsdp=8) -5.3% and -10.1%. The bf16 rows
are over because part of their live set sits in the on-chip memory space `S(1)`, which `temp`
does not count (in the bf16 step the stem's norm and pool inputs and two of the five 56x56 tap
buffers are in `S(1)` at the HBM peak; in the f32 step they are in HBM). The data=2,fsdp=4 rows
hold more than the extra arguments (f32: +32 MiB over fsdp=8 where the arguments add 17);
probably (its buffer dump was not read) because with a data axis each gradient is all-reduced
whole in one tuple all-reduce, so the full gradients of the last stages, computed first in the
backward pass, are live while the first stages' maps still are; not modelled. Its f32 dump
(read this round) confirms it: the HBM peak (220 MiB at step 1609 of 3010, against 210 MiB in
the fsdp=8 step) is just after the last stage's backward and holds the same maps plus that
stage's weight gradients whole, `f32[3, 3, 512, 512]` x 2 and `[3, 3, 256, 512]` (22.5 MiB, live
to the end of the backward, where one tuple all-reduce reduces them). Not modelled: "the last
block's gradients whole at the backward start" fits this row but would move MoE data=2,fsdp=4
(-3.2%) to +7.5% and GPT-2 f32 data=2,fsdp=4 further over, whose dumps were not read. With a tensor axis (fsdp=2,model=4) the compiler keeps
other buffers (read off the bf16 dump and a float32 one, `peak.tensor_conv_maps`): the blocks'
convs are column/row pairs over `model`; no map is split by width or expanded per kernel column;
it keeps whole maps for the 16 images of its fsdp shard, with the channels a column-split conv
leaves on the device in 128 lanes (`bf16[16, 56, 56, 16]` takes 12.25 MiB, as `[16, 56, 56,
64]`): each norm's input (the stem's `f32[16, 112, 112, 64]`, 98 MiB), the max-pool's input (the
stem's ReLU output, 98 MiB) and the images in bfloat16 with the batch in lanes (`bf16[16, 224,
224, 3]{0,3,2,1:T(4,128)}`, 49 MiB, in both steps); a conv's input (the previous norm's output) is
recomputed, not kept. In the f32 step these sum to 391 MiB; its HBM live set is 395 MiB at the
backward start and peaks at 411 MiB in the first block's backward (temp 429 MiB). In the bf16 step
(220 MiB by the rule) up to 89 MiB of the stage-1 maps sit in `S(1)` at the HBM peak (168 MiB live
in HBM, temp 200 MiB). Errors: bf16 -19.4% -> +8.4%, f32 -24.3% -> -8.8%.

### Why bf16 reads over and f32 under (this round: no dtype rule is off)

The remaining pattern (bf16 fsdp=8 +10.5%, data=2,fsdp=4 +6.9%; f32 -5.3%, -10.1%) suggested a
wrong dtype in `peak.conv_maps`. Four buffer dumps (fsdp=8 and data=2,fsdp=4, bf16 and f32,
`python benchmarks/tpu_spaces.py DIR`: values live at the HBM peak in HBM and in the on-chip
`S(1)`) show every dtype the rule uses is the compiler's: the tap buffers are bf16 in both steps,
the norm and pool inputs are in the step's dtype, the images bf16 in both. At the HBM peak (fsdp=8,
MiB per device; data=2,fsdp=4 holds the same maps, its f32 step adds the last stage's whole f32
weight gradients, 31.5 MiB, in "other"):

| at the HBM peak | bf16 HBM | bf16 `S(1)` | f32 HBM | f32 `S(1)` | the rule (bf16 / f32) |
|---|---|---|---|---|---|
| images `bf16[224, 32, 32, 3, 7]` | 49.0 | 0 | 49.0 | 0 | 49.0 / 49.0 |
| the stem's norm input `[112, 32, 16, 64]` | 14.0 | 0 | 28.0 | 0 | 12.3 / 24.5 |
| the max-pool's input `[112, 32, 17, 64]` | 0 | 14.9 | 29.8 | 0 | 12.3 / 24.5 |
| tap buffers, 56x56 maps (5) | 31.5 | 21.0 | 52.5 | 0 | 45.9 / 45.9 |
| tap buffers, 28, 14, 7 (4, 4, 3) | 16.4 | 0 | 14.4 | 0 | 15.5 / 15.5 |
| other: stage-1 to 4 maps, the stem backward's gradients, weight gradients | 11.7 | 35.0 | 36.4 | 51.6 | 18.9 / 37.9 norm inputs + 11.5 / 23.0 gathered |
| total (compiled temp 148.4 / 232.8, heap 136 / 222) | 122.6 | 70.9 | 210.1 | 51.6 | 165.4 / 220.3 |

The HBM peak is the stem's backward pass: the data gradient has passed every block (the stage-1 to 4
norm inputs are mostly freed by then) while every conv's taps are still live,
as the compiler runs the weight-gradient convs after the data-gradient chain. Against the
compiler's buffers the rule is short in both dtypes by the same share: a tap buffer's width
slice is `W // 8 + 1` columns (8 for 56, 4 for 28, 2 for 14, 1 for 7; at 160-pixel images 6, 3,
2, 1), not `W / 8`, and the stem's 112-wide maps take 16 (its norm input) and 17 (the pool input)
columns, not 14. What differs by dtype is where the
kept maps sit: the memory-space assignment keeps 36 MiB of them on chip in the bf16 step (the
pool input and two 56x56 tap buffers; 39 MiB in data=2,fsdp=4) and none in the f32 step, whose
stem backward's float32 gradients (`f32[28, 32, 17, 64]` x 4, 29.8 MiB, and the stage-1 ones) fill
`S(1)` instead. Counting the halo (13.2 / 17.6 MiB more) would take the f32 rows to about
+1.7% and -3.9% and the bf16 ones to +18.8% and +14.6%; dropping the freed later norm inputs as
well brings bf16 fsdp=8 back to +6.9% and f32 fsdp=8 to -13.3%. No count of what is kept fits both
dtypes while the bf16 step keeps 36-39 MiB of it on chip and the f32 step none, so the rule is
unchanged; what remains is a model of the on-chip placement, as for
ViT. Held out, ResNet-18 at 160-pixel images (fsdp=8 bf16, not in the grid): the compiler splits
the stem over the batch (`bf16[4, 160, 160, 3]`, no tap-expanded images) and keeps 91 MiB of a 119 MiB live
set on chip; its HBM peak holds 28 MiB (the images, 25 MiB): compiled 54.5 MiB, estimate 99.1
(+82%), an upper bound as for ViT.

## ViT-B/16: over (open): the on-chip memory holds most of a small step

At 2 layers and 4 images per device ViT's step is small (51 MiB compiled in bf16). Two buffer
dumps were read term by term (bf16 fsdp=8 and f32 fsdp=8; values live at the HBM peak, both
memory spaces, from `*-buffer-assignment.txt` and `*-live-range.txt`; MiB per device):

| at the HBM peak | bf16 HBM | bf16 `S(1)` | f32 HBM | f32 `S(1)` | the estimate counts (bf16 / f32) |
|---|---|---|---|---|---|
| images, lane-padded `bf16[4, 224, 224, 3]` | 0 | 49.0 | 0 | 49.0 | 0 / 0 |
| MLP hiddens (before and after the GELU) | 4.7 | 14.1 | 0.6 | 14.1 | activations 33.5 / 66.9 (these three rows) |
| q, k, v, context (`[4, 197, 12, 64]`, bf16 in both) | 4.5 | 7.5 | 12.0 | 3.0 | |
| residual-width maps, norm statistics | 1.3 | 4.8 | 3.2 | 11.9 | |
| probabilities `[4, 12, 197, 197]` (256 lanes) | 0 | 9.4 | 0 | 18.8 | scores + in flight 14.2 / 21.3 |
| gathered weights (bf16 in both), a whole weight gradient | 13.5 | 18.0 | 11.2 | 4.5 | gathered 27.0 / 54.0 |
| whole f32 weight gradients (before the reduce-scatter) | | | 20.2 | 0 | |
| total | 24.0 | 102.8 | 47.4 | 101.3 | 74.7 / 142.3 |

The compiler's total (both spaces, less the images) is 78 MiB in bf16 against the estimate's 75:
every term is there, and nothing the estimate counts is dropped. No saved activation is
recomputed: each layer keeps both MLP hiddens (the GELU is not recomputed), q, k, v and the
context, its probabilities and two residual-width maps; the gathered weights of both layers are
kept from the forward to the backward pass. What the estimate cannot see is where they sit: the
compiler's memory-space assignment fills the on-chip memory (`S(1)`, a 112 MiB heap on v5e; 100 to
118 MiB live through the whole forward and backward pass in both steps) and leaves in HBM only
what does not fit. At the HBM peak of the Llama-2-7B step `S(1)` holds 81 MiB (1% of its 7 GiB)
and at GPT-2's 12 MiB (the peak is at the loss), so for the large steps it does not matter, and
it is not the same share from step to step: it is not a fixed credit. Modelling which buffers
that pass places on chip is what remains; until then `Estimate.peak` is an upper bound for a
step whose transient set is within a few times the on-chip memory (128 MiB on v5e).

The same three bf16 steps compiled with that pass off (`LIBTPU_INIT_ARGS=
--xla_vf_vmem_memory_space_assignment=false`; each compile then takes 20 s, not 4 to 18
minutes) peak at 182.5, 186.7 and 184.1 MiB (fsdp=8, data=2,fsdp=4, fsdp=2,model=4; temp 160 to
169 MiB) where the default compiles peak at 50.7, 69.0 and 67.8: the on-chip placement takes 118
to 132 MiB off the HBM peak of these steps, more than the estimate's whole error. The fsdp=8
one, dumped: 131.5 MiB live at its HBM peak (step 514 of 885, the backward start), all in HBM:
the lane-padded images (49.0), gathered weights and one whole weight gradient (37.5), both
layers' MLP hiddens before and after the GELU (18.8), q, k, v and context (12.0), probabilities
(9.4), residual-width maps (4.9). Less the images that is 82.5 MiB against the estimate's 74.7
(-9.5%): the estimate's terms are the compiler's live set; its heap is 141 MiB and its temp 168.5
(the temp beyond the heap, as in the MoE and Llama steps below).

The float32 rows are new this round. fsdp=8 f32: compiled 131.7 MiB (temp 103.7 MiB, of which the
buffer assignment's HBM heap is 75.7 MiB; the compile took 18 minutes on the shared cores),
estimate 167.2 MiB: +27.0%. Its estimate is further over in two terms the table shows: the
activations are counted in float32 where q, k, v and the context are kept in bfloat16 (the
matmuls multiply in bfloat16 at default precision, as a conv's inputs are kept), and the weights
are counted as gathered in float32 (54 MiB) where XLA:TPU gathers them in bfloat16 (the comm
model already knows this) but holds the whole float32 gradients of the last MLP before their
reduce-scatter (20 MiB). Both are TPU rules for any float32 transformer (Llama f32 too) and are
left to the float32 work on `peak.py`.

With the heads over `model` (fsdp=2,model=4 f32, dumped this round; 16 images per device) the
compiler's total is smaller than the estimate's, not just placed differently: at the end of the
forward pass (step 664 of 1644) HBM holds 77 MiB of temporaries and `S(1)` 96 MiB: the images
(`bf16[16, 224, 224, 3]`, 49 MiB, in HBM here, the batch in lanes as in the tensor-axis ResNet-18
step), the patch embedding's output (`f32[16, 196, 768]`), each layer's probabilities
(`f32[16, 3, 197, 197]`), q, k, v in bfloat16 (`bf16[16, 197, 3, 64]`, 8 x 1.5 MiB) and nine
`f32[16, 197, 768]` maps (residual stream, norm outputs and the MLP hiddens split over `model`,
some in flight): 124 MiB without the images, where the estimate holds 215 (180 of saved
activations: every traced output of residual width counted, 7 per layer, each whole on the
device). The residual-width outputs of a row-parallel layer (`attn/out`, `fc2`) and of the
modules that return them (`attn`, `mlp`) are not kept (their backward passes do not read them),
the same over-count the Llama-2-7B fsdp=2,model=4 f32 dump shows (6.2 GiB counted, about 1.7
live); a rule for it changes the saved activations of every transformer and is left to the
work on those rows.

One term was over-counted and is fixed (`cost/leaves.py`): a q/k/v projection is a DenseGeneral
with a `(d, heads, head_dim)` kernel; with the heads split over `model` its output on a device is
`[.., heads / 4, head_dim]`, but the saved activations counted it whole (only a split *last* dim
counted). ViT fsdp=2,model=4 bf16 +130.6% -> +99.9%; the same fix moves the head-split Llama rows
(bf16 +5.8% -> +0.2%, f32 +19.7% -> +10.1%, remat f32 +19.9% -> +12.7%, remat bf16 +1.0% -> -2.9%).
Also found, not changed: a module whose result is its last sublayer's (`attn` = `attn/out`,
`mlp` = `mlp/fc2`) is traced and counted twice (about 18 MiB of the fsdp=2,model=4 row, 1-2% of
the Llama and GPT-2 rows, whose coefficients were fitted with the double count).

## GPT-2 float32: over (open)

The first float32 GPT-2 rows read +55%: the f32 logits were counted twice, once as the tied
head's traced output (the saved activations) and once as the logits buffer. A 16-bit step holds
both (the bf16 step's HBM peak has `bf16[2, 1024, 50257]` and `f32[2, 1024, 50257]`); a float32
step holds one (`f32[2, 1024, 50257]`, 393 MiB, in its buffer dump), so `peak.peak` now drops
the head's output in a float32 model (Llama f32 +1.2% -> -3.1%, GPT-2 f32 -> +14.7% / +13.3%).
What remains, from the same dump (HBM live at the peak 866 MiB of 892 MiB temp, 12 MiB in
`S(1)`): the peak is at the loss, before the last layer's backward pass, so no score buffer is in
flight yet (the estimate adds one f32 `[2, 12, 1024, 1024]`, 96 MiB); and the matmul inputs kept
for the weight gradients are partly stored in bfloat16 (`bf16[2, 1024, 768]`,
`bf16[2, 12, 64, 1024]` next to f32 MLP hiddens), as a conv's are. Neither is modelled: taking the
max of the logits and one layer's working set instead of their sum moves the 16-bit GPT-2 rows to
-19% (their peak holds both), and Llama f32, the fit of the f32 score coefficient, would need
refitting with bfloat16 matmul inputs.

The bf16 GPT-2 dump, re-read with its live ranges: its HBM peak (step 654 of 2035) is at the loss
too (the head's forward fusion writes the f32 and bf16 logits), and its two f32 `[2, 12, 1024,
1024]` buffers are the two layers' saved probabilities (live 270-1012 and 506-836), not scores in
flight. GPT-2 saves its probabilities in float32 in both dtypes, as the tensor-axis Llama and MoE
steps do, while the Llama and MoE fsdp=8 steps (one sequence per device) save `bf16[32, 4096,
4096]`; the estimate's bf16 saved + two bf16 in flight equals the f32 saved buffers by
coincidence. "Saved in float32 unless a device holds one sequence" and "the peak is at the loss
or in the last layer's backward, whichever holds more" fit the six transformer dumps read, but move
every transformer row, and the fsdp rows need the temp gap below modelled first: not applied.

## Compiled this round, predicted first

- Llama-2-7B fsdp=2,model=4 remat on bf16: estimate 7.18 GiB (held out), compiled 7.11: +1.0%.
  The rule read before this round (bf16 probabilities saved, two f32 buffers in flight) gives 8.18
  GiB (+15%): under remat the probabilities recomputed for the last layer are the float32 ones.
- Llama-2-7B data=2,fsdp=4 remat on bf16: estimate 5.99 GiB (held out), compiled 6.07: -1.3%.
- Llama-2-7B fsdp=8 remat on f32: estimate 8.08 GiB (held out), compiled 9.22: -12.4% (open, not
  dumped; no tensor axis, so this round's rules do not touch it).
- Llama-2-7B fsdp=2,model=4 f32: estimate 13.97 GiB (held out), compiled 11.67: +19.7%
  (the earlier rule: 15.97 GiB, +37%). Its buffer dump (peak at step 1060 of 2143, the last
  layer's attention backward; 8226 MiB live of a 10734 MiB temp, a 9587 MiB heap) holds exactly
  the score buffers the rule counts (`f32[4, 8, 4096, 4096]` saved per layer, one in flight:
  6 GiB); the excess is the saved activations: the traced layer outputs count 6.2 GiB of float32
  maps where about 1.7 GiB are live (four `f32[4, 4096, 4096]`, two MLP hiddens, bf16 q/k/v), and
  the f32 logits (500 MiB) are freed before the last layer's backward. The same over-count of the
  traced outputs is in the bf16 rows (Llama fsdp=2,model=4: 3.3 GiB counted, about 1.1 live), where
  the temp beyond the live set (2.1 GiB there, see MoE below) fills it; in float32 it does not.

## MoE fsdp=2,model=4: over (open)

Its buffer dump (HBM values live at the peak, `*-live-range.txt`): the peak (step 1030 of 2273) is
in the last layer's expert backward, before its attention backward; 9434 MiB live of a 10531 MiB
temp. Live: the two layers' probabilities saved in float32 (`f32[4, 8, 4096, 4096]`, 2 x 2 GiB)
and no score buffer in flight; the expert hidden `bf16[4, 4096, 8, 3584]` once per layer (the
up-projection's output: SiLU and gate are recomputed in the backward fusion) plus one gradient
(3 x 896 MiB; the estimate counts two per layer plus one); each layer's gathered `wi` and `wo`,
gathered in the forward pass and kept to its backward (no re-gather), and two re-laid-out copies
for the backward (5 x 224 MiB), plus layout copies of two expert shards (2 x 112 MiB); the
residual-stream activations (7 x `bf16[4, 4096, 4096]`, 896 MiB, about 1.0 GiB in all where the
traced layer outputs count 2.2); the f32 logits `[4, 4096, 8000]` are freed at step 982, before
the peak. Against the estimate (15.6 GiB): 2 GiB of scores in flight, 1.75 GiB of saved expert
hidden, 0.5 GiB of logits and about 1.2 GiB of activations over; 0.4 GiB of gathered weights under.

The MoE fsdp=8 step (dumped too) has the same structure at its peak (step 1054, the last layer's
expert backward): saved `bf16[32, 4096, 4096]` x 2, no scores in flight, three expert hiddens,
five gathered expert matrices (4.4 GiB) plus the gathered head (250 MiB), f32 logits (500 MiB,
live to step 1680): 10982 MiB live. But its compiled temp (14779 MiB) exceeds the heap its buffer
assignment lays out (11616 MiB over all memory spaces; the after-codegen HLO is the same) by 3.2
GiB, where the model=4 step's exceeds it by 0.8 GiB (Llama fsdp=8 0.7, Llama model=4 0.9, GPT-2
f32 0.02, ResNet-18 model=4 0.01 GiB; the fusions' scoped memory is at most 64 MiB). The fsdp
rows (-7.1%, data=2,fsdp=4 -3.2%) are close only because the over-counts above fill that gap:
correcting the terms to the live sets moves MoE fsdp=8 to about -20%. So the per-term readings are
recorded here but not applied; modelling the temp beyond the heap comes first.

## Communication

With the parser counting each collective once, the pinned gradients' reduce-scatter (fsdp-only
meshes) or whole all-reduce (any other mesh, 1-D leaves), float32 kernels gathered as bfloat16,
one input-gradient all-reduce per pair on TPU (q, k, v share their input: XLA:TPU sums their
partial gradients first) and a tied table's second gradient all-reduced whole, every row compiled
from kept HLO is within 2% except ResNet-18 fsdp=8 (-3.6%). The MoE step's reduce-scatter is the
fsdp-only rule. ViT's fsdp=8 row was recompiled this round (4 minutes on a quiet machine):
XLA:TPU all-reduces its weight gradients whole on that fsdp-only mesh (-25.9%), why is open. Loops: XLA:TPU's optimised HLO drops `known_trip_count`;
`tpflax.hlo` reads a scan's trip count from its condition (`counter < N`), so collectives
inside a scanned stack count once per layer. Remat with a tensor axis (Llama-2-7B fsdp=2,model=4
remat on, new this round): comm was -13.8%, all-reduce 2.56 GiB compiled against 2.19 estimated;
the 0.37 GiB missing was one row-parallel all-reduce per layer recomputed in the backward pass
(`bf16[4, 4096, 4096]`, 192 MiB of ring bytes over 4 devices, x 2 layers: the attention output
feeds the recomputed MLP; the MLP's own output is not needed again). cost/comm.py now counts it
on TPU (XLA:CPU re-issues none): +0.0%.

## Row outputs: what a transformer layer keeps (this round)

The traced layer outputs counted every call's output. The float32 Llama-2-7B fsdp=2,model=4 dump
(HBM values live at the peak, step 1060 of 2141, from `*-live-range.txt` and the offsets of
`*-buffer-assignment.txt`: `python benchmarks/tpu_live.py DUMP_DIR`) keeps per layer: its two norms' inputs in float32 (`f32[4, 4096, 4096]`:
the embedding's all-reduce for `layers_0/attention_norm`, the `layers_0/ffn_norm` and
`layers_1/attention_norm` fusions' outputs), the gate and up outputs (`f32[4, 4096, 2752]`), and
q, k, v and the attention output in bfloat16 (`bf16[4, 4096, 8, 64]` halves,
`bf16[4, 4096, 8, 128]`); no `o_proj` or `down_proj` output outlives its residual add, and `attn`
and `mlp` return those same buffers (counted twice before). The bf16 fsdp=8 and fsdp=2,model=4
dumps keep the same set. `Estimate.peak` now drops those outputs on TPU (a row projection of a
column -> row pair inside a repeated block holding a norm, and the parent returning it):

| row | before | after |
|---|---|---|
| Llama f32 fsdp=2,model=4 remat off / on | +19.7% / +19.9% | +2.6% / +7.1% |
| Llama bf16 fsdp=2,model=4 remat off / on | +5.8% / +1.0% | -4.3% / -6.0% |
| Llama fsdp=8 bf16 / f32, data=2,fsdp=4 bf16 / f32 | -2.9% / -3.1%, -2.9% / -4.1% | -6.4% / -7.5%, -6.1% / -8.1% |
| Llama remat bf16 fsdp=8 / data=2,fsdp=4 | -1.1% / -1.3% | -3.3% / -3.4% |
| GPT-2 f32 fsdp=8 / data=2,fsdp=4 / fsdp=2,model=4 | +14.7% / +13.3% / +6.9% | +9.8% / +8.7% / -0.6% |
| MoE bf16 fsdp=2,model=4 / fsdp=8 / data=2,fsdp=4 | +31.2% / -7.1% / -3.2% | +24.8% / -8.3% / -4.3% |
| ViT-B/16 bf16 fsdp=8 / data=2,fsdp=4 / fsdp=2,model=4 | +72.0% / +42.6% / +130.6% | +53.8% / +29.2% / +76.1% |

Still open, and why: the compiled temp exceeds the live set at the peak by a margin the estimate
does not model. From the dumps (MiB; heap = the `preallocated-temp` allocation's size):

| step | live at peak | heap | compiled temp | temp - live |
|---|---|---|---|---|
| Llama bf16 fsdp=8 | 5282 | 6001 | 6879 | 1597 |
| Llama bf16 fsdp=2,model=4 | 7351 | 8502 | 9654 | 2303 |
| Llama f32 fsdp=2,model=4 | 8226 | 9586 | 10992 | 2766 |
| Llama f32 fsdp=8 remat | 7291 | 7873 | 8486 | 1195 |
| MoE bf16 fsdp=8 | 10982 | 11504 | 14779 | 3797 |
| MoE bf16 fsdp=2,model=4 | 9434 | 9750 | 10530 | 1096 |
| GPT-2 f32 fsdp=8 | 866 | 877 | 892 | 26 |

What that margin is (issue 12; 13 compiles and 3 earlier dumps, `python benchmarks/tpu_live.py DIR
--temp BYTES`): not an allocation the dumps show (the pod step's after-codegen HLO has the optimized HLO's
instructions; the only scoped HBM is 64 MiB per reduce-scatter fusion). `temp - heap = heap - L` with L
independent of the packing: a buffer-assignment salt (`--xla_tpu_buffer_assignment_randomization_salt=7`)
moves the gap with the heap (Llama-2-7B 1 layer, 256 tokens, fsdp=8: 226.3 -> 321.7 MiB, L 917.3 both;
7B scan pod step: 908.3 -> 947.7, L 2177.4 both). L is the HBM live peak in 11 of the 16 (gap against
heap - live peak: 226.3 / 226.5 MiB; vocab 16k, 64k: 148.4 / 148.6, 444.8 / 445.0; 2 layers 424.2 / 424.6;
2 scanned layers 118.7 / 118.8; Llama bf16 fsdp=2,model=4 above 1152.0 / 1151.5), the largest live set
outside the while bodies in the pod step (908.3 / 908.5), the live set one step before the peak with the
memory-space assignment off (171.3; 141.8 at the peak), and no step's live set in Llama bf16 fsdp=8 (877.9;
719.4). So the margin is the heap's fragmentation counted twice, a property of the packing, not of a
program quantity; async-collective fusion off took it to 7 MiB in the 1-layer step, 1051 in the pod step.
Not modelled.

- Llama f32 fsdp=8 remat (-15.1%) and data=2,fsdp=4 remat (-16.0%): the estimate's terms match the
  live set (6.90 GiB estimated against 7.12 live): the peak (step 1361 of 2191) is in `layers_0`'s
  recomputed attention backward, with the recomputed f32 probabilities and their gradient
  (`f32[32, 4096, 4096]` x 2: the estimate's one in flight plus the recompute's), the float32
  weight gradients of both layers at full size before their reduce-scatter (`f32[4096, 11008]` x 8,
  `f32[4096, 32, 128]` x 3: 1.53 GiB, where the estimate's two gathered f32 layers hold 1.51), the
  head's f32 weight gradient `f32[4096, 32000]` (500 MiB, not counted) and the f32 logits (500 MiB,
  counted). What is missing is the 1.17 GiB of temp beyond the live set.
- MoE fsdp=2,model=4 (+24.8%) against MoE fsdp=8 (-8.3%): the fsdp=8 dump (peak step 1054 of 1836,
  in the last layer's expert backward) holds the saved `bf16[32, 4096, 4096]` probabilities x 2 and
  no score buffer in flight, the expert hidden `bf16[4096, 8, 14336]` once per layer plus one
  gradient (the estimate counts two per layer), the gathered `wi`/`wo` of both layers (4 x 896 MiB,
  the estimate's two gathered layers) and one unreduced `wo` gradient (896 MiB). The fsdp=2,model=4 dump (peak step 1030 of
  2273, the same point) has the same structure: `f32[4, 8, 4096, 4096]` x 2 saved, none in flight,
  `bf16[4, 4096, 8, 3584]` x 3 (two saved, one gradient). Counting those live sets term by term (no
  scores in flight, one saved hidden per layer) moves MoE fsdp=2,model=4 to -6.7% and MoE fsdp=8 to
  -31.8% (-26.3% with its unreduced expert gradient added), because the fsdp=8 step's temp exceeds
  its live set by 3.7 GiB where the model=4 step's does by 1.1: one rule cannot hold both until that
  margin is modelled. Not applied.

## The previous round, for comparison

The round after it (this one): ResNet-18 fsdp=2,model=4 bf16 -19.4% -> +8.4%, f32 -24.3% ->
-8.8% (the tensor-axis conv rule); GPT-2 f32 fsdp=2,model=4 +10.7% -> +6.9% (probabilities saved
in float32 with the heads split, scores in flight in the activation dtype); every other row
unchanged; four Llama rows compiled (above). The MoE float32 configs do not fit a v5e at this
batch: XLA:TPU refuses MoE fsdp=8 f32 ("the total memory required for HLO temporaries (16.28G)
exceeds available HBM (15.75G)"), and Estimate.peak says the same (26.7 GiB on fsdp=8, 29.8 on
data=2,fsdp=4, 23.9 on fsdp=2,model=4, against 16 GB): no compiled peak to hold them to.

This round: the conv rule above (ResNet-18 bf16 fsdp=8 -11.7% -> +10.5%, data=2,fsdp=4 -13.4% ->
+6.9%; f32 rows new, -5.3% and -10.1%), a ViT-B/16 patchify conv's output no longer counted
(+67.9% -> +65.7%), a float32 head's output counted once (GPT-2 f32 rows new, +14.7% and +13.3%
where the double count read +55% and +51%; Llama f32 +1.2% -> -3.1%), ViT's comm re-read from its
dumped HLO (-65.1% † -> -25.9%: the compiled step all-reduces 37 MiB of gradients that the
estimate reduce-scatters; cost/comm.py's rule, not changed here). The ResNet-18 bf16 rows were
recompiled with today's step (fsdp=8: 0.155 GiB where the cached row read 0.156).

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
