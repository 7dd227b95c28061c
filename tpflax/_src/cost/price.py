"""Price a candidate layout of one decision group: the planner's view of the one cost model.

The planner proposes several layouts for a decision group (a column -> row
pair, an embedding, an output head, a GQA key/value set, one leaf's fsdp
split); :func:`price` gives each the three numbers the estimate and the dry run
report — bytes per device, collective bytes per step per mesh axis, flops per
device — and a step time in seconds on a hardware preset: ``flops / peak +
bytes per device / HBM bandwidth (the optimizer update streams them) + sum over
axes of collective bytes / that axis's bandwidth``. Pure
arithmetic over shapes and specs, cached by value, so a model's repeated layers
are priced once.

Conventions (shared with :mod:`tpflax._src.cost.comm` and :mod:`tpflax.hlo`):
ring bytes one device sends; a trainable leaf holds itself, its gradient and
:data:`OPT_COPIES` optimizer moments (adam-like); activations move at
``act_item`` bytes per element; a matmul kernel costs ``6 * tokens * size``
flops per step (forward and the two backward products), divided by the tensor
and expert axes that split it (fsdp splits are gathered before use).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tpflax._src.hardware import Hardware
from tpflax._src.hlo import ring_bytes
from tpflax._src.mesh import DATA, FSDP, TENSOR, MeshShape, batch_axes
from tpflax._src.specs import Entry, entry_axes, fmt_bytes, used_axes

# The global batch plan() prices activation collectives with when neither batch= nor
# sample= says: 16 sequences of 512 tokens. Flops and activation bytes both scale
# with it, so it shifts only trade-offs between activations and parameters (fsdp,
# data-parallel gradients, memory).
DEFAULT_TOKENS = 16 * 512
OPT_COPIES = 2  # adam's two moments per parameter; sgd-like optimizers hold fewer


@dataclass(frozen=True, eq=False)  # interned by the planner: identity is equality, and hashing is free
class LeafLayout:
    """One leaf of a candidate layout.

    Attributes:
        shape: the leaf's shape (with any stacked-layers dim).
        itemsize: bytes per element.
        spec: PartitionSpec entries, one per dim.
        trainable: the optimizer updates it (gradient and moments cost memory).
        matmul: contracted with activations: flops follow its size and split.
        layers: stacked layers it holds (its collectives and flops repeat).
        positional: a table looked up at batch-free positions (:meth:`tpflax._src.trace.records.Dataflow.positional`):
            XLA:TPU sums its looked-up rows' gradient over the batch and all-reduces them, split over fsdp or not
            (the estimate: :func:`tpflax._src.cost.gradients.looked_bytes`), so an fsdp split adds its gather and
            saves only memory; priced here at the table's bytes, which both options pay alike.
        cast_item: bytes per element of the narrower dtype every matmul and lookup reads it cast to (0: none;
            :meth:`tpflax._src.trace.records.Dataflow.cast_to`: a bfloat16 model's float32 kernels and tables):
            XLA:TPU gathers it and reduces its gradient in that dtype (the estimate:
            :func:`tpflax._src.cost.gradients._cast_item`; XLA:CPU reduces 16-bit gradients in float32).
        pieces: its weight gradient comes out split in that many pieces (a GQA key/value column kept whole
            beside split query heads: :func:`tpflax._src.cost.pieces.update_pieces`; a whole kernel a model's own
            sharding constraint splits: :mod:`tpflax._src.planner.constraints`), so the batch axes sum
            a piece (the estimate: :func:`tpflax._src.cost.gradients.gradient_items`); its update gathers are
            the group's collectives.
        held: split over its tensor axes in blocks that straddle what its matmuls read whole (a flat ``(E * f, d)``
            expert kernel read ``(E, f, d)``, its ``n`` blocks cutting experts: 6 over 4), XLA gathers the blocks
            over ``n / held`` ranks into ``held`` parts of whole experts (``held = gcd(E, n)``), computes its matmuls
            split ``held`` ways and sums its gradient over the batch at that part's size (0: no such gather).
    """

    shape: tuple[int, ...]
    itemsize: int
    spec: tuple[Entry, ...]
    trainable: bool = True
    matmul: bool = False
    layers: int = 1
    positional: bool = False
    pieces: int = 1
    cast_item: int = 0
    held: int = 0


@dataclass(frozen=True)
class ActComm:
    """An activation collective a layout causes: ``width`` elements per token over ``entry``'s axes, plus
    ``fixed`` bytes per execution whatever the tokens (a kernel gathered for a backward product), among
    ``ranks`` devices of those axes (0: all of them; a whole key/value's pieces: fewer).

    ``count`` is per layer: a group of leaves stacked over ``L`` scanned layers runs it ``L`` times per
    step, as the estimate counts it (:mod:`tpflax._src.cost.comm`), unless ``every_layer``
    says its ``fixed`` bytes already hold every layer (a whole stacked leaf gathered once per step).

    >>> ActComm("all-reduce", "model", 64, 1, "sum partial outputs").kind
    'all-reduce'
    """

    kind: str
    entry: Entry
    width: float
    count: int
    why: str
    fixed: float = 0.0
    ranks: int = 0
    every_layer: bool = False


@dataclass(frozen=True)
class Cost:
    """What one candidate layout costs per step.

    Attributes:
        bytes_per_device: parameters, gradients and optimizer moments on the fullest device.
        comm: ``((axis label, bytes one device sends), ...)`` per step.
        flops: matmul flops per device per step.
        step_time: seconds on the priced hardware (flops / peak + bytes per device / HBM
            bandwidth + collective bytes / bandwidth per axis).
        collectives: the collectives in words, e.g. ``"all-reduce 64 KiB over model x2"``.
    """

    bytes_per_device: int
    comm: tuple[tuple[str, float], ...]
    flops: float
    step_time: float
    collectives: tuple[str, ...] = ()

    @functools.cached_property
    def comm_bytes(self) -> float:
        return float(sum(b for _, b in self.comm))  # a float with no collectives too: JSON writes 0.0

    def __hash__(self) -> int:
        """The fields' hash (as the dataclass's own), kept once computed: the chooser keys its word and
        alternative caches on costs, once per leaf of every repeated layer."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.bytes_per_device, self.comm, self.flops, self.step_time,
                                               self.collectives))
        return h

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}  # str hashes differ per process


