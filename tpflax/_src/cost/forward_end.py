"""XLA:TPU without remat: the end of the forward pass as a phase of its own, priced by the values it holds.

The estimate's peak is the backward start: every saved activation, and the last layer's attention
transients in flight beside them (``Peak.start``). A transformer whose last layer keeps more after its
attention than its attention holds in flight (ViT-B/16: 197 tokens make the probabilities small against
the MLP's maps) peaks earlier, at the **end of the forward pass**, in its final norm, before the head's and
the last MLP's backward passes free anything. The v5e:2x4 buffer dumps of the six ViT-B/16 remat-off grid
rows (32 images per chip) all peak there, in ``ln_f`` (``benchmarks/tpu_aot_notes.md``, fourteenth,
seventeenth and twentieth rounds). At that step the compiler holds, by name (f32 fsdp=2,model=4, step 780
of 1824, MiB per device):

* each norm's **input**, not its output (the norm's backward reads its input; its output is recomputed in
  the fusions of the matmuls reading it): per layer the mid-stream (``ln_2``'s input, ``fusion.318{2}``,
  ``custom-call.59``) and the block output (``copy-start{0}``, ``fusion.315{2}``), and the patch
  embedding's output (``copy-start.1{0}``), from which the first block's input is recomputed: a norm
  that is its block's first call, or a top-level norm after the last block (``ln_1``, ``ln_f``), reads
  a value already counted (the previous top-level call's output), so its output is no extra buffer
  (:func:`norm_dups`; 3 x 73.9 MiB there);
* the final norm's two float32 working maps of its input (``broadcast_subtract_fusion``,
  ``broadcast_multiply_fusion``, 2 x 73.9: flax's LayerNorm computes in float32, in 16-bit steps too);
* each MLP hidden once in a float32 step (``fusion.494{0}``, ``copy-start.2{0}``), **twice** in a 16-bit
  one when an exact GELU (``erf``) follows it (``fc1``'s fusion keeps its output and the GELU's: bf16
  fsdp=8, data=2,fsdp=4 and fsdp=2,model=4 dumps, fifteenth round; :attr:`Workload.erf` from the trace);
* the saved probabilities and q, k, v (counted as today), and no score buffer in flight.

The phase is priced when it is the larger, by the same names: the end of the forward pass holds the final
norm's maps and the last block's outputs after its attention (``ln_2``'s and ``fc1``'s, and the second
hidden), which its last attention backward no longer holds; that backward holds the score buffers in
flight instead. Otherwise the backward start is priced as before (the Llama, GPT-2 and MoE rows: their
score buffers in flight are far larger, and their count there stands for heap slack the notes name).
"""

from __future__ import annotations

import math

from tpflax._src.cost.activations import activation_bytes, layer_key, layer_runs, top_level
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.residual import alike_path, residual_outputs
from tpflax._src.cost.workload import Workload
from tpflax._src.mesh import MeshShape


def _norms(lv: Leaves) -> set[str]:
    return {alike_path(layer_key(d.unit)) for d in lv.decisions.values() if d.kind == "norm"}


def final_norm(lv: Leaves, w: Workload) -> tuple[str, str] | None:
    """``(the final norm's path, the last block's)``: a top-level norm call right after a top-level call that
    holds traced calls (a block), else None."""
    keys = list(w.activations)
    top = top_level(keys)  # once, not once per key (quadratic in the traced calls)
    tops = [k for k in keys if k in top]
    norms = _norms(lv)
    for i in range(len(tops) - 1, 0, -1):
        prev = tops[i - 1]
        if alike_path(tops[i]) in norms and any(k.startswith(prev + "/") for k in keys):
            return tops[i], prev
    return None


def norm_dups(lv: Leaves, w: Workload, shards: int) -> int:
    """Bytes on a device of the traced norm outputs whose input is already kept: a norm that is the first
    call of the top-level block holding it, at any depth (it reads the block's input, the previous top-level
    call's output; a pre-norm wrapper's ``block_0/pre_mlp/ln`` reads the mid-stream, which no traced call
    returns) and the final norm (it reads the last block's output). XLA:TPU keeps the input and recomputes the
    output. A scanned stack's norm counts once per layer (:func:`layer_runs`: a linen trace records its body
    once or twice, whatever the layer count)."""
    runs = layer_runs(w.activations, lv.stacks)
    keys = list(runs)
    tops = top_level(keys)
    norms = _norms(lv)
    fin = final_norm(lv, w)
    total = 0.0
    for path in keys:
        if alike_path(path) not in norms:
            continue
        if path in tops:
            dup = fin is not None and fin[0] == path
        else:
            parts = path.split("/")
            block = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in tops), None)
            dup = block is not None and next(k for k in keys if k.startswith(block + "/")) == path
        if dup:
            total += sum(math.prod(a.output) for a in runs[path] if a.inputs and a.inputs[0] == a.output)
    return int(total * w.act_item / shards)


def _bytes(lv: Leaves, w: Workload, mesh: MeshShape, shards: int, paths) -> int:
    calls = {p: w.activations[p] for p in paths if p in w.activations}
    return activation_bytes(lv.column_units, calls, w.batch, w.config, mesh, shards, False, w.act_item, [],
                            lv.stacks, lv.adapters)[0] if calls else 0


def erf_hidden_layers(w: Workload) -> list[str]:
    """Traced layers whose output reaches the next contraction through ``erf`` (:attr:`Workload.erf`)."""
    return [p for p in w.activations if any(layer_key(k.rsplit("/", 1)[0]) == p for k in w.erf)]


def forward_end(lv: Leaves, mesh: MeshShape, w: Workload, shards: int, held: int, transient: int,
                loss: int) -> int | None:
    """What the end of the forward pass holds beyond the saved set as counted, on a device: ``the final
    norm's two float32 maps - norm_dups + the second hidden in a 16-bit step``; None where that phase is not
    the larger or not modelled (XLA:TPU, no remat, a final norm after the last block, attention in it).

    It is the larger when the final norm's maps and the last block's saved outputs after its attention (not
    the residual ones; with their second hidden) exceed ``transient``, the score buffers the last attention
    backward holds in flight instead (``Peak``'s, in the held dtype), and the final norm's maps exceed ``loss``,
    the logits and their gradient held at the loss (after the final norm, beside the same saved set): a
    large vocabulary's loss phase is priced as before.
    """
    if w.backend != "tpu" or w.remat or not w.activations or not transient:
        return None
    fin = final_norm(lv, w)
    if fin is None:
        return None
    final, last = fin
    rows = {alike_path(layer_key(d.unit)) for d in lv.decisions.values() if d.kind == "attention" and d.role == "row"}
    inner = [k for k in w.activations if k.startswith(last + "/")]
    outs = [i for i, k in enumerate(inner) if alike_path(k) in rows]  # the attention's out-projection
    if not outs:
        return None
    residual = set(residual_outputs(lv, w.activations))
    post = [k for k in inner[outs[-1] + 1:] if k not in residual]
    second = erf_hidden_layers(w) if held == 2 else []
    scale = held / w.act_item
    post_bytes = (_bytes(lv, w, mesh, shards, post) + _bytes(lv, w, mesh, shards, [p for p in second if p in post]))
    maps = 2 * sum(math.prod(a.inputs[0]) for a in w.activations[final] if a.inputs) * 4 // shards
    if maps + post_bytes * scale <= transient or maps <= loss:
        return None
    return int(maps + (_bytes(lv, w, mesh, shards, second) - norm_dups(lv, w, shards)) * scale)
