"""What every modelled collective of one (plan, mesh) shares: the :class:`Scope`, and a leaf's
bytes per element, stacked layers and body shape as the decisions record them."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.cost.activations import acts_for, token_rows
from tpflax._src.cost.batch import Batch, config_value
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.records import Act
from tpflax._src.facts.tree import itemsize
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.specs import Entry, entry_axes, used_axes
from tpflax._src.trace.records import InSpecs


def grad_bytes(nbytes: int, item: int, g_item: int | None) -> int:
    """A gradient's bytes for a leaf of ``nbytes`` at ``item`` bytes per element: in ``g_item`` when the step
    says (``grad_dtype=``), else in the leaf's own dtype.

    >>> grad_bytes(64, 4, None), grad_bytes(64, 4, 2)
    (64, 32)
    """
    return nbytes if g_item is None else nbytes // item * g_item


def leaf_itemsize(d: Any) -> int | float:
    """Bytes per element of a decision's leaf (0.5 for int4: :func:`tpflax._src.facts.tree.itemsize`).

    >>> import jax, tpflax
    >>> keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 4))
    >>> leaf_itemsize(tpflax.plan({"rng": keys}, {"data": 1}).decisions["rng"])  # a PRNG key: 2 x uint32
    8
    """
    return _itemsize(d.dtype)


_itemsize = functools.lru_cache(maxsize=256)(itemsize)  # decisions hold dtype names: hashable, few


def layers(d: Any) -> int:
    """How many stacked layers (``nn.scan``) the leaf holds: its collectives repeat that often.

    >>> import jax, tpflax
    >>> w = jax.ShapeDtypeStruct((4, 64, 256), "float32")
    >>> layers(tpflax.plan({"layers": {"up": {"kernel": w}}}, {"data": 1}, stacked="layers").decisions["layers/up/kernel"])
    4
    """
    return d.shape[d.layers_dim] if d.layers_dim is not None else 1


def body(d: Any) -> tuple[int, ...]:
    """The leaf's shape without its stacked-layers dim.

    >>> import jax, tpflax
    >>> w = jax.ShapeDtypeStruct((4, 64, 256), "float32")
    >>> p = tpflax.plan({"layers": {"up": {"kernel": w}}}, {"data": 1}, stacked="layers")
    >>> body(p.decisions["layers/up/kernel"])
    (64, 256)
    """
    return drop_layers(d, tuple(d.shape))


@dataclass(frozen=True)
class Scope:
    """What every collective of one (plan, mesh) shares."""

    mesh: MeshShape
    lv: Leaves
    batch: Batch
    batch_axes: tuple[str, ...]
    shards: int
    act_item: int
    g_item: int | None
    backend: str
    dispatch: str
    activations: Mapping[str, Sequence[Act]]
    config: Any
    tied: frozenset[str] | None = None  # traced tied tables (None: not traced)
    remat: bool = False
    parts: Mapping[str, int] | None = None  # traced gradient parts (see cost.traced.traced_uses)
    rows: Mapping[str, float] | None = None  # traced rows per example a parameter's contraction reads
    fused: Mapping[str, tuple[int, int | tuple[int, ...], tuple[int, ...], bool]] | None = None  # traced fused kernels
    # (param dim, pieces, pieces read whole): see cost/reshard.py
    shared: frozenset[str] | None = None  # traced kernels whose input gradient is reduced apart (trace.sharing)
    lookups: Mapping[str, int] | None = None  # traced tables looked up by several gathers (cost.traced.Traced)
    lookup_rows: Mapping[str, float] = field(default_factory=dict)  # traced: ids per example a lookup gathers
    scores: tuple = ()  # traced attention-score products (cost.traced.Scores)
    grouped: Mapping[str, tuple[float, float]] | None = None  # traced grouped convolutions (cost.traced.Traced)
    joined: Mapping[str, tuple[float, ...]] | None = None  # a projection's joined other uses' rows (Traced)
    widths: Mapping[str, int] | None = None  # traced elements a parameter's contraction sums over (Traced)
    slices: Mapping[str, int] | None = None  # traced contractions of a parameter's slices (Traced)
    slice_reads: Mapping[str, int] | None = None  # the distinct activations those contractions read (Traced)
    # traced kernels called several times: (calls reading the model's input, calls reading an earlier one's output)
    chained: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # (Traced.chained)
    chain: Mapping[str, tuple] = field(default_factory=dict)  # (Traced.chain: cost.chain.ChainCall per call)
    # traced kernels whose calls add their output back onto the stream their input comes from: (calls, the dims
    # they and that stream meet on) (Traced.residual)
    residual: Mapping[str, tuple[int, frozenset]] = field(default_factory=dict)
    # of those, the sums per row the norms their calls read the stream through take, over the calls
    # (Traced.residual_norms)
    residual_norms: Mapping[str, int] = field(default_factory=dict)
    # traced kernels whose outputs only reach the model's output elementwise, read by the loss (Traced.loss_read)
    loss_read: frozenset[str] = frozenset()
    # traced kernels whose output joins a residual stream that runs on through norms or later writers: (calls, the
    # norms of the stream after them, those a kernel reads, the later writers' paths) (Traced.downstream)
    downstream: Mapping[str, tuple[int, int, int, tuple[str, ...], bool]] = field(default_factory=dict)
    buffers: Mapping[str, float] | None = None  # traced batch-free expert buffers' rows (Traced)
    streams: Mapping[str, tuple[float, int, int]] | None = None  # traced streams split by a small output (Traced)
    grown: Mapping[str, float] = field(default_factory=dict)  # outputs upsampled before read whole (Traced)
    in_rows: Mapping[str, float] = field(default_factory=dict)  # a conv's input rows over its output's (Traced)
    combined: Mapping[str, int] = field(default_factory=dict)  # gradient parts of elementwise uses (Traced)
    reduced: frozenset[str] = frozenset()  # contractions whose output is only reduced row by row (Traced)
    target: Any = None  # the TPU slice or generation (estimate(target=)), for one_ring
    gathers_reduce: bool = False  # XLA:TPU gathers over the whole mesh as all-reduces (tpflax._src.tpu.gathers_reduce)
    row_axes: tuple[str, ...] = ()  # batch axes only because a shard_map splits rows over them (cost.explicit)
    meets: tuple = ()  # traced parameter dims that meet on one activation dim (Traced)
    moments: Mapping[str, int] | None = None  # optimizer-state leaves shaped like each parameter (None: no optimizer)
    # traced tables looked up at batch-free positions: {path: (rows looked up, dims not indexed)} (Traced.positional)
    positional: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    loops: Mapping[str, tuple[int, bool]] | None = None  # traced parameters used inside loop bodies (Traced.loops)
    edges: frozenset[tuple[str, str]] | None = None  # traced dataflow edges (Traced.edges); None: not traced
    contracted: frozenset[str] = frozenset()  # traced parameters a contraction uses (Traced.contracted)
    looked: frozenset[str] = frozenset()  # traced parameters a lookup reads (Traced.looked)
    batched: frozenset[str] = frozenset()  # traced expert kernels reading a dispatched buffer (Traced.batched)
    ragged: Mapping[str, frozenset[int]] = field(default_factory=dict)  # ragged dots' kernel group dims (Traced.ragged)
    # traced tables that feed a per-example conditioning vector, with the modulations reading it (Traced.conditions)
    conditions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    batch_dims: Mapping[str, frozenset[int]] = field(default_factory=dict)  # traced dot batch dims (Traced)
    # traced parameters read only through static slices: {path: the part they cover} (Traced.sliced)
    sliced: Mapping[str, float] = field(default_factory=dict)
    # traced parameters' first dot use: {path: (contracted dims, kept dims)} (Traced.dots)
    dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # the same of each one's first dot use with batch dims: an expert kernel's (Traced.batched_dots)
    batched_dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # parameters a shard_map takes, with their in_specs (Traced.shard_mapped), and those whose outputs its body
    # reduce-scatters by hand (the explicit collective is their pair's forward sum: Collective.carries)
    shard_mapped: InSpecs = field(default_factory=dict)
    written: frozenset[str] = frozenset()
    # {path: group path}: dot uses reading one value, a sharding constraint making another (Traced.apart)
    apart: Mapping[str, str] = field(default_factory=dict)
    # (width, mesh axes) of activation dims a model's constraint splits (Traced.split_widths)
    split_widths: frozenset = frozenset()
    parted: Mapping[str, Mapping[int, int]] = field(default_factory=dict)  # (Traced.parted)
    concats: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)  # (Traced.concats)
    concat_again: Mapping[str, str] = field(default_factory=dict)  # (Traced.concat_again)
    streamed: frozenset = frozenset()  # kernel dims added onto a residual stream (Traced.streamed)
    expanded: Mapping[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)  # (Traced.expanded)
    # kernels that contract a constrained value as it is (Traced.direct)
    direct: frozenset[str] = frozenset()
    # kernels whose matmul reads them through an op, a cast or a reshape (Traced.derived)
    derived: frozenset[str] = frozenset()
    # parameters every matmul and lookup reads cast to one dtype: {path: dtype} (Traced.cast_to)
    cast_to: Mapping[str, str] = field(default_factory=dict)
    # parameters some matmul or lookup reads as they are, the others cast to one dtype (Traced.cast_some)
    cast_some: Mapping[str, str] = field(default_factory=dict)
    scanned: Mapping[str, int] = field(default_factory=dict)  # traced stacks: {path: leaf dim} (Traced.scanned)
    # traced parameter dims a model's own with_sharding_constraint lays out over mesh axes (Traced.constrained)
    constrained: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    # traced edges' limits: {(path, dim, other path, other dim): gcd of the activation dims between} (Traced.limits)
    limits: Mapping[tuple[str, int, str, int], int] = field(default_factory=dict)
    # traced parameters whose first dot reads an activation carrying the batch in some dim (Traced.batch_read)
    batch_read: frozenset[str] = frozenset()
    # traced parameters reading no batch where the batch size given leaves an input out (Traced.unbatched)
    unbatched: frozenset[str] = frozenset()

    def one_ring(self, devices: int) -> bool:
        """Whether XLA:TPU reduces over ``devices`` of the mesh on one ring (:func:`tpflax._src.tpu.one_ring`:
        a group smaller than the target slice is assumed to be one); True off TPU."""
        from tpflax._src.tpu import one_ring

        return self.backend != "tpu" or one_ring(self.target, devices)

    def rows_of(self, path: str) -> float:
        """Activation rows on one device that the leaf at ``path`` reads: as traced (a batch-free expert buffer
        whole), else the batch's tokens."""
        if path in (self.buffers or {}):
            return self.buffers[path]
        per_example = (self.rows or {}).get(path)
        return per_example * self.batch.size / self.shards if per_example else self.rows_local

    @functools.cached_property
    def update_gathered(self) -> set[tuple[str, tuple[str, ...]]]:
        """``(leaf, tensor axes)`` whose split update :func:`tpflax._src.cost.stream.update_gathers` has already
        gathered in this estimate: a leaf is updated once per step, however many splits reach its gradient
        (the feature-split stream and a GQA key/value's split heads both reach a whole key/value kernel)."""
        return set()

    @functools.cached_property
    def rows_local(self) -> float:
        return token_rows(self.batch, self.config) / self.shards

    @functools.cached_property
    def tied_guess(self) -> bool:
        """No output head and no ``attend`` call: a table of the config's vocabulary computes the logits."""
        return (not any(d.kind == "head" for d in self.lv.decisions.values())
                and not any(k.endswith(":attend") for k in self.activations))

    @functools.cached_property
    def buffered(self) -> frozenset[str]:
        """Kernels of the pairs whose every kernel reads a batch-free expert buffer (:mod:`tpflax._src.cost.buffers`),
        and such kernels in no pair (:attr:`loose_buffered`): the same on every device of the batch axes."""
        b = self.buffers or {}
        return frozenset([*(p for pc in self.lv.pairs if all(x in b for x in pc.columns + pc.rows)
                            for p in pc.columns + pc.rows), *self.loose_buffered])

    @functools.cached_property
    def loose_buffered(self) -> tuple[str, ...]:
        """Kernels reading a batch-free expert buffer that no pair holds (a layout given by rules, e.g. the
        experts replicated or fsdp only): they too run alike on every device of the batch axes."""
        paired = {p for pc in self.lv.pairs for p in pc.columns + pc.rows}
        return tuple(sorted(p for p in (self.buffers or {}) if p not in paired and p in self.lv.decisions))

    @functools.cached_property
    def experts_split(self) -> frozenset[str]:
        """Members of the expert pairs (kernels ``(E, d, f)`` -> ``(E, f, d)``, every one reading a dispatched
        buffer: :attr:`batched`) whose experts dim, and no other, the tensor axes split: expert parallelism
        over the tensor axis. Each device runs its experts on its slice of the buffer; the combine sums the
        experts' outputs over the tensor axis and the dispatch's transpose their input gradients, both at
        the layer's tokens (:func:`tpflax._src.cost.comm.expert_split_items`)."""
        out: set[str] = set()
        for pc in self.lv.pairs:
            members = pc.columns + pc.rows
            if pc.columns and pc.rows and all(self._experts_dim_only(p) for p in members):
                out.update(members)
        return frozenset(out)

    def _experts_dim_only(self, path: str) -> bool:
        d = self.lv.decisions[path]
        if d.kind != "expert" or len(body(d)) != 3 or path not in self.batched:
            return False
        spec = drop_layers(d, self.lv.specs[path])
        t = set(self.axes(path, TENSOR))
        return bool(t & set(entry_axes(spec[0]))) and not any(t & set(entry_axes(e)) for e in spec[1:])

    def channel_partners(self, path: str, axes: Sequence[str]) -> tuple[str, ...]:
        """For a traced depthwise convolution (one input channel per output channel: :attr:`grouped` ``(0, 0)``)
        whose channels ``axes`` split: the other contractions whose dims on those channels the same axes split
        (the kernel making them, the row reading them). It mixes no channels, so its split channels pass from
        the one to the other as they are: no gather of its output, no sum of its input gradient, and a fused
        kernel's pieces resharded once, at the kernel that made them (measured, XLA:CPU data=2,model=4: Hyena's
        ``in_proj -> short_filter -> split -> out_proj``, one set of collective-permutes). Empty otherwise."""
        if (self.grouped or {}).get(path) != (0, 0):
            return ()
        spec, want, out = self.lv.specs[path], set(axes), []
        for p, dim, o, odim in self.meets:
            ospec = self.lv.specs.get(self.lv.rep(o))
            if p != path or o == path or o not in self.contracted or (self.grouped or {}).get(o) == (0, 0) or \
                    ospec is None or dim >= len(spec) or odim >= len(ospec):
                continue
            if want <= set(entry_axes(spec[dim])) and want <= set(entry_axes(ospec[odim])):
                out.append(o)
        return tuple(out)

    def axes(self, path: str, role: str) -> tuple[str, ...]:
        """Mesh axes of ``role`` (size > 1) that split the leaf at ``path``."""
        return axes_of(self.lv.specs[path], self.mesh, role)

    def size(self, axes: Sequence[str]) -> int:
        return math.prod(self.mesh.sizes[a] for a in axes)

    def nbytes(self, shape: Sequence[int], path: str | None = None) -> float:
        """Bytes of a traced activation on one device: batch-major shapes split over the batch axes, and those
        whose leading dim is the batch's tokens flattened (EasyDeL's router reads ``(batch * seq, d)``); and the
        activations of the layer at ``path`` where the trace follows the batch into them (:attr:`batch_read`): a
        Swin window partition's ``(batch * windows, tokens, c)``, which XLA splits as it splits the batch (priced
        whole before, the pairs' sums 2x the compiled ones on data=2,model=4)."""
        split = shape and (shape[0] in self.batch_leads or path in self.batch_read)
        local = 1 / self.shards if split else 1.0
        return math.prod(shape) * self.act_item * local

    @functools.cached_property
    def batch_leads(self) -> frozenset[int]:
        """The leading dims a step splits over the batch axes: every batch input's (the step splits each input's
        leading dim: a dual encoder's 8 images and 16 captions; with the batch size given, only inputs of that
        one: :attr:`tpflax._src.cost.batch.Batch.leads`), and the batch's tokens."""
        return frozenset({self.batch.size, token_rows(self.batch, self.config)}) | self.batch.leads

    def leaf_bytes(self, path: str, d: Any) -> int:
        return shard_bytes(tuple(d.shape), leaf_itemsize(d), self.lv.specs[path], self.mesh)


