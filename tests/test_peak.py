"""Estimate.peak: the per-device peak of one training step and its breakdown (issue 12).

The arithmetic of every term is checked exactly on small zoo models (abstract
trees; nothing compiles). The accuracy against the TPU compiler at real size is
measured in ``benchmarks/results/tpu_aot.md``; here one small step is compiled for
a v5e:2x4 topology when libtpu is installed.
"""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tpflax
from tpflax import zoo
from tpflax._src.cost.records import Peak

ADAM = optax.adamw(1e-3)


def _norm_broadcasts(acts, shards):
    # backend="cpu": each LayerNorm / RMSNorm keeps its scale and statistics broadcast to its input's shape,
    # float32 (tpflax/_src/cost/peak.py norm_broadcasts; the zoo's norms are the layers named *norm)
    return sum(2 * math.prod(a.inputs[0]) * 4 // shards for k, calls in acts.items() for a in calls
               if k.split("/")[-1].endswith("norm"))


def _estimate(name, mesh, batch=8, **cfg):
    m = zoo.get(name, **cfg)
    p = tpflax.plan(m.abstract_variables(), mesh, fsdp_min_bytes=1024)
    return m, p, tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, batch)), model=m)


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "cnn", "moe", "mlp"])
@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "model": 2}])
def test_peak_is_its_breakdown(name, mesh):
    _, p, e = _estimate(name, mesh)
    b, dev = e.breakdown, e.per_device
    assert b.arguments == dev.arguments and b.grads == dev.grads
    # on TPU a conv net keeps its convs' and norms' inputs, not its layers' outputs (test_conv_nets_keep_what_backward_reads);
    # a ViT's patchify conv keeps nothing of its own: its output leaves the count
    # the toys are float32: a head's output is the float32 logits buffer, counted once (as logits)
    saved = b.activations + b.logits
    if name == "cnn":
        assert saved >= dev.activations
    else:
        # on TPU a residual block's row projection outputs are not kept (exact in test_row_outputs_are_not_kept);
        # a block's row output (and the module returning it) is at most half of what the block saves
        # besides (its norm's input, the column outputs and their activation), so more than half remains
        assert dev.activations / 2 < saved < dev.activations, name
    # a ViT's end of the forward pass (its final norm) outholds its last attention backward: that phase, by name
    # (exact in test_vit_end_of_forward_pass_is_a_phase_by_name); the others peak at the backward start
    # an output layer split over fsdp on its features: its gathered kernel beside the logits (Peak.head)
    start = b.forward_end or b.activations + b.scores + b.experts + b.layer + b.logits + b.head
    heads = [d.spec for d in p.decisions.values() if d.kind == "head"]  # GPT-2's is its tied table: not counted
    assert (b.head > 0) == any("fsdp" in tuple(s)[:-1] for s in heads), (b.head, heads)
    assert (b.forward_end > 0) == (name == "vit")
    assert e.peak == b.total == b.arguments + max(start, b.grads + b.gathered_last)
    # on TPU the last layer's backward holds its attention's and its expert's transients one at a time
    assert b.phased and b.layer == b.gathered + b.recompute + max(b.attention, b.expert_work)
    assert e.to_dict()["peak"] == e.peak and e.to_dict()["peak_breakdown"]["total"] == e.peak
    assert e.peak >= dev.arguments + dev.activations  # the peak holds at least what the step keeps