@dataclass(frozen=True, eq=False)  # one per plan() pass: identity keys the price cache
class Context:
    """Where candidates are priced: the mesh, the hardware, the global tokens per step."""

    mesh: MeshShape
    hardware: Hardware
    tokens: int = DEFAULT_TOKENS
    act_item: int = 4

    @functools.cached_property
    def batch_axes(self) -> tuple[str, ...]:
        return batch_axes(self.mesh)

    @functools.cached_property
    def tokens_local(self) -> float:
        return self.tokens / math.prod(self.mesh.sizes[a] for a in self.batch_axes)

    def bandwidth(self, axes: Sequence[str]) -> float:
        """Bytes/s one device sends over ``axes``: the slow link once the group leaves the fast domain.

        Mesh axes are laid out major to minor, so an axis spans the devices of
        every axis after it; an axis whose span exceeds the fast domain crosses
        the slow link.
        """
        names = list(self.mesh.names)
        slow = False
        for a in axes:
            span = math.prod(self.mesh.sizes[n] for n in names[names.index(a):])
            slow |= span > self.hardware.fast_domain
        return self.hardware.slow_bandwidth if slow else self.hardware.fast_bandwidth


STREAM_GATHERS_MIN = 5


def stream_gathers(leaves: Iterable[tuple[str, str, tuple[int, ...], int]], width: int) -> int:
    """Gathers of a feature-split residual stream of ``width`` per step: one per lookup, two per norm,
    at least :data:`STREAM_GATHERS_MIN`.

    A lookup table split on its features hands XLA a feature-split activation; the residual adds
    propagate that split through every block, each norm of the stream works on the split features
    (its statistics all-reduced, a few bytes), and whatever reads the norm's output whole gathers it:
    once forward and once more backward for the weight gradients (measured on a 2-layer DistilBERT,
    benchmarks/third_party.py ``distilbert-tok``: 12 stream gathers behind its 5 norms). Without
    norms of the stream's width the blocks' own kernels read the split stream and XLA gathers it for
    them, forward and backward: 4 gathers in two MLP blocks with no norm or one, measured
    (tests/test_choose.py ``test_feature_split_stream_without_norms_estimate_matches_compiled``);
    the floor of 5 counts those and the lookup's, so the chooser and the estimate price the same.
    ``leaves`` are ``(path, kind, body shape, copies)``, copies counting a stack's layers; a norm is
    counted by its gain (its bias, when it has one, is the same norm).

    >>> stream_gathers([("ln/scale", "norm", (64,), 3), ("ln/bias", "norm", (64,), 3),
    ...                 ("mlp/kernel", "dense", (64, 256), 3)], 64)
    7
    >>> stream_gathers([("mlp/kernel", "dense", (64, 256), 2)], 64)
    5
    """
    norms = sum(n for path, kind, body, n in leaves
                if kind == "norm" and tuple(body) == (width,) and not path.endswith("bias"))
    return max(1 + 2 * norms, STREAM_GATHERS_MIN)