@functools.lru_cache(maxsize=1 << 14)
def tensor_degree(mesh: MeshShape, entry: Any) -> int:
    """How many ways a spec entry splits its dim over tensor or expert axes.

    >>> from tpflax._src.mesh import mesh_shape
    >>> tensor_degree(mesh_shape({"fsdp": 2, "model": 4}), ("fsdp", "model"))
    4
    """
    roles = dict(mesh.roles)
    return math.prod(mesh.sizes[a] for a in entry_axes(entry) if roles[a] in (TENSOR, EXPERT))


def axes_of(spec: tuple[Entry, ...], mesh: MeshShape, role: str) -> tuple[str, ...]:
    roles, used = dict(mesh.roles), used_axes(spec)
    return tuple(a for a in mesh.names if a in used and roles[a] == role and mesh.sizes[a] > 1)



def drop_layers(d: Any, spec: tuple[Entry, ...]) -> tuple[Entry, ...]:
    """``spec`` (or a shape) without the leaf's stacked-layers dim."""
    k = d.layers_dim
    return tuple(spec[:k]) + tuple(spec[k + 1:]) if k is not None else spec


def is_tied(path: str, d: Any, s: Scope) -> bool:
    """The token table also computes the logits (an ``attend`` call, the trace, or no head to be found)."""
    if s.tied is not None:  # the trace saw the table both looked up and contracted
        return path in s.tied
    if d.kind != "embedding" or len(body(d)) != 2:  # a table of more dims is no logits kernel
        return False
    if acts_for(s.activations, d.unit + ":attend"):
        return True
    return s.tied_guess and config_value(s.config, "vocab") == body(d)[0]