def test_conv_nets_keep_what_backward_reads():
    # on TPU a conv net keeps each overlapping conv's input once per kernel column (3x3: 3 copies), in
    # bfloat16 (the conv multiplies in it), each norm's input and the max-pool's input, channels in 128
    # lanes; a conv on the input images keeps them lane-padded once; layer outputs are not counted.
    # Exact; the toy's activations are float32
    m, p, tpu = _estimate("cnn", {"fsdp": 8}, max_pool=True)
    cpu = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, backend="cpu")
    acts = tpflax.trace_activations(m, 8)

    def lanes(x, item, copies=1):
        return math.prod(x[:-1]) * -(-x[-1] // 128) * 128 * item / 8 * copies

    maps = sum(math.prod(a.output) * 4 / 8 for calls in acts.values() for a in calls if len(a.output) == 4)
    convs = [a for path, calls in acts.items() for a in calls if path.split("/")[-1].startswith("conv")]
    images = [a for a in convs if a.inputs[0][-1] == 3]
    assert len(images) == 1 and images[0].inputs[0] == (8, 32, 32, 3)
    kept = lanes(images[0].inputs[0], 2) + sum(lanes(a.inputs[0], 2, 3) for a in convs if a not in images)
    kept += sum(lanes(a.inputs[0], 4) for path, calls in acts.items() for a in calls if "bn" in path.split("/")[-1])
    pooled = acts["bn_init"][0].output  # 32x32 maps, max-pooled to 16x16 before block_0
    assert acts["block_0/conv1"][0].inputs[0][1:3] == (16, 16)
    kept += lanes(pooled, 4)
    assert tpu.breakdown.activations + tpu.breakdown.logits - tpu.per_device.activations == int(kept) - int(maps)
    assert cpu.breakdown.activations + cpu.breakdown.logits == cpu.per_device.activations == tpu.per_device.activations
    lm, lp, llama = _estimate("llama", {"fsdp": 8})  # no conv: the generic count off TPU (on TPU: row outputs go)
    llama_cpu = tpflax.estimate(lp, ADAM, jax.eval_shape(lambda: lm.make_batch(0, 8)), model=lm, backend="cpu")
    llama_norms = _norm_broadcasts(tpflax.trace_activations(lm, 8), 8)
    assert llama_norms > 0
    assert llama_cpu.breakdown.activations + llama_cpu.breakdown.logits == llama.per_device.activations + llama_norms
    # with a tensor axis (the ResNet-18 fsdp=2,model=4 dumps) it keeps whole maps for the images of the device
    # instead: each norm's input and the max-pool's input in 128 lanes (whatever the channels left on it), the
    # images in bfloat16 with the batch in lanes (the 2 images of a device in 128 lanes, 3 channels in 4).
    # Exact, against the generic count of layer outputs (a column-split conv's output divided by its split)
    _, p2, split = _estimate("cnn", {"data": 2, "fsdp": 2, "model": 2}, max_pool=True)
    kept = sum(math.prod(a.inputs[0][:-1]) * 128 * 4 / 4 for path, calls in acts.items() for a in calls
               if "bn" in path.split("/")[-1])
    kept += math.prod(pooled[:-1]) * 128 * 4 / 4 + 32 * 32 * 4 * 128 * 2

    def col(path):
        kernel = p2.decisions.get(f"params/{path}/kernel")
        return 2 if kernel is not None and "model" in str(kernel.spec[-1]) else 1

    generic = sum(math.prod(a.output) * 4 / 4 / col(path) for path, calls in acts.items() for a in calls
                  if len(a.output) == 4)
    assert split.breakdown.activations + split.breakdown.logits - split.per_device.activations == int(kept) - int(generic)


@pytest.mark.parametrize("batch", [64, 1024])
def test_conv_maps_whole_and_batch_first_from_8_images_per_device(batch):
    # from 8 images per device on, XLA:TPU keeps a conv net's maps whole, batch first, with no per-tap copies
    # (3x3 conv stacks compiled for v5e: 1-7 images fold width chunks into the batch, 8 and more do not; the
    # ResNet-18 fsdp=8 step at 32 images per device): each norm's and the max-pool's input, and the images in
    # bf16 with the batch in lanes; a map's images or channels in the 128 lanes, whichever pads less (8 images:
    # the channels, padded to 128; 128 images: the images, no padding). The first stage's backward holds four
    # more maps of its size (``conv_work``). Exact; the toy is float32, 3 stages of 16, 32, 64 channels
    m, p, tpu = _estimate("cnn", {"fsdp": 8}, batch=batch, max_pool=True)
    acts = tpflax.trace_activations(m, batch)
    n = batch // 8

    def whole(x):  # bytes of a float32 map on a device
        return math.prod(x[1:-1]) * n * (128 if n == 8 else x[-1]) * 4

    maps = sum(math.prod(a.output) * 4 / 8 for calls in acts.values() for a in calls if len(a.output) == 4)
    kept = sum(whole(a.inputs[0]) for path, calls in acts.items() for a in calls if "bn" in path.split("/")[-1])
    kept += whole(acts["bn_init"][0].output) + 32 * 32 * 4 * 128 * 2  # the pool's input; the images
    if n == 128:  # the images in lanes: each 3x3 conv on a map keeps its input (see the next test)
        kept += sum(whole(a.inputs[0]) for path, calls in acts.items() for a in calls
                    if path.split("/")[-1] in ("conv1", "conv2"))
    assert tpu.breakdown.activations + tpu.breakdown.logits - tpu.per_device.activations == int(kept) - int(maps)
    assert acts["block_0/conv1"][0].inputs[0] == (batch, 16, 16, 16)  # the largest input of a 3x3 conv
    assert tpu.breakdown.conv_work == 4 * whole((batch, 16, 16, 16)) and tpu.breakdown.layer > tpu.breakdown.conv_work
    _, _, small = _estimate("cnn", {"fsdp": 8}, batch=56, max_pool=True)  # 7 images per device: width folded
    assert small.breakdown.conv_work == 0


def test_conv_maps_with_the_images_in_lanes_keep_whole_conv_inputs():
    # with a tensor axis at 128 images per device (512 over data x fsdp) the maps hold the images in their 128 lanes, each norm's input
    # unpadded with the channels left on the device (a block's first norm follows a column-split conv, its second a
    # row-split one: whole), and a 3x3 conv reading whole maps keeps its input (the ResNet-18 f32 fsdp=2,model=4
    # dump: each block's input f32[128,56,56,64]{0,3,2,1}). Exact, against the generic count of layer outputs
    m, p, e = _estimate("cnn", {"data": 2, "fsdp": 2, "model": 2}, batch=512, max_pool=True)
    acts = tpflax.trace_activations(m, 512)

    def col(path):
        kernel = p.decisions.get(f"params/{path}/kernel")
        return 2 if kernel is not None and "model" in str(kernel.spec[-1]) else 1

    def whole(x, split=1):  # float32, 128 images in lanes: no padding
        return math.prod(x[1:-1]) * 128 * (x[-1] // split) * 4

    kept, prev, convs = 0, None, 0
    for path, calls in acts.items():
        for a in calls:
            name = path.split("/")[-1]
            if "bn" in name:
                kept += whole(a.inputs[0], col(prev))
            kernel = p.decisions.get(f"params/{path}/kernel")
            if kernel is not None and kernel.shape[0] == 3 and a.inputs[0][-1] > 3 and "model" not in str(
                    kernel.spec[-2]):  # a 3x3 conv reading whole maps (a block's first, column-split)
                kept += whole(a.inputs[0])
                convs += 1
        prev = path
    kept += whole(acts["bn_init"][0].output) + 32 * 32 * 4 * 128 * 2  # the max-pool's input; the images
    generic = sum(math.prod(a.output) * 4 / 4 / col(path) for path, calls in acts.items() for a in calls
                  if len(a.output) == 4)
    assert e.breakdown.activations + e.breakdown.logits - e.per_device.activations == int(kept) - int(generic)
    assert convs >= 3 and e.breakdown.conv_work == 0


@pytest.mark.parametrize("name,rows", [("llama", ("/attn/o_proj", "/attn", "/mlp/down_proj", "/mlp")),
                                       ("moe", ("/attn/out", "/attn", "/moe"))])  # moe: wo sits on the module
def test_row_outputs_are_not_kept(name, rows):
    # a row projection's output and the module returning it feed only the residual add: the TPU keeps
    # neither (the Llama-2-7B buffer dumps, tpflax/_src/cost/residual.py); off TPU the generic count stands
    m, p, e = _estimate(name, {"fsdp": 8})
    acts = tpflax.trace_activations(m, 8)
    unread = [k for k in acts if k.endswith(rows)]
    assert len(unread) == len(rows) * m.config.n_layers
    nbytes = sum(math.prod(a.output) * 4 for k in unread for a in acts[k]) // 8  # float32, batch over 8
    b, dev = e.breakdown, e.per_device
    assert b.activations + b.logits == dev.activations - nbytes
    cpu = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, backend="cpu")
    assert cpu.breakdown.activations + cpu.breakdown.logits == dev.activations + _norm_broadcasts(acts, 8)


def test_attention_scores_and_logits_exact():
    # tiny llama: 4 heads, seq 32, vocab 256, 2 layers; batch 8 over data x fsdp = 4, heads over model = 2
    m, p, e = _estimate("llama", {"data": 2, "fsdp": 2, "model": 2})
    c = m.config
    scores = 8 // 4 * (c.n_heads // 2) * c.seq_len * c.seq_len * 4  # float32 model: 4 bytes
    assert e.breakdown.scores == c.n_layers * scores  # one saved per layer, float32 (heads split over model)
    assert e.breakdown.attention == scores  # a float32 model: one buffer in flight (the gradient formed in place)
    _, _, bf16 = _estimate("llama", {"data": 2, "fsdp": 2, "model": 2}, dtype=jnp.bfloat16)
    assert bf16.breakdown.scores == e.breakdown.scores  # heads split: saved in float32 in a 16-bit model too
    assert bf16.breakdown.attention == 2 * scores // 2  # two 16-bit buffers in flight
    head = p.decisions["params/lm_head/kernel"]
    tp = 2 if "model" in str(head.spec[-1]) else 1
    assert e.breakdown.logits == 8 // 4 * c.seq_len * (c.vocab // tp) * 4


def test_tied_embedding_makes_the_logits():
    m, p, e = _estimate("gpt2", {"fsdp": 2, "model": 4})  # wte/attend: the logits over the vocabulary
    tp = 4 if "model" in str(p.decisions["params/wte/embedding"].spec[0]) else 1
    assert e.breakdown.logits == 8 // 2 * m.config.seq_len * math.ceil(m.config.vocab / tp) * 4


@pytest.mark.parametrize("dispatch", ["dense", "all-to-all"])
@pytest.mark.parametrize(("backend", "saved"), [("tpu", 1), ("cpu", 2)])
def test_expert_hidden_exact(dispatch, backend, saved):
    # saved hiddens per expert layer: XLA:TPU keeps the up-projection's output only (its MoE buffer dumps, bf16
    # and f32: one per layer plus one gradient), XLA:CPU the pre-activation and the gated hidden
    m = zoo.get("moe")  # 8 experts, d_ff 128, top_k 2, 2 layers, seq 16
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "expert": 2, "model": 2}, fsdp_min_bytes=1024)
    e = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, expert_dispatch=dispatch,
                        backend=backend)
    c, wi = m.config, p.decisions["params/layers_0/moe/wi"]
    e_split = 2 if "expert" in str(wi.spec[0]) else 1
    f_split = 2 if "model" in str(wi.spec[-1]) else 1
    per_token = c.n_experts // e_split if dispatch == "dense" else c.top_k
    # the batch over fsdp and expert; a dense expert layer gathers its tokens over the axes splitting its experts
    tokens = 8 // (2 * 2) * c.seq_len * (e_split if dispatch == "dense" else 1)
    hidden = tokens * per_token * (c.d_ff // f_split) * 4
    assert e.breakdown.experts == saved * c.n_layers * hidden and e.breakdown.expert_work == hidden



def test_expert_and_attention_backward_are_phases():
    # XLA:TPU's MoE peak is in the last layer's expert backward with no score buffer in flight (seven MoE buffer
    # dumps, benchmarks/tpu_aot_notes.md): the layer's working set is its larger phase, not the sum of both.
    # The toy's expert gradient outweighs its scores in flight, so the expert phase is the peak
    m = zoo.get("moe")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024)
    batch = jax.eval_shape(lambda: m.make_batch(0, 8))
    tpu = tpflax.estimate(p, ADAM, batch, model=m, expert_dispatch="dense").breakdown
    cpu = tpflax.estimate(p, ADAM, batch, model=m, expert_dispatch="dense", backend="cpu").breakdown
    assert 0 < tpu.attention < tpu.expert_work and tpu.recompute == 0
    assert tpu.layer == tpu.gathered + tpu.expert_work
    assert tpu.total == tpu.arguments + tpu.activations + tpu.scores + tpu.experts + tpu.layer + tpu.logits
    assert not cpu.phased and cpu.layer == cpu.gathered + cpu.attention + cpu.expert_work  # XLA:CPU: unmeasured


@pytest.mark.parametrize("layers", [2, 3])
def test_async_gathered_kernels_too_large_for_the_chip_count_twice_on_v5e(layers):
    # A v5e's compiled temp is heap + (heap - the largest live set without async collectives' values) (sixteen
    # buffer dumps, benchmarks/tpu_aot_notes.md): a layer's gathered kernel too large for its 112 MiB on-chip
    # memory stays the async all-gather's value in HBM and counts twice, every layer's but the last layer's
    # first freed (the MoE 7B steps: 3 of 4 expert kernels); under remat one layer's, the last recompute's.
    # Smaller kernels, v5p/v6e (synchronous all-gathers): nothing. Without a target the plan's hardware (a v5e by default) names the generation
    m = zoo.get("moe", d_model=1024, d_ff=9216, n_layers=layers, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    batch = jax.eval_shape(lambda: m.make_batch(0, 8))

    def est(target, plan=p, model=m):
        return tpflax.estimate(plan, ADAM, batch, model=model, expert_dispatch="dense", target=target)

    kernel = m.config.n_experts * 1024 * 9216 * 2  # wi and wo alike, 144 MiB gathered whole
    v5e = est("tpu-v5e:2x4")
    assert kernel > 112 * 2**20 and v5e.breakdown.gathered_async == (2 * layers - 1) * kernel
    assert v5e.peak == v5e.breakdown.total and "async-gathered" in "\n".join(v5e.report_lines())
    v5p = est("tpu-v5p:2x2x2")
    assert v5p.breakdown.gathered_async == 0 and est(None).breakdown == v5e.breakdown
    assert v5e.peak - v5p.peak == v5e.breakdown.gathered_async
    small = zoo.get("moe", d_model=1024, d_ff=4096, n_layers=layers, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert est("tpu-v5e:2x4", tpflax.plan(small.abstract_variables(), {"fsdp": 8}), small
               ).breakdown.gathered_async == 0  # 64 MiB kernels: the compiler may move them on chip
    remat = tpflax.estimate(p, ADAM, batch, model=m, expert_dispatch="dense", target="tpu-v5e:2x4", remat=True)
    # no layer keeps its kernels, but the last layer's recompute gathers them again, asynchronously: its wi
    # stays the all-gather's value across the expert backward's peak, its wo is freed first (the MoE 7B bf16
    # fsdp=8 remat dump, eighteenth round), whatever the layer count
    assert remat.breakdown.gathered_async == kernel
    assert tpflax.estimate(p, ADAM, batch, model=m, expert_dispatch="dense", target="tpu-v5p:2x2x2",
                           remat=True).breakdown.gathered_async == 0



def test_remat_async_gathered_kernels_of_a_scanned_stack_are_one_layers():
    # under remat only the last layer's recompute holds its gathered kernels as async values (the MoE 7B remat
    # dump, eighteenth round): one layer's kernels too large for the chip, less the one freed first. A scanned
    # stack's leaves are that layer's slices, grouped by their stack (unrolled blocks: the MoE test above)
    m = zoo.get("llama", d_model=4096, n_heads=8, n_kv_heads=8, head_dim=128, d_ff=16384, seq_len=128,
                n_layers=2, scan_layers=True, remat=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    e = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, target="tpu-v5e:2x4")
    mlp = 4096 * 16384 * 2  # gate, up and down: 128 MiB each gathered; the attention kernels (8 MiB) fit on chip
    assert e.breakdown.gathered_async == 2 * mlp


def test_a_layers_kernels_past_the_on_chip_memory_count_twice_on_v5e():
    layers = 3
    # Each of these kernels fits a v5e's 112 MiB on-chip memory, a layer's do not together (4 x 8 + 3 x 32 =
    # 128 MiB gathered): the chip stages 112 MiB of them, the rest stays the async all-gathers' values in HBM,
    # which the compiled temp counts twice, every layer's but the last's (the Llama-2-7B float32 v5e dumps:
    # 236 / 268 MiB of layer kernels held so, where this counts 274; benchmarks/tpu_aot_notes.md)
    m = zoo.get("llama", d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, d_ff=8192, seq_len=256,
                n_layers=layers)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    batch = jax.eval_shape(lambda: m.make_batch(0, 8))

    def est(target, plan=p, model=m, **kw):
        return tpflax.estimate(plan, ADAM, batch, model=model, target=target, **kw)

    layer = (4 * 2048 * 2048 + 3 * 2048 * 8192) * 2  # gathered as bfloat16 (float32 kernels too)
    v5e = est("tpu-v5e:2x4")
    assert v5e.breakdown.gathered_overflow == (layers - 1) * (layer - 112 * 2**20) > 0
    assert v5e.breakdown.gathered_async == 0  # no kernel too large for the chip alone
    assert v5e.peak == v5e.breakdown.total and "past the chip" in "\n".join(v5e.report_lines())
    v5p = est("tpu-v5p:2x2x2")
    assert v5p.breakdown.gathered_overflow == 0 and v5e.peak - v5p.peak == v5e.breakdown.gathered_overflow
    assert est("tpu-v5e:2x4", remat=True).breakdown.gathered_overflow == 0  # gathered inside the recompute
    # a tensor axis splits each layer's kernels to 32 MiB: they fit on chip together
    tp = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4})
    assert est("tpu-v5e:2x4", tp).breakdown.gathered_overflow == 0
    small = zoo.get("llama", d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128, d_ff=5504, seq_len=256,
                    n_layers=layers)  # 96.5 MiB a layer: the tenth round's medium Llama, none counted
    assert est("tpu-v5e:2x4", tpflax.plan(small.abstract_variables(), {"fsdp": 8}), small
               ).breakdown.gathered_overflow == 0