def _live(entry: Entry, mesh: MeshShape) -> tuple[str, ...]:
    return tuple(a for a in entry_axes(entry) if mesh.sizes[a] > 1)


def _split(spec: Sequence[Entry], mesh: MeshShape, roles: tuple[str, ...]) -> int:
    r = dict(mesh.roles)
    return math.prod(mesh.sizes[a] for a in used_axes(spec) if r[a] in roles)


def _shard_bytes(x: LeafLayout, mesh: MeshShape) -> int:
    n = x.itemsize
    for dim, e in zip(x.shape, x.spec, strict=False):
        n *= -(-dim // math.prod(mesh.sizes[a] for a in entry_axes(e)))
    for dim in x.shape[len(x.spec):]:
        n *= dim
    return n


def tpu_gather_item(item: int, matmul: bool, rows: int | None = None) -> int:
    """Bytes per element XLA:TPU's all-gather moves: a float32 matmul operand travels as bfloat16
    (default precision multiplies in bfloat16, so it converts before gathering). Measured for fsdp
    kernels on the zoo Llama and for a feature-split residual stream gathered for the next block's
    kernels (``tests/test_choose.py`` GQA and Tagger compiled for v5e:2x4, float32: every stream
    gather ``bf16[4,512,64]``); lookup tables, norms and other leaves travel as stored.

    Except where the shard's ``rows`` (its second-minor dim as the gather lays it out:
    :func:`tpflax._src.cost.gradients.gather_rows`) are 1: a bfloat16 tile packs two rows
    (``T(2,128)(2,1)``), so a one-row shard takes its float32 tile's bytes and XLA:TPU gathers it
    as stored, converting after. Measured on the tiny zoo Llama's fsdp gathers
    (benchmarks/tpu_aot_notes.md): ``f32[64,1,64]`` MLP kernels on fsdp=64,model=2 (v5e:8x16),
    ``f32[64,1,16]`` key/value kernels with one head per device, ``bf16[64,2,16]`` queries with two.

    >>> tpu_gather_item(4, True), tpu_gather_item(4, True, rows=2), tpu_gather_item(4, True, rows=1)
    (2, 2, 4)
    """
    return 2 if matmul and item == 4 and rows != 1 else item


def gathered_bytes(nbytes: int, item: int, tpu: bool, matmul: bool = True) -> int:
    """Bytes an all-gather of ``nbytes`` of ``item``-byte elements moves: on XLA:TPU a float32 matmul operand
    as bfloat16 (:func:`tpu_gather_item`), elsewhere (XLA:CPU) as stored.

    >>> gathered_bytes(4096, 4, True), gathered_bytes(4096, 4, False), gathered_bytes(4096, 4, True, matmul=False)
    (2048, 4096, 4096)
    """
    return nbytes * tpu_gather_item(item, matmul) // item if tpu else nbytes


def tpu_reduce_scatters(body_rank: int, free: Sequence[str], ring: bool = True) -> bool:
    """Whether XLA:TPU reduce-scatters a pinned fsdp gradient (else it all-reduces it whole, then
    slices): for leaves of two or more dims (layers dim aside) that no other batch axis sums
    (``free``: with a data axis it all-reduces over data+fsdp in one go), reduced over fsdp devices
    on one ring (``ring``: see :func:`tpflax._src.tpu.one_ring`). A tensor axis in the mesh does not
    matter (fsdp=2,model=4 and fsdp=4,model=2 on v5e:2x4; libtpu 0.0.42.1)."""
    return ring and body_rank >= 2 and not free


@functools.lru_cache(maxsize=1 << 14)
def price(leaves: tuple[LeafLayout, ...], acts: tuple[ActComm, ...], ctx: Context) -> Cost:
    """The three numbers of one candidate layout, and its step time on ``ctx.hardware``.

    >>> from tpflax._src.hardware import get_hardware
    >>> from tpflax._src.mesh import mesh_shape
    >>> ctx = Context(mesh_shape({"data": 2, "model": 4}), get_hardware("tpu-v5e"), tokens=1024)
    >>> up = LeafLayout((64, 256), 4, (None, "model"), matmul=True)
    >>> c = price((up,), (ActComm("all-reduce", "model", 64, 1, "input gradients"),), ctx)
    >>> c.bytes_per_device, c.comm, c.flops
    (65536, (('data', 16384.0), ('model', 196608.0)), 12582912.0)
    """
    mesh, by_axis, words = ctx.mesh, {}, []
    mem = 0
    flops = 0.0
    r_all = dict(mesh.roles)

    def add(kind: str, axes: tuple[str, ...], size: float, count: int, why: str, ranks: int = 0) -> None:
        n = ranks or math.prod(mesh.sizes[a] for a in axes)
        sent = ring_bytes(kind, size, n) * count
        if sent <= 0:
            return
        label = "+".join(axes)
        by_axis[label] = by_axis.get(label, 0.0) + sent
        words.append(f"{kind} {fmt_bytes(size)} over {label}{f' in groups of {n}' if ranks else ''}"
                     f"{f' x{count}' if count > 1 else ''} ({why})")

    for x in leaves:
        shard = _shard_bytes(x, mesh)
        mem += shard * (2 + OPT_COPIES) if x.trainable else shard
        t_split = _split(x.spec, mesh, (TENSOR,))
        if x.matmul:
            per_layer = math.prod(x.shape) / x.layers
            # an expert split gathers the layer's tokens over the expert (batch) axes: no fewer flops
            flops += 6 * ctx.tokens_local * per_layer * x.layers / (x.held or t_split)
        part = shard  # its gradient's bytes
        if x.held:  # blocks straddling whole experts: gathered into held parts, as XLA reshapes them
            t_axes = tuple(a for a in used_axes(x.spec) if r_all[a] == TENSOR and mesh.sizes[a] > 1)
            # the blocks the tensor split leaves, gathered over fsdp first (for compute; below at the fsdp shard)
            block = shard * _split(x.spec, mesh, (FSDP, DATA))
            block = gathered_bytes(block, x.itemsize, ctx.hardware.kind == "tpu", x.matmul or bool(x.cast_item))
            add("all-gather", t_axes, block * t_split / x.held, 1, "straddled blocks: gather whole experts",
                t_split // x.held)
            part = shard * t_split // x.held  # its matmuls, and its gradient, as big as a part
        if not x.trainable:
            # A frozen leaf split over fsdp is still gathered for compute, but that gather is left out here
            # on purpose, as the fsdp pricing below leaves out XLA:TPU's all-reduces: the fsdp axis is there
            # to save memory. Priced, it trades every frozen split away at any width (a gather over ICI
            # always costs more than the HBM read it saves; no gradient or moments to save), which keeps a
            # QLoRA base whole on every fsdp rank unless plan(device_memory=) makes it fit. Measured on the
            # tiny LoRA decoder of benchmarks/probe_nnx.py (fsdp=2,model=4), keeping the frozen leaves whole
            # would be 0.894 / 0.853 / 0.995 x the hand layout instead of 0.972 / 1.045 / 0.995.
            continue
        r = dict(mesh.roles)
        # as the estimate (:mod:`tpflax._src.cost.gradients`): a leaf split over fsdp or data axes is
        # gathered for compute and its gradient scattered back; the batch axes that do not split
        # it sum its gradient. XLA:CPU sometimes also shards the adam update of a leaf every
        # tensor rank holds and gathers it back (seen for 64-element norms of a traced GPT-2, never
        # for tables or kernels in the third-party benchmark): neither model counts that.
        f_axes = tuple(a for a in mesh.names if a in used_axes(x.spec) and r[a] in (FSDP, DATA)
                       and mesh.sizes[a] > 1)
        nf = math.prod(mesh.sizes[a] for a in f_axes)
        free = tuple(a for a in ctx.batch_axes if a not in used_axes(x.spec))
        tpu = ctx.hardware.kind == "tpu"
        grad = part * x.cast_item // x.itemsize if tpu and x.cast_item else part  # the gradient's bytes
        if f_axes:
            # XLA:TPU gathers a float32 matmul kernel as bfloat16 and never reduce-scatters a 1-D
            # leaf's gradient: it all-reduces it whole (measured; cost.gradients models the same). The
            # reduce-scatter of wider leaves is what it emits where no data axis also sums them (a
            # tensor axis beside fsdp does not matter) and it reduces over one ring; with a data axis,
            # or on a slice that is no one ring (a v5e-16 and up, fsdp-only:
            # tpflax._src.tpu.one_ring), it all-reduces those too, which the estimate counts but
            # the chooser does not, or it would trade every fsdp split away while memory allows
            # (fit() only weighs memory when plan(device_memory=) is given; priced so, the tiny zoo
            # Llama on fsdp=16 kept 0 of its 16 fsdp splits): the fsdp axis is there to save memory.
            # Likewise a gather over every device of a 64+ device slice, which XLA:TPU runs as an
            # all-reduce (tpflax._src.tpu.gathers_reduce): the estimate doubles it, the chooser does not,
            # as it would only weigh fsdp against no fsdp harder on the pods where memory needs it most.
            gather = gathered_bytes(shard, x.itemsize, tpu, x.matmul or bool(x.cast_item))
            add("all-gather", f_axes, gather * nf, 1, "fsdp: gather the parameter")
            if tpu and (len(x.shape) - (x.layers > 1) < 2 or x.positional):  # 1-D: see the comment above
                group = tuple(a for a in mesh.names if a in f_axes or a in free)
                add("all-reduce", group, grad * nf, 1, "fsdp gradient of a table looked up at batch-free positions: "
                    "its rows all-reduced, split or not" if x.positional else "fsdp gradient of a 1-D leaf: all-reduced whole")
                continue
            add("reduce-scatter", f_axes, grad * nf, 1, "fsdp: scatter its gradient")
        if free:
            add("all-reduce", free, grad / x.pieces, 1, "sum the gradient over the batch"
                + (f", split in {x.pieces} pieces" if x.pieces > 1 else ""))
    # a scanned group runs its activation collectives once per layer, as its flops (above) and the estimate
    layers = max((x.layers for x in leaves), default=1)
    for a in acts:
        add(a.kind, _live(a.entry, mesh), ctx.tokens_local * a.width * ctx.act_item + a.fixed,
            a.count * (1 if a.every_layer else layers), a.why, a.ranks)
    comm = tuple(sorted(by_axis.items()))
    hw = ctx.hardware
    time = flops / hw.peak_flops + mem / hw.hbm_bandwidth + sum(b / ctx.bandwidth(label.split("+")) for label, b in comm)
    return Cost(mem, comm, flops, time, tuple(words))


def fmt_flops(n: float) -> str:
    """``1.2 Gflop`` style.

    >>> fmt_flops(1.5e9)
    '1.5 Gflop'
    """
    for unit, scale in (("Tflop", 1e12), ("Gflop", 1e9), ("Mflop", 1e6), ("kflop", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} flop"


@functools.lru_cache(maxsize=1 << 12)
def compare(name: str, other: Cost, chosen: Cost) -> str:
    """``other`` against ``chosen`` in words: what taking ``name`` instead would change.

    >>> a = Cost(1024, (("model", 4096.0),), 0.0, 2e-8)
    >>> b = Cost(4096, (), 0.0, 0.0)
    >>> compare("replicate", b, a)
    'replicate: +3.0 KiB per device, saves 4.0 KiB of collectives per step, step time -0.02 us'
    """
    parts = [f"{name}:"]
    db = other.bytes_per_device - chosen.bytes_per_device
    parts.append(f"{'+' if db >= 0 else '-'}{fmt_bytes(abs(db))} per device,")
    dc = other.comm_bytes - chosen.comm_bytes
    if dc:
        parts.append(f"{'saves' if dc < 0 else 'adds'} {fmt_bytes(abs(dc))} of collectives per step,")
    df = other.flops - chosen.flops
    if df:
        parts.append(f"{'+' if df > 0 else '-'}{fmt_flops(abs(df))} per device,")
    dt = (other.step_time - chosen.step_time) * 1e6
    parts.append(f"step time {'+' if dt >= 0 else '-'}{abs(dt):.2f} us")
    return " ".join(parts)