def test_scores_follow_the_activation_dtype():
    _, _, f32 = _estimate("llama", {"fsdp": 8})
    _, _, bf16 = _estimate("llama", {"fsdp": 8}, dtype=jnp.bfloat16)
    assert bf16.breakdown.scores * 2 == f32.breakdown.scores
    assert bf16.breakdown.logits == f32.breakdown.logits  # the loss is float32 either way
    # in flight: two 16-bit buffers (probabilities' and scores' gradients), one float32 (in place)
    layers = zoo.get("llama").config.n_layers
    assert bf16.breakdown.attention == 2 * bf16.breakdown.scores // layers
    assert f32.breakdown.attention == f32.breakdown.scores // layers


def test_gathered_fsdp_weights_exact():
    m, p, e = _estimate("llama", {"fsdp": 8})

    def blocks(item):  # bytes of each block gathered whole (fsdp removed), largest first
        layer = sum(item(d) for path, d in p.decisions.items()
                    if path.startswith("params/layers_0/") and "fsdp" in str(d.spec))
        return sorted([layer, layer] + [item(d) for path, d in p.decisions.items()
                                        if "layers_" not in path and "fsdp" in str(d.spec)], reverse=True)

    whole = blocks(lambda d: d.bytes)
    cpu = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, backend="cpu")
    assert cpu.breakdown.gathered == sum(whole[:2])  # the two largest blocks
    assert cpu.breakdown.gathered_last == whole[0]
    # XLA:TPU gathers a float32 matmul kernel as bfloat16 and holds the next block's whole gradient
    # in float32 (the Llama-2-7B and MoE float32 buffer dumps): the toy's layers are its largest blocks
    gathered = blocks(lambda d: d.bytes // 2 if d.kind in ("dense", "attention") else d.bytes)
    assert e.breakdown.gathered_last == gathered[0] < whole[0]
    assert e.breakdown.gathered == gathered[0] + whole[1]
    _, _, dp = _estimate("llama", {"data": 8})
    assert dp.breakdown.gathered == dp.breakdown.gathered_last == 0  # nothing to gather without fsdp


@pytest.mark.parametrize("name", ["llama", "llama-scan"])
def test_tpu_keeps_every_layers_gathered_weights_without_remat(name):
    # XLA:TPU keeps each layer's gathered fsdp weights from its forward to its backward pass (ten v5e:2x4 dumps,
    # benchmarks/tpu_aot_notes.md): beyond the two layers in `gathered`, (n_layers - 2) layers' worth, the TPU
    # gathering float32 matmul kernels as bfloat16 (gather_item); nothing under remat, nothing off TPU (unmeasured)
    from tpflax._src.cost.gradients import gather_item

    def one_layer(p):  # one layer's weights gathered over fsdp: the shard's bytes x 8, a scanned leaf / its layers
        return sum(gather_item(d, "tpu") * math.prod(d.shape) // (d.shape[0] if d.layers_dim == 0 else 1)
                   for path, d in p.decisions.items()
                   if path.startswith(("params/layers_0/", "params/layers/")) and "fsdp" in str(d.spec))

    for layers in (2, 4):
        m = zoo.get(name, n_layers=layers, remat=False)
        stacked = {"stacked": "layers"} if name == "llama-scan" else {}
        p = tpflax.plan(m.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024, **stacked)
        batch = jax.eval_shape(lambda m=m: m.make_batch(0, 8))
        e = tpflax.estimate(p, ADAM, batch, model=m, backend="tpu")
        assert one_layer(p) > 0 and e.breakdown.gathered_kept == (layers - 2) * one_layer(p)
        assert e.peak == e.breakdown.total and ("kept gathered weights" in "\n".join(e.report_lines())) == (layers > 2)
        cpu = tpflax.estimate(p, ADAM, batch, model=m, backend="cpu")
        on = zoo.get(name, n_layers=layers, remat=True)
        remat = tpflax.estimate(tpflax.plan(on.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024, **stacked),
                                ADAM, batch, model=on, backend="tpu")
        assert cpu.breakdown.gathered_kept == remat.breakdown.gathered_kept == 0


def test_scanned_stack_gathers_one_layer():
    m = zoo.get("llama-scan")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024, stacked="layers")
    e = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m)
    stacked = sum(math.prod(d.shape[1:]) * d.bytes // math.prod(d.shape)
                  for path, d in p.decisions.items() if "/layers/" in path and "fsdp" in str(d.spec))
    assert 0 < e.breakdown.gathered_last <= max(stacked, e.breakdown.gathered_last)
    assert e.breakdown.gathered <= 2 * max(stacked, e.breakdown.gathered_last)


def test_remat_trades_saved_scores_for_recompute():
    _, _, off = _estimate("llama", {"fsdp": 8})
    _, _, on = _estimate("llama", {"fsdp": 8}, remat=True)
    assert on.breakdown.scores == 0 and off.breakdown.recompute == 0
    assert on.breakdown.activations < off.breakdown.activations
    # one layer's recompute: its share of what remat stops saving, and its scores
    per_layer = (off.breakdown.activations - on.breakdown.activations) / 2 + off.breakdown.scores / 2
    assert on.breakdown.recompute == int(per_layer)
    assert on.peak < off.peak


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_remat_loss_and_last_layer_backward_are_phases(dtype):
    # XLA:TPU under remat (v5e dumps of GPT-2 f32 fsdp=8 and bf16 fsdp=8 / data=2,fsdp=4 remat, Llama-2-7B bf16
    # fsdp=2,model=4 remat; benchmarks/tpu_aot_notes.md, eighteenth round): the float32 logits are freed before
    # the last layer's backward starts, so the peak is the larger of the loss phase (saved block inputs, logits,
    # the tied table gathered for the lookup and held to the head, in a float32 step the head's whole weight
    # gradient) and the layer's backward, without the logits. Before: their sum
    m, p, e = _estimate("gpt2", {"fsdp": 8}, remat=True, dtype=dtype, param_dtype=dtype)
    b, c = e.breakdown, m.config
    item = jnp.dtype(dtype).itemsize
    table = c.vocab * c.d_model * item  # wte gathered whole over fsdp, in its dtype
    assert b.head == table + (table if item == 4 else 0) and b.loss_apart
    loss = b.logits + b.logits_grad + b.head
    # the layer phase without the last block's and ln_f's saved outputs (Peak.tail, the next test)
    assert b.total == b.arguments + max(b.activations + max(loss, b.gathered_async + b.layer - b.tail),
                                        b.grads + b.gathered_last)
    assert b.total < b.arguments + b.activations + b.layer + b.logits + b.logits_grad  # not their sum
    assert "a phase apart" in "\n".join(e.report_lines())
    off = _estimate("gpt2", {"fsdp": 8}, dtype=dtype, param_dtype=dtype)[2].breakdown
    cpu = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, backend="cpu").breakdown
    assert off.head == cpu.head == 0 and not (off.loss_apart or cpu.loss_apart)  # remat off, XLA:CPU: unmeasured


def test_remat_head_split_float32_scores_stack_in_a_16bit_step():
    # XLA:TPU under remat, a 16-bit step with the heads split over a tensor axis: the last layer's recompute
    # makes the scores A and the probabilities P in float32, each a buffer; A's freed region takes the layer's
    # other recomputed activations, so of the attention backward's two bfloat16 buffers in flight (together A)
    # one fits it and one stacks above P; A less that buffer is slack the compiled temp counts twice (the
    # Llama-2-7B bf16 fsdp=2,model=4 remat v5e dump, -8.0% before; MoE bf16 fsdp=2,model=4 remat, predicted
    # -5.7% with it; benchmarks/tpu_aot_notes.md, eighteenth round). A float32 step makes P in A's buffer
    m, _, e = _estimate("llama", {"fsdp": 2, "model": 4}, remat=True, seq_len=256, dtype=jnp.bfloat16,
                        param_dtype=jnp.bfloat16)
    b, c = e.breakdown, m.config
    elems = 8 // 2 * (c.n_heads // 4) * c.seq_len * c.seq_len  # a device's scores: batch over fsdp, heads over model
    scores, buf = elems * 4, elems * 2  # A (and P) float32, a buffer in flight bfloat16
    hosted = b.recompute - scores  # the recompute beside P, placed in A's freed region
    assert 0 < hosted < scores and b.attention == 2 * buf
    assert b.score_stack == 2 * (scores - buf) - hosted
    assert b.layer == b.gathered + b.recompute + b.attention + b.score_stack
    assert "float32 scores' region stacked" in "\n".join(e.report_lines())
    for other in ({"mesh": {"fsdp": 8}}, {"dtype": jnp.float32}, {"remat": False}):
        kw = {"mesh": {"fsdp": 2, "model": 4}, "remat": True, "dtype": jnp.bfloat16} | other
        mesh = kw.pop("mesh")
        assert _estimate("llama", mesh, seq_len=256, param_dtype=kw["dtype"], **kw)[2].breakdown.score_stack == 0


def test_remat_layer_phase_holds_block_inputs_and_a_patchify_net_keeps_its_images_relaid_out():
    # XLA:TPU under remat (v5e dumps of ViT-B/16 f32 and bf16 fsdp=2,model=4, f32 fsdp=8 and data=2,fsdp=4, bf16
    # fsdp=8, Llama-2-7B f32 fsdp=2,model=4 and bf16 fsdp=8 remat; benchmarks/tpu_aot_notes.md, nineteenth round):
    # (1) at the last layer's backward the saved stream maps are the blocks' inputs: the last block's output and the
    # final norm's are dead there (their backward passes ran first), though the loss phase holds them; the head's
    # output is no stream map and stays. ViT-B/16 f32 fsdp=2,model=4 remat: +22.6% -> +0.8%.
    # (2) a patchify front end's images are relaid out once in bfloat16, the batch in the 128 lanes, and kept for
    # the whole step below 128 images per device (ViT-B/16 bf16 fsdp=8 remat: -12.0% -> -0.9%)
    m, _, e = _estimate("vit", {"fsdp": 8}, batch=16, remat=True)
    b, c = e.breakdown, m.config
    side = c.image_size // c.patch_size
    stream = 16 // 8 * (side * side + 1) * c.d_model * 4  # a device's float32 [images, patches + cls, d_model]
    assert b.loss_apart and b.tail == 2 * stream  # encoderblock_1's and ln_f's outputs
    loss = b.logits + b.logits_grad + b.head
    assert b.start == b.activations + max(loss, b.gathered_async + b.layer - b.tail)
    assert b.start < b.activations + max(loss, b.gathered_async + b.layer)
    images = c.image_size * c.image_size * 4 * 128 * 2  # bf16 [2, 32, 32, 3] as [32, 32, 4 sublanes, 128 lanes]
    patches = 16 // 8 * side * side * 128 * 4  # the patch conv's f32 output, its 64 channels in 128 lanes
    assert b.activations == patches + 3 * stream + images  # block 0's and 1's outputs, ln_f's; the images
    assert "dead in the layer's" in "\n".join(e.report_lines())
    off = _estimate("vit", {"fsdp": 8}, batch=16)[2].breakdown
    assert off.tail == 0 and off.activations < images  # remat off: neither (see the notes)
    # 128 images per device: the argument is read in place, no relayout
    many = _estimate("vit", {"fsdp": 8}, batch=1024, remat=True)[2].breakdown
    assert many.activations == 64 * (3 * stream) + 1024 // 8 * side * side * c.d_model * 4


def test_remat_recomputes_one_layer_of_a_model_without_a_config():
    # a bare linen model has no config's n_layers: the trace's remat'd calls count its layers, so the
    # backward recomputes one block's activations, whatever the depth and whether the blocks are scanned
    # (before: all of them, as one layer; a scanned stack's body counted as traced, twice, not per layer).
    # Exact: the blocks are alike, so one block's share is the same number in all four nets
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    rec = {}
    for scan in (False, True):
        for layers in (2, 3):
            m = _Net(layers=layers, scan=scan, remat=True)
            p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"fsdp": 8}, model=m, sample=(ids,))
            e = tpflax.estimate(p, ADAM, (8, 32), model=m, sample=(ids,))
            assert e.settings["remat"], e.settings
            rec[scan, layers] = e.breakdown.recompute
    assert len(set(rec.values())) == 1 and rec[False, 2] > 0, rec


@pytest.mark.parametrize("batch", [64, 1024])
def test_remat_conv_net_keeps_its_stem_and_block_inputs_laid_out_as_whole_maps(batch):
    # under remat a conv net's stem (not remat'd) keeps what it keeps without remat (its norm's input, the
    # max-pool's input, the images batch in lanes below 128 images per device) and each remat'd block its input,
    # laid out as whole maps are (map_bytes): 8 images per device, 16 channels padded to 128 lanes; 128, the images
    # in the lanes, unpadded (the ResNet-18 remat dumps, tpu_aot_notes.md, nineteenth round: bf16 fsdp=8 +39.5% ->
    # +4.1%). A projection block's input, which only its convs read, in bfloat16 (twentieth round). Exact, float32
    m, p, e = _estimate("cnn", {"fsdp": 8}, batch=batch, max_pool=True, remat=True)
    acts = tpflax.trace_activations(m, batch)
    n = batch // 8

    def whole(x, item=4):  # bytes of a map on a device
        return math.prod(x[1:-1]) * n * (128 if n == 8 else x[-1]) * item

    (conv,), (bn,) = acts["conv_init"], acts["bn_init"]
    blocks = [(calls[0].inputs[0], calls[0].output) for path, calls in acts.items()
              if path.startswith("block_") and "/" not in path]
    # at 128 images per device the images argument is read in place (the ResNet-18 fsdp=2,model=4 remat dumps)
    images = math.prod(conv.inputs[0][1:3]) * 4 * 128 * 2 if n < 128 else 0  # bf16, 3 channels in 4 sublanes
    stem = whole(conv.output) + whole(bn.output) + images  # the norm's input and the max-pool's
    # block_0 adds its input to its output (f32); block_1 and block_2 project theirs (only their convs read it: bf16)
    assert [x == y for x, y in blocks] == [True, False, False]
    kept = stem + sum(whole(x, 4 if x == y else 2) for x, y in blocks)
    top = [a.output for path, calls in acts.items() for a in calls if "/" not in path and len(a.output) == 4]
    maps = sum(math.prod(x) * 4 / 8 for x in top)  # the generic count: the top-level outputs
    assert len(blocks) == 3 and e.breakdown.activations + e.breakdown.logits - e.per_device.activations == int(
        kept) - int(maps)
    # the stem's backward: its maps and the first block's input gradient (the pool input's, 4 MiB, fits on chip)
    assert (e.breakdown.stem, e.breakdown.stem_grad) == (stem + whole(blocks[0][0]), 0)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_remat_conv_net_stem_backward_is_a_phase(dtype):
    # ResNet-18 at 32 images per device, remat'd blocks, v5e: the stem's backward holds the stem conv's two
    # outputs, the images, the first block's input gradient and the max-pool input's gradient, which the on-chip
    # memory (112 MiB) takes in bf16 (98 MiB) and not in f32 (196, in HBM, placed above the saved set: the temp
    # counts the heap's slack once more). The v5e dumps (tpu_aot_notes.md, nineteenth round): f32 live peak 698 MiB
    # in that phase, heap 789 (the gradient at 590 MiB); bf16 326 MiB, the saved set alone, no gradient in HBM
    import jax.numpy as jnp

    kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16} if dtype == "bf16" else {}
    m = zoo.get("resnet18", "real", remat=True, **kw)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    e = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 256)), model=m, target="tpu-v5e:2x4")
    b, item, mib = e.breakdown, 4 if dtype == "f32" else 2, 2 ** 20
    stem_map = 32 * 112 * 112 * 128 * item  # 64 channels in 128 lanes: 196 MiB in f32
    first = 32 * 56 * 56 * 128 * item  # block_0's input (the max-pool's output) and its gradient
    images = 224 * 224 * 4 * 128 * 2
    pooled = stem_map if dtype == "f32" else 0
    assert (b.stem, b.stem_grad) == (2 * stem_map + images + first + pooled, pooled)
    # the blocks' inputs, stage by stage; the projection blocks' (block_2, 4, 6: only their convs read them) in
    # bfloat16 (the f32 dump keeps block_2's as bf16[32,56,56,64], tpu_aot_notes.md, twentieth round)
    proj = 2 if dtype == "f32" else 1
    blocks = 2 * first + first // proj + first // 4 + first // 4 // proj + first // 8 + first // 8 // proj \
        + first // 16
    head = 0 if dtype == "f32" else 32 * 1000 * 2  # a 16-bit head's output (a float32 one is the logits buffer)
    assert b.activations == 2 * stem_map + images + blocks + head
    live = max(b.activations + max(b.logits + b.logits_grad + b.head, b.layer), b.stem)
    heap = max(live, b.activations + pooled)
    assert b.total == b.arguments + 2 * heap - live
    # f32: the heap is the saved set with the gradient above it, the live peak the stem's backward; bf16: the saved set
    # at the backward start (before: the whole net's recompute on top, 483.2 MiB beside the arguments; compiled 341)
    assert (heap, live) == ((b.activations + pooled, b.stem) if dtype == "f32" else (live, b.start))
    assert dtype == "f32" or b.start < 360 * mib
    assert "conv stem backward" in "\n".join(e.report_lines())


def test_report_shows_the_breakdown():
    _, _, e = _estimate("llama", {"fsdp": 8})
    text = "\n".join(e.report_lines())
    for word in ("peak per device", "saved activations", "saved attention scores", "gathered fsdp weights",
                 "working set: logits", "gradients (at the end)"):
        assert word in text


def test_report_header_sums_the_phase_it_names():
    # the header's formula is the phase's: a phase priced whole (the end of the forward pass, a conv stem's
    # backward) is named, not written as saved + layer + logits, and the heap's slack the temp counts is said
    fwd = Peak(arguments=3, activations=6, gathered=5, attention=4, phased=True, forward_end=12)
    assert fwd.phase()[0] == "forward end"
    assert "(at the forward end; arguments + max(end of the forward pass, grads" in fwd.report_lines()[0]
    stem = Peak(activations=10, stem=12, stem_grad=6)  # the gradient above the saved set: slack 10 + 6 - 12, twice
    assert stem.phase() == ("stem backward", {"stem": 12, "heap_slack": 8}) and stem.total == 20
    assert "(at the stem backward; arguments + max(conv stem backward + heap slack 8 B, grads" in stem.report_lines()[0]
    start = Peak(activations=6, gathered=5, logits=3)
    assert "(at the backward start; arguments + max(saved + layer + logits, grads" in start.report_lines()[0]


@pytest.mark.slow
def test_tpu_compile_small_step_on_v5e():
    """One small step compiled by the TPU compiler (libtpu's AOT path; no TPU needed)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'tpflax[tpu]'")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock file guards chips, not compiles
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")
    mesh = Mesh(np.array(topo.devices).reshape(2, 4), ("data", "fsdp"))
    m, p, e = _estimate("llama", {"data": 2, "fsdp": 4}, n_layers=1, d_model=256, d_ff=512, seq_len=128,
                        head_dim=64)
    ts = tpflax.make_train_step(m, p, mesh, ADAM, 8)
    c = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
                donate_argnums=ts.donate_argnums).lower(*ts.args).compile()
    ma = c.memory_analysis()
    peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
    # TPU memory is tiled (8 x 128 elements): a toy's small leaves (norm scales, 1-D moments) each take a
    # whole tile, so the compiled arguments exceed the exact byte count; at real size the padding vanishes
    assert e.per_device.arguments <= ma.argument_size_in_bytes < 1.5 * e.per_device.arguments
    # a 1-layer toy: XLA's fixed scratch weighs more than at real size, so only the order of magnitude
    assert 0.3 < e.peak / peak < 3, (e.peak, peak)


def test_head_split_projections_save_their_share():
    # a DenseGeneral q/k/v kernel (d, heads, head_dim) split over model on its heads dim leaves
    # [.., heads / model, head_dim] of its output on a device, though its last dim is whole: the saved
    # activations count that share (before, the whole output). Exact: every traced output over the batch
    # shards (fsdp=2), a column layer's over its split (the q/k/v heads dim, fc1's last dim)
    m = zoo.get("vit")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4}, fsdp_min_bytes=1024)
    acts = tpflax.trace_activations(m, 8)  # traced once, for the estimate and the expected count
    e = tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 8)), model=m, activations=acts)
    assert tuple(p.decisions["params/encoderblock_0/attn/query/kernel"].spec)[1] == "model"

    def split(path):
        k = p.decisions.get(f"params/{path}/kernel")
        return 4 if k is not None and k.role == "column" else 1

    item = jnp.dtype(m.config.dtype).itemsize
    want = sum(math.prod(a.output) * item / 2 / split(path) for path, calls in acts.items() for a in calls)
    assert e.per_device.activations == int(want)


class _Block(nn.Module):
    heads: int = 8

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=x.shape[-1])(y, y)
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))))


class _Net(nn.Module):
    layers: int = 3
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(512, 64)(ids)
        block = nn.remat(_Block) if self.remat else _Block
        if self.scan:
            stack = nn.scan(lambda blk, h, _: (blk(h), None), variable_axes={"params": 0},
                            split_rngs={"params": True}, length=self.layers)
            x, _ = stack(block(), x, None)
        else:
            for _ in range(self.layers):
                x = block()(x)
        return nn.Dense(512)(nn.LayerNorm()(x))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("mesh", [{"data": 2, "model": 4}, {"fsdp": 8}])
def test_traced_attention_scores_without_a_config(scan, mesh):
    # a user's linen model has no config with heads and a sequence length: its q @ k products, read off the
    # trace, give the scores (before: none, however long the sequence). Exact: batch 16 over the batch
    # shards, 8 heads over the tensor split of the q/k kernels' heads dim, 128 x 128 per head, float32
    m = _Net(scan=scan)
    ids = jax.ShapeDtypeStruct((16, 128), jnp.int32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), mesh, model=m, sample=(ids,))
    e = tpflax.estimate(p, ADAM, (16, 128), model=m, sample=(ids,))
    tp, shards = mesh.get("model", 1), 16 // (mesh.get("data", 1) * mesh.get("fsdp", 1))
    q = next(d for path, d in p.decisions.items() if path.endswith("query/kernel"))
    heads_dim = 1 if q.layers_dim is None else 2  # (d, heads, head_dim), scanned (layers, d, heads, head_dim)
    assert ("model" in str(tuple(q.spec)[heads_dim])) == (tp > 1)  # the heads dim split over model
    one = shards * (8 // tp) * 128 * 128 * 4
    assert e.breakdown.scores == 3 * one  # one saved per layer (a scanned layer counts its trip count)
    assert e.breakdown.attention == one  # a float32 model: one in flight


def test_tpu_scores_take_their_tiles():
    # XLA:TPU stores a score matrix in (8, 128) tiles, the keys in lanes: ViT-B/16's bf16[32, 12, 197, 197]
    # probabilities take 37.5 MiB ([32, 12, 200, 256]) in its v5e buffer dumps at 4 and 32 images per device.
    # A tiny ViT of 2-pixel patches attends over 257 tokens: 264 x 384 per head on TPU, 257 x 257 off it
    # (XLA:CPU stores them dense). The traced path (a model without a config) pads alike: 200 tokens.
    m = zoo.get("vit", patch_size=2)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024)
    batch = jax.eval_shape(lambda: m.make_batch(0, 16))
    c, seq = m.config, m.config.n_patches + 1
    assert seq == 257
    for backend, tile in {"tpu": 264 * 384, "cpu": seq * seq}.items():
        e = tpflax.estimate(p, ADAM, batch, model=m, backend=backend)
        assert e.breakdown.scores == c.n_layers * 16 // 8 * c.n_heads * tile * 4
    net = _Net()
    ids = jax.ShapeDtypeStruct((16, 200), jnp.int32)
    p = tpflax.plan(jax.eval_shape(net.init, jax.random.key(0), ids), {"fsdp": 8}, model=net, sample=(ids,))
    for backend, tile in {"tpu": 200 * 256, "cpu": 200 * 200}.items():
        e = tpflax.estimate(p, ADAM, (16, 200), model=net, sample=(ids,), backend=backend)
        assert e.breakdown.scores == 3 * 16 // 8 * 8 * tile * 4


@pytest.mark.parametrize("mesh,tensor", [({"fsdp": 8}, 1), ({"fsdp": 2, "model": 4}, 4)])
@pytest.mark.parametrize("patch", [2, 8])
def test_tpu_16bit_attention_keeps_q_k_v_and_context_in_lanes(mesh, tensor, patch):
    # XLA:TPU keeps each attention layer's q, k, v and context (the out-projection's input, no traced output)
    # with the sequence in the 128 lanes: ViT-B/16's v5e bf16 dumps hold four bf16[32,197,12,64] per layer,
    # 12 MiB each ([32,12,64,256]; benchmarks/tpu_aot_notes.md, seventeenth round). A tiny ViT of 2-pixel
    # patches attends over 257 tokens (384 lanes); of 8-pixel patches over 17 (fewer than a lane row: dense).
    # The float32 twin (its logits counted apart) is the 16-bit count without them, at half the bytes.
    def est(**kw):
        m = zoo.get("vit", patch_size=patch, **kw)
        p = tpflax.plan(m.abstract_variables(), mesh, fsdp_min_bytes=1024)
        return m, tpflax.estimate(p, ADAM, jax.eval_shape(lambda: m.make_batch(0, 16)), model=m)

    m, b16 = est(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    _, f32 = est()
    c, seq = m.config, m.config.seq_len
    lanes = -(-seq // 128) * 128 if seq >= 128 else seq
    shards = 8 // tensor
    kept = c.n_layers * 16 // shards * c.d_model // tensor * 2 * (lanes + 3 * (lanes - seq))
    assert b16.breakdown.activations == (f32.breakdown.activations + f32.breakdown.logits) // 2 + kept


def test_a_bare_batch_shape_is_the_sample_of_a_module():
    # estimate(model=module, batch=(16, 128)) without sample: one input of the batch's shape, token ids
    # when the tree has an embedding table (float features otherwise), the same as passing it; said in settings
    m = _Net(layers=1)
    ids = jax.ShapeDtypeStruct((16, 128), jnp.int32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"data": 2, "model": 4}, model=m, sample=(ids,))
    bare = tpflax.estimate(p, ADAM, (16, 128), model=m)
    assert bare.peak == tpflax.estimate(p, ADAM, (16, 128), model=m, sample=(ids,)).peak
    assert "int32" in bare.settings["sample"]
    mlp = nn.Dense(8)
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    q = tpflax.plan(jax.eval_shape(mlp.init, jax.random.key(0), x), {"data": 2})
    assert tpflax.estimate(q, ADAM, (16, 32), model=mlp).peak == tpflax.estimate(q, ADAM, (16, 32), model=mlp,
                                                                                  sample=(x,)).peak


def test_tied_logits_of_a_plain_function_are_split_like_its_table():
    # a plain function's contraction of its lookup table is the tied logits: counted as the logits buffer,
    # split as the vocab-parallel table splits them (before: an activation of the whole vocabulary, 4x too
    # large on model=4 for HF OPT and BLOOM, and no logits term)
    v, d = 512, 64
    tree = {"emb": jax.ShapeDtypeStruct((v, d), jnp.float32), "w": jax.ShapeDtypeStruct((d, d), jnp.float32)}

    def lm(p, ids):
        return jnp.tanh(p["emb"][ids] @ p["w"]) @ p["emb"].T

    ids = jax.ShapeDtypeStruct((16, 32), jnp.int32)
    p = tpflax.plan(tree, {"data": 2, "model": 4}, model=lm, sample=(ids,))
    assert tuple(p.decisions["emb"].spec)[0] == "model"  # vocab-parallel
    e = tpflax.estimate(p, ADAM, model=lm, sample=(ids,))
    rows = 16 // 2 * 32
    assert e.breakdown.logits == rows * (v // 4) * 4
    # float32: the logits are that one buffer, not also an activation; the hidden layer (w, d wide) remains
    assert e.breakdown.activations == rows * d * 4


@pytest.mark.parametrize("seq", [4, 8])
def test_probs_times_values_is_not_a_second_score_product(seq):
    # a sequence no longer than the head dim (8 here): the q @ k product does not expand and probs @ v does
    # not shrink; only q @ k is the layer's scores (before: probs @ v counted too, or instead)
    m = _Net()
    ids = jax.ShapeDtypeStruct((16, seq), jnp.int32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"data": 2, "model": 4}, model=m, sample=(ids,))
    e = tpflax.estimate(p, ADAM, (16, seq), model=m, sample=(ids,))
    assert e.breakdown.scores == 3 * (16 // 2) * (8 // 4) * seq * seq * 4


def test_moe_dispatch_and_combine_are_no_attention_scores():
    class MoE(nn.Module):
        @nn.compact
        def __call__(self, x):  # (groups, tokens, d): top-1 routing to 4 experts of capacity 8
            idx = jnp.argmax(nn.Dense(4, name="router")(x), -1)
            dispatch = jax.nn.one_hot(jnp.cumsum(jax.nn.one_hot(idx, 4, dtype=jnp.int32), 1) - 1, 8)  # (g, s, e, c)
            xe = jnp.einsum("gsec,gsd->egcd", dispatch, x)
            w = self.param("w", nn.initializers.lecun_normal(), (4, x.shape[-1], x.shape[-1]))
            return x + jnp.einsum("gsec,egcd->gsd", dispatch, jnp.einsum("egcd,edf->egcf", xe, w))

    x = jax.ShapeDtypeStruct((8, 32, 64), jnp.float32)
    m = MoE()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2}, model=m, sample=(x,))
    e = tpflax.estimate(p, ADAM, model=m, sample=(x,))
    assert e.breakdown.scores == e.breakdown.attention == 0


@pytest.mark.parametrize("bias", [False, True])
def test_a_next_token_loss_holds_the_logits_gradient_apart(bias):
    # tpflax's default loss for a model on token ids reads logits[:, :-1]: XLA:TPU then holds the sliced
    # logits and their gradient (HF BERT-base and GPT-2 buffer dumps), the gradient in bfloat16 unless a bias
    # added to the logits reads it too; a zoo model's loss (separate labels) forms it in place
    v, d = 512, 64
    tree = {"emb": jax.ShapeDtypeStruct((v, d), jnp.float32), "head": jax.ShapeDtypeStruct((d, v), jnp.float32),
            "b": jax.ShapeDtypeStruct((v,), jnp.float32)}

    def lm(p, ids):
        logits = jnp.tanh(p["emb"][ids]) @ p["head"]
        return logits + p["b"] if bias else logits

    ids = jax.ShapeDtypeStruct((16, 32), jnp.int32)
    p = tpflax.plan(tree, {"data": 2, "model": 4}, model=lm, sample=(ids,))
    e = tpflax.estimate(p, ADAM, model=lm, sample=(ids,))
    assert e.breakdown.logits > 0
    assert e.breakdown.logits_grad == (e.breakdown.logits if bias else e.breakdown.logits // 2)
    _, _, zoo_est = _estimate("gpt2", {"data": 2, "model": 4})
    assert zoo_est.breakdown.logits > 0 and zoo_est.breakdown.logits_grad == 0


def _frames_lm():
    # a decoder over audio-like frames (Whisper's shape of inputs): its first input is float, so the
    # default loss cannot be inferred and the step's loss is the user's own
    v, d = 512, 64
    tree = {"enc": jax.ShapeDtypeStruct((80, d), jnp.float32), "emb": jax.ShapeDtypeStruct((v, d), jnp.float32)}

    def lm(p, frames, ids):  # tied logits, as Whisper's decoder
        ctx = jnp.tanh(frames @ p["enc"]).mean(1, keepdims=True)
        return jnp.tanh(p["emb"][ids] + ctx) @ p["emb"].T

    sample = (jax.ShapeDtypeStruct((16, 48, 80), jnp.float32), jax.ShapeDtypeStruct((16, 32), jnp.int32))
    return tree, lm, sample


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


@pytest.mark.parametrize("loss, apart", [
    (None, False),  # no loss given: the default (none for float frames) holds nothing apart
    (lambda out, frames, ids: _xent(out[:, :-1], ids[:, 1:]), True),  # reads a slice: held apart
    (jax.jit(lambda out, frames, ids: _xent(out.astype(jnp.float32)[:, :-1], ids[:, 1:])), True),  # cast, jitted
    (lambda out, frames, ids: _xent(out, ids), False),  # whole logits: the gradient formed in place
])
def test_the_loss_given_says_whether_the_logits_gradient_is_held_apart(loss, apart):
    # estimate(..., loss=) prices the step make_train_step(..., loss=) compiles: the loss is traced on
    # the model's abstract output (before: only tpflax's default next-token loss was known to slice)
    tree, lm, sample = _frames_lm()
    p = tpflax.plan(tree, {"data": 2, "model": 4}, model=lm, sample=sample)
    e = tpflax.estimate(p, ADAM, model=lm, sample=sample, loss=loss)
    assert e.breakdown.logits > 0
    assert e.breakdown.logits_grad == (e.breakdown.logits // 2 if apart else 0)
    assert ("loss" in e.settings) == (loss is not None)


def test_a_loss_that_fails_on_the_output_is_a_clear_error():
    tree, lm, sample = _frames_lm()
    p = tpflax.plan(tree, {"data": 2, "model": 4}, model=lm, sample=sample)
    with pytest.raises(tpflax.EstimateError, match=r"loss\(output, \*sample\) failed .*make_train_step"):
        tpflax.estimate(p, ADAM, model=lm, sample=sample, loss=lambda out, ids: out.mean())


def test_numbered_list_layers_are_gathered_as_blocks():
    # HF's model/layers/0/... and an nnx list's blocks/0/... are repeated blocks, as linen's layers_0: two
    # blocks' weights gathered at once (before: each leaf its own block, so the two largest leaves)
    from tpflax._src.cost.leaves import merge
    from tpflax._src.cost.peak import gathered_bytes

    up, down = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((256, 1024), (1024, 256)))  # 1 MiB each
    tree = {"model": {"layers": {str(i): {"mlp": {"up_proj": {"kernel": up}, "down_proj": {"kernel": down}}}
                                 for i in range(3)}}}
    p = tpflax.plan(tree, {"fsdp": 4}, fsdp_min_bytes=1024)
    assert gathered_bytes(merge(p.decisions, {}), p.mesh) == (2 * 2**20, 4 * 2**20)


def test_one_branch_of_a_cond_holds_its_scores():
    # lax.cond runs one branch: attention in both branches is one layer's scores, not two
    d, h = 64, 4
    tree = {"q": jax.ShapeDtypeStruct((d, d), jnp.float32), "k": jax.ShapeDtypeStruct((d, d), jnp.float32)}

    def attend(p, x):
        q, k = ((x @ p[n]).reshape(*x.shape[:2], h, d // h) for n in ("q", "k"))
        return x + jnp.einsum("bhqk,bkd->bqd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k)), x)

    def plain(p, x):
        return attend(p, x)

    def switched(p, x):
        return jax.lax.cond(x[0, 0, 0] > 0, lambda y: attend(p, y), lambda y: attend(p, 2 * y), x)

    x = jax.ShapeDtypeStruct((8, 32, d), jnp.float32)
    got = []
    for fn in (plain, switched):
        p = tpflax.plan(tree, {"data": 2}, model=fn, sample=(x,))
        got.append(tpflax.estimate(p, ADAM, model=fn, sample=(x,)).breakdown.scores)
    assert got[0] == got[1] == (8 // 2) * h * 32 * 32 * 4


def test_cpu_norm_broadcasts_count_every_layer_of_a_scanned_stack():
    # XLA:CPU keeps two input-sized broadcasts per norm call; a scanned stack's norm is one leaf for all its
    # layers, and its body may be traced once: the estimate counted one layer's (nn.scan: 276 vs 308 MiB
    # for the layer loop of the same decoder in benchmarks/nnx_estimate.py)
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(64)(nn.LayerNorm()(x)), None

    class Loop(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x, _ = Layer(name=f"layers_{i}")(x, None)
            return x

    class Scan(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return stack(name="layers")(x, None)[0]

    x = jax.ShapeDtypeStruct((8, 16, 64), jnp.float32)
    peaks = {}
    for name, m in (("loop", Loop()), ("scan", Scan())):
        p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2})
        peaks[name] = tpflax.estimate(p, ADAM, model=m, sample=(x,), backend="cpu").breakdown.activations
    assert peaks["scan"] == peaks["loop"], peaks


def test_tpu_aot_marks_the_compilers_own_rematerialization():
    # benchmarks/tpu_aot.py marks a row whose compile XLA:TPU fitted into HBM by recomputing values (its
    # ``*.remat*`` fusions: MoE f32 fsdp=2,model=4 on v5e, 14.18 GiB, where the same step for v5p
    # compiles to 17.43): that compiled peak is bound by the chip, not by the program the estimate prices
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tpu_aot import xla_remat

    # a line of that compile's HLO
    assert xla_remat("  %fusion.408.remat = (f32[4,4096,8,3584]{1,3,2,0:T(8,128)}) fusion(%p), kind=kLoop")
    assert xla_remat("  %fusion.435.remat3 = f32[4,8,4096,4096]{2,3,1,0} fusion(%p), kind=kOutput")
    # jax's own remat (``jax.checkpoint``) names no instruction so, only metadata ("/remat2")
    f = jax.grad(lambda w, x: jnp.sum(jax.checkpoint(lambda x: jnp.tanh(x @ w) @ w)(x)))
    hlo = jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((8, 8))).compile().as_text()
    assert "remat" in hlo and not xla_remat(hlo)


def test_tpu_aot_grid_reports_the_programs_peak_at_a_training_batch():
    # benchmarks/tpu_aot.py: a config whose v5e compile rematerialized (XLA remat) is compiled for the big
    # topology too and the grid holds that peak, the v5e one kept beside it (MoE f32 fsdp=2,model=4: 17.43 GiB
    # on v5p, 14.18 GiB on v5e); ViT-B/16 and ResNet-18 run 32 images per chip in the grid, 4 in their own table
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tpu_aot import BIG_TOPOLOGY, CACHE, grid, key, load, parse

    rows = load(CACHE)
    for small in (False, True):
        for cfg in grid(small):
            assert parse(key(cfg)) == cfg
            if cfg[2] and cfg[0] != "llama-2-7b" and key(cfg) not in rows:
                continue  # the other models' remat=on rows (new): compiled as time allows, --compile resumes
            r = rows[key(cfg)]
            assert not r.get("xla_remat"), key(cfg)
            assert "v5e" not in r or (r["v5e"]["xla_remat"] and r["topology"] == BIG_TOPOLOGY), key(cfg)
            if cfg[0] in ("vit-b16", "resnet18"):
                assert cfg[4] // 8 == (4 if small else 32), key(cfg)
    r = rows["moe|fsdp=2,model=4|remat=off|f32"]
    assert r["v5e"]["peak"] == 15225524736 and r["peak"] > r["v5e"]["peak"]


def test_split_heads_save_probabilities_in_their_softmax_dtype():
    # heads split over a tensor axis, XLA:TPU saves each layer's probabilities in the dtype its softmax takes
    # (v5e dumps at fsdp=2,model=4: Llama-2-7B and MoE bf16, softmax upcast to float32, keep f32[4,8,4096,4096];
    # ViT-B/16 bf16, flax's dot_product_attention taking it in bfloat16, keeps bf16[128,3,197,197]). The trace
    # reads the softmax's exp: 2 bytes in a bf16 zoo ViT, 4 in a bf16 zoo Llama (which upcasts). Exact.
    from tpflax._src.trace.dataflow import dataflow

    mesh = {"data": 2, "fsdp": 2, "model": 2}
    _, _, f32 = _estimate("vit", mesh)
    bf_vit, _, bf16 = _estimate("vit", mesh, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.softmax for x in dataflow(bf_vit).products} == {2}
    assert f32.breakdown.scores > 0 and bf16.breakdown.scores * 2 == f32.breakdown.scores
    llama = zoo.get("llama", dtype=jnp.bfloat16)
    assert {x.softmax for x in dataflow(llama).products} == {4}


def test_remat_expert_backward_is_a_phase_with_its_recomputed_hidden():
    # XLA:TPU under remat: the last layer's expert backward recomputes the hidden the layer saves without remat (the
    # up-projection's output) and holds it beside its gradient, one gathered expert kernel and one whole expert
    # gradient, not the layer's every gathered kernel and gradient (three MoE f32 remat dumps, v5e fsdp=8 and
    # fsdp=2,model=4, v5p data=2,fsdp=4; benchmarks/tpu_aot_notes.md, 2026-12-02: MoE f32 fsdp=2,model=4 remat
    # -11.1% -> -4.3%, no other row moves)
    m, _, e = _estimate("moe", {"fsdp": 2, "model": 4}, remat=True, seq_len=64)
    b, c = e.breakdown, m.config
    elems = c.n_experts * c.d_model * c.d_ff // 4  # one expert kernel on a device: whole over fsdp, split over model
    hidden = b.expert_work  # one layer's hidden, float32
    assert hidden == 8 // 2 * c.seq_len * c.n_experts * c.d_ff // 4 * 4
    assert b.expert_phase == 2 * hidden + elems * 2 + elems * 4  # gathered in bfloat16, its gradient float32
    others = b.gathered + max(b.attention + b.score_stack, b.expert_work)  # the attention phase, as before
    assert b.expert_phase > others and b.layer == b.recompute + b.conv_work + b.expert_phase
    assert _estimate("moe", {"fsdp": 2, "model": 4}, remat=False, seq_len=64)[2].breakdown.expert_phase == 0
    assert _estimate("llama", {"fsdp": 2, "model": 4}, remat=True, seq_len=64)[2].breakdown.expert_phase == 0


# ---------------------------------------------------------------------------
# Peak.phase: the phase that sets the peak and only the terms it holds

_FIELDS = [f.name for f in dataclasses.fields(Peak) if f.type in (int, "int")]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 1000), min_size=len(_FIELDS), max_size=len(_FIELDS)), st.booleans(), st.booleans())
def test_the_peak_phase_holds_what_the_total_counts(values, phased, loss_apart):
    b = Peak(**dict(zip(_FIELDS, values, strict=True)), phased=phased, loss_apart=loss_apart)
    name, held = b.phase()
    assert b.arguments + sum(held.values()) == b.total
    # the start of the backward pass, written out once more as the sum it is (records.py's docs)
    saved = b.activations + b.scores + b.experts + b.gathered_kept + b.gathered_overflow
    if phased:
        layer = b.recompute + b.conv_work + max(b.gathered + max(b.attention + b.score_stack, b.expert_work),
                                                b.expert_phase)
    else:
        layer = b.gathered + b.attention + b.recompute + b.expert_work + b.conv_work
    if loss_apart:
        last = saved + b.gathered_async + layer - b.tail + b.scan_logits  # logits read after a scanned loop
        if b.scan_grads or b.scan_stack:  # a scanned stack's backward loop: its gradients, the carried set again
            last += b.scan_grads
            last += max(0, min(b.scan_stack + b.scan_grads, last - b.scan_stack))
        live = saved + max(b.logits + b.logits_grad + b.head, last - saved)
    elif b.forward_end:
        live = b.forward_end
    else:
        live = saved + b.gathered_async + layer + b.logits + b.logits_grad
    live = max(live, b.stem)
    heap = max(live, b.activations + b.stem_grad)
    assert b.start == 2 * heap - live
    assert (name == "backward end") == (b.end > b.start)
    if name in ("stem backward", "forward end"):
        assert held.keys() <= {"stem", "forward_end", "heap_slack"}
    if name == "backward start: loss":  # the last layer's backward is a phase of its own
        assert not held.keys() & {"recompute", "gathered", "attention", "tail"}
    if name == "backward start: last layer":  # the logits are dead in it
        assert not held.keys() & {"logits", "logits_grad", "head"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vit_end_of_forward_pass_is_a_phase_by_name(dtype):
    # XLA:TPU, remat off: the six ViT-B/16 v5e dumps peak at the end of the forward pass, in ln_f (197 tokens: the
    # last MLP's maps outweigh the attention's buffers in flight), and hold there, by name (f32 fsdp=2,model=4, step
    # 780: benchmarks/tpu_aot_notes.md, twentieth round): each norm's input, not its output (ln_1's and ln_f's read a
    # value already kept: the previous block's output or the patch embedding's), ln_f's two float32 maps, in a 16-bit
    # step both of fc1's outputs (the exact GELU's), the saved probabilities, no score buffer in flight.
    # f32 fsdp=2,model=4: +20.5% -> +5.3%. Exact: the toy's maps are whole on a device, fc1's split over model
    m, _, e = _estimate("vit", {"fsdp": 2, "model": 4}, batch=64, dtype=dtype, param_dtype=dtype)
    b, c = e.breakdown, m.config
    item = jnp.dtype(dtype).itemsize
    rows = 64 // 2 * ((c.image_size // c.patch_size) ** 2 + 1)  # a device's tokens: the batch over fsdp
    stream = rows * c.d_model  # elements of one [images, tokens, d_model] map
    second = c.n_layers * rows * c.d_ff // 4 * item if item == 2 else 0  # fc1's other output, a layer each
    norm_outputs = (c.n_layers + 1) * stream * item  # ln_1 per layer and ln_f: their inputs are kept already
    ln_f = 2 * stream * 4  # float32, in a 16-bit step too
    assert b.forward_end == (b.activations - norm_outputs + second + ln_f + b.scores + b.gathered + b.gathered_kept
                             + b.gathered_overflow + b.gathered_async)
    assert b.start == b.forward_end  # in place of the backward start: no scores in flight, no logits yet
    assert b.total == b.arguments + max(b.forward_end, b.grads + b.gathered_last)
    assert "end of the forward pass" in "\n".join(e.report_lines())
    # not a phase: under remat (its own phases), or where the loss's logits or the attention's buffers hold more
    assert _estimate("vit", {"fsdp": 8}, batch=64, remat=True)[2].breakdown.forward_end == 0
    assert _estimate("llama", {"fsdp": 8}, batch=64)[2].breakdown.forward_end == 0
    assert _estimate("vit", {"fsdp": 8}, batch=64)[2].breakdown.forward_end > 0


def test_end_of_forward_pass_counts_a_scanned_stacks_norms_once_per_layer():
    # each block's first norm and the final norm keep their input, not their output (forward_end.norm_dups): a
    # scanned stack's norm runs once per layer, where a linen trace records its body once or twice (4 layers: the
    # scan counted two ln_1 outputs where its unrolled twin counts four)
    from tpflax._src.cost.forward_end import norm_dups
    from tpflax._src.cost.leaves import merge
    from tpflax._src.cost.workload import prepare

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(64, name="fc")(nn.LayerNorm(name="ln_1")(x)), None

    class Net(nn.Module):
        scan: bool

        @nn.compact
        def __call__(self, x):
            if self.scan:
                x = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)(
                    name="layers")(x, None)[0]
            else:
                for i in range(4):
                    x, _ = Layer(name=f"layers_{i}")(x, None)
            return nn.LayerNorm(name="ln_f")(x)

    x = jax.ShapeDtypeStruct((8, 16, 64), jnp.float32)
    got = {}
    for scan in (False, True):
        m = Net(scan)
        p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2})
        w = prepare(p, ADAM, model=m, sample=(x,))
        got[scan] = norm_dups(merge(p.decisions, w.activations, w.opt, w.saved), w, 2)
    assert got[True] == got[False] == (4 + 1) * 8 * 16 * 64 * 4 // 2  # four ln_1 and ln_f, 8 examples over data=2


def test_end_of_forward_pass_keeps_a_pre_norm_wrappers_mid_stream_norm():
    # only a norm reading its top-level block's input (the previous block's output, already counted) or the last
    # block's output has its output taken out for its input (forward_end.norm_dups): in pre-norm wrappers
    # (block_i/pre_attn/ln, block_i/pre_mlp/ln) the second norm reads the mid-stream, an add no traced call returns,
    # and its output stands for it; the rule had taken out each wrapper's first norm (3 layers: 7 maps, not 4)
    from tpflax._src.cost.forward_end import norm_dups
    from tpflax._src.cost.leaves import merge
    from tpflax._src.cost.workload import prepare

    class PreNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64, name="fn")(nn.LayerNorm(name="ln")(x))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + PreNorm(name="pre_attn")(x)
            return x + PreNorm(name="pre_mlp")(x)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = Block(name=f"block_{i}")(x)
            return nn.LayerNorm(name="ln_f")(x)

    x = jax.ShapeDtypeStruct((8, 16, 64), jnp.float32)
    m = Net()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2})
    w = prepare(p, ADAM, model=m, sample=(x,))
    assert norm_dups(merge(p.decisions, w.activations, w.opt, w.saved), w, 2) == (3 + 1) * 8 * 16 * 64 * 4 // 2


def test_trace_sees_an_exact_gelu_between_two_kernels():
    # the second hidden of a 16-bit step is the exact GELU's (erf): ViT's fc1 -> fc2, not GPT-2's tanh GELU
    from tpflax._src.cost.traced import traced_uses
    from tpflax._src.model import as_model

    for name, want in (("vit", {"params/encoderblock_0/mlp/fc1/kernel", "params/encoderblock_1/mlp/fc1/kernel"}),
                       ("gpt2", set()), ("llama", set())):
        m = zoo.get(name)
        shapes = {k: tuple(v.shape) for k, v in tpflax.plan(m.abstract_variables(), {"fsdp": 8}).decisions.items()}
        assert set(traced_uses(as_model(m), shapes).erf) == want, name


@pytest.mark.slow
def test_vit_end_of_forward_pass_holds_what_the_rule_counts_on_v5e(tmp_path):
    """A small ViT compiled for v5e:2x4 (libtpu's AOT path, ~30 s), its buffer assignment dumped: the live set of
    both memory spaces peaks at the end of the forward pass, in ln_f, and holds there the stream maps the rule counts
    (each norm's input, not its output; ln_f's two float32 maps), one hidden a layer (float32), the saved
    probabilities and no score buffer in flight (tpflax/_src/cost/forward_end.py)."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'tpflax[tpu]'")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import sys
    from pathlib import Path

    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tpu_live import in_use, op_names, starts
    from tpu_spaces import read

    m, p, e = _estimate("vit", {"fsdp": 2, "model": 4}, batch=64, image_size=64, patch_size=16, d_model=256,
                        n_heads=4, d_ff=512)
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")
    mesh = Mesh(np.array(topo.devices).reshape(2, 4), ("fsdp", "model"))
    ts = tpflax.make_train_step(m, p, mesh, ADAM, 64)
    jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
            donate_argnums=ts.donate_argnums).lower(*ts.args).compile({"xla_dump_to": str(tmp_path)})
    spaces, names = read(str(tmp_path)), op_names(str(tmp_path))
    step = max(starts(*spaces.values()), key=lambda t: sum(in_use(v, t) for v in spaces.values()))  # the first peak
    live = [(shape, names.get(name.split("{")[0], "")) for vals in spaces.values()
            for name, _, _, shape, a, b in vals if a <= step <= b]
    c = m.config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    stream, hidden = f"f32[32,{tokens},{c.d_model}]", f"f32[32,{tokens},{c.d_ff // 4}]"  # 64 images over fsdp=2
    assert {op.rsplit("/", 1)[-1] for shape, op in live if shape == stream and "/ln_f/" in op} >= {"sub", "mul"}
    # per layer its mid-stream (ln_2's input) and its output (the next norm's input), and ln_f's two maps: the
    # estimate counted 3L + 1 stream maps (ln_1's, ln_2's and the block's outputs, ln_f's), the rule 2L + 2
    assert sum(shape == stream for shape, _ in live) == 2 * c.n_layers + 2
    assert sum(shape == hidden for shape, _ in live) == c.n_layers  # float32: the GELU is recomputed
    assert sum(shape == f"f32[32,{tokens},{tokens}]" for shape, _ in live) == c.n_layers  # saved; none in flight
    # the estimate's end-of-forward phase counts as many: its terms less the probabilities, the gathered weights,
    # the patch embedding's output and per layer q, k, v (a head each on a device) and the hidden are stream maps
    b, n = e.breakdown, 32 * tokens
    rest = (b.scores + b.gathered + b.gathered_kept + b.gathered_overflow + b.gathered_async
            + 32 * (c.image_size // c.patch_size) ** 2 * c.d_model * 4
            + c.n_layers * n * (3 * c.d_model // c.n_heads + c.d_ff // 4) * 4)
    assert b.start == b.forward_end == rest + (2 * c.n_layers + 2) * n * c.d_model * 4


@pytest.mark.parametrize("mesh", [{"fsdp": 8}, {"fsdp": 2, "model": 4}])
def test_a_scanned_stack_gathers_one_layer_at_a_time_like_its_unrolled_twin(mesh):
    # gathered / gathered_last: one layer of a scanned stack is a block, as layers_i is an unrolled model's
    # (it was grouped by module: the embedding and head were the two largest "layers"); 4 key/value heads, so
    # both plans split them alike (a scanned stack's whole GQA key/value is priced inside the loop: test_choose)
    scanned, unrolled = (_estimate(n, mesh, n_kv_heads=4)[2].breakdown for n in ("llama-scan", "llama"))
    assert (scanned.gathered, scanned.gathered_last) == (unrolled.gathered, unrolled.gathered_last) != (0, 0)


def test_an_untied_head_gathered_at_the_loss_is_counted_once():
    """On TPU without remat an output layer split over fsdp on its features holds its gathered kernel at the loss
    (Peak.head; the HF Llama-2-7B-width dump, benchmarks/results/third_party_peak.md). Where the head is itself
    the largest block ``gathered`` holds, it is not counted again (a 512-wide model with a 32,000 vocabulary and
    a 1024-wide MLP); where a layer is larger, it is (the same head beside a 32,768-wide MLP)."""
    from jax.sharding import PartitionSpec as P

    def breakdown(width):
        s = lambda *shape: jax.ShapeDtypeStruct(shape, "bfloat16")  # noqa: E731
        tree = {"lm_head": {"kernel": s(512, 32000)},  # no token table: the inputs are features
                **{f"layers_{i}": {"up": {"kernel": s(512, width)}, "down": {"kernel": s(width, 512)}}
                   for i in range(2)}}
        p = tpflax.plan(tree, {"fsdp": 2, "model": 4}, rules=[("lm_head", P("fsdp", "model"))])
        cfg = {"vocab": 32000, "d_model": 512, "n_layers": 2, "n_heads": 8, "seq_len": 256}
        return tpflax.estimate(p, ADAM, (8, 256), config=cfg, backend="tpu").breakdown

    head = 512 * 32000 // 4 * 2  # bf16, the vocabulary split over model=4, gathered over fsdp
    small, large = breakdown(1024), breakdown(32768)
    assert small.gathered_last == head and small.head == 0  # the head is the largest block: in ``gathered``
    assert large.gathered_last == 2 * 512 * 32768 // 4 * 2 > head and large.head == head
    phase, held = large.phase()
    assert phase == "backward start" and held["head"] == head


def test_remat_blocks_of_a_deep_stack_take_one_pass():
    """``remat_blocks`` (a remat'd step's top-level blocks, asked twice per priced mesh) finds each block's members
    in one pass over the layer calls, not one per block: pairwise, an 80-layer Llama's README ``suggest_mesh`` (46
    meshes) made 3.8 million ``startswith`` calls there. Counted on the paths themselves; the blocks are exact."""
    import types

    from tpflax._src.cost.conv import remat_blocks

    reads = []

    class Path(str):
        def startswith(self, *a):
            reads.append(a)
            return super().startswith(*a)

    paths = ["embed"] + [f"layers_{i}{m}" for i in range(80) for m in ("/attn/o_proj", "/attn", "/mlp", "")] + ["head"]
    w = types.SimpleNamespace(activations={Path(p): () for p in paths})
    assert remat_blocks(w) == [f"layers_{i}" for i in range(80)]
    assert len(reads) <= len(paths)  # pairwise: 13,444
