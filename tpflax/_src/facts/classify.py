"""Classify leaves: layer kind, stacked (scanned) dims, and the linear-layer view.

Pure functions over :class:`tpflax.tree.Leaf`. The kinds are:
``embedding``, ``dense``, ``attention``, ``conv``, ``norm``, ``bias``, ``expert``,
``recurrent``, ``router``, ``scalar``, ``state`` (non-param collections),
``int`` (integer/bool/PRNG-key leaves) and ``other``. A quantized kernel (an integer leaf of rank >= 2
named like a kernel, with a float ``scale`` sibling sized like one of its dims: QLoRA's frozen int8
base, AQT's serving weights) is classified as the float kernel it stands for (:func:`quantized_scales`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tpflax._src.facts.tree import Leaf, once

# Name fragments. Matched against single path components, lower-cased.
NORM = re.compile(r"norm|^(ln|bn)(_\w+|\d+)?$", re.I)
EMBED = re.compile(r"(embed|embedding|wte|wpe|tok|token|vocab|shared|pos)", re.I)
# tables looked up by something other than the tokens: positions, and token types / segments (BERT's
# 2-row token_type_embeddings): never the vocabulary, never tied to the logits
POS_EMBED = re.compile(r"(wpe|pos|position|token_type|segment)", re.I)
# a raw leaf named for a projection is a kernel even when "embed" is in its name: an unembedding (the output
# head, Gemma 3n's ``altup_unembed_projection_0``), an embedding's projection to the model width
NOT_A_TABLE = re.compile(r"(unembed|proj)", re.I)
# RetNet's multi-scale retention (``retention``, ``msr``) is attention without the softmax: queries, keys, values
# and heads. Not ``mixer``: a Mamba mixer's ``in_proj`` is no fused q/k/v, nor an MLP-Mixer's token mixing.
ATTN = re.compile(r"(attn|attention|self_attn|cross_attn|mha|multihead|retention|(?<![a-z])msr(?![a-z]))", re.I)
# a relative-position bias table, added to an attention's scores: T5's ``relative_attention_bias``, Swin's
# ``relative_position_bias_table``, dalle-mini's ``rel_bias``
REL_BIAS = re.compile(r"rel(ative)?_?(pos(ition)?_?)?(attention_?)?bias", re.I)
ATTN_PROJ = re.compile(r"^(q|k|v|o|qkv|query|key|value|out|q_proj|k_proj|v_proj|o_proj|out_proj|"
                       r"c_attn|wq|wk|wv|wo|in_proj|kv|kv_proj|qkv_proj)$", re.I)
CONV = re.compile(r"(conv|patch)", re.I)
EXPERT = re.compile(r"(moe|expert|experts|mixture)", re.I)
ROUTER = re.compile(r"(router|gate_logits|gating|switch)", re.I)
RECURRENT = re.compile(r"(lstm|gru|rnn|cell|recurrent|mgu)", re.I)
HEAD = re.compile(r"^(head|lm_head|logits|logits_dense|output|classifier|unembed|out_head|output_projection)$", re.I)
# Column-parallel names (producers of the hidden/feature dim) and row-parallel
# names (consumers); used only when shapes cannot decide.
class _Names:
    """A name pattern that also matches the name without a layer-kind affix (``q_lin`` as ``q``; diffusers'
    ``to_q`` and ``to_out`` as ``q`` and ``out``).

    >>> ROW_NAMES.match("out_lin") is not None, COLUMN_NAMES.match("linear_q") is not None
    (True, True)
    >>> COLUMN_NAMES.match("to_v") is not None, ROW_NAMES.match("to_out") is not None
    (True, True)
    >>> COLUMN_NAMES.match("qkv_net") is not None, ROW_NAMES.match("o_net") is not None  # Transformer-XL's
    (True, True)
    >>> COLUMN_NAMES.match("query_global") is not None  # Longformer's global attention's
    True
    """

    _AFFIX = re.compile(r"^(?:lin|linear|dense|proj|layer|to)_(?=\w)|(?<=\w)_(?:lin|linear|dense|layer|weight|net|global|proj)$",
                        re.I)

    def __init__(self, pattern: str) -> None:
        self.rx = re.compile(pattern, re.I)
        self._seen: dict[str, re.Match | None] = {}

    def match(self, name: str) -> re.Match | None:
        # memoised by name: the role passes ask each layer's name many times, and a deep stack's layers share them
        try:
            return self._seen[name]
        except KeyError:
            pass
        if len(self._seen) >= 1 << 14:
            self._seen.clear()
        m = self._seen[name] = self.rx.match(name) or self.rx.match(self._AFFIX.sub("", name))
        return m


COLUMN_NAMES = _Names(
    r"^(q|k|v|qkv|query|key|value|q_proj|k_proj|v_proj|kv_proj|qkv_proj|c_attn|in_proj|wq|wk|wv|"
    r"up|gate|up_proj|gate_proj|fc1|fc_1|c_fc|fc_in|wi|wi_0|wi_1|w1|w3|intermediate|dense_h_to_4h|"
    r"linear1|lin1|ff1|ffn_up|mlp_up|in|input_proj|proj_in|gate_up|q_head|k_head|v_head)$")  # Funnel's *_head
ROW_NAMES = _Names(
    r"^(o|out|o_proj|out_proj|c_proj|proj|wo|w2|down|down_proj|fc2|fc_2|fc_out|dense_4h_to_h|"
    r"linear2|lin2|ff2|ffn_down|mlp_down|output|output_proj|dense_out|proj_out|attn_out|proj_final|post_proj)$")
SCAN_NAMES = re.compile(r"(layers|scan|stack|stacked|blocks|repeat|scanned)", re.I)
KERNEL_LEAVES = frozenset({"kernel", "w", "weight", "weights"})


@dataclass(frozen=True)
class Facts:
    """A leaf plus what classification found.

    Attributes:
        leaf: the :class:`~tpflax.tree.Leaf`.
        kind: layer kind (see module docstring).
        stacked: number of stacked (``nn.scan``) dims, 0 or 1; never sharded.
        unit: path of the layer the leaf belongs to (``.../mlp/up`` for
            ``.../mlp/up/kernel``; the leaf path itself for raw einsum params).
        group: parent of ``unit``: the block in which pairing happens.
        layers_at: the stacked dim's index in the leaf's shape: 0 for flax's
            default ``nn.scan``, 1 for ``variable_axes={'params': 1}``
            (MaxText's ``param_scan_axis=1``).
    """

    leaf: Leaf
    kind: str
    stacked: int
    unit: str
    group: str
    layers_at: int = 0

    @property
    def path(self) -> str:
        return self.leaf.path

    @property
    def layers_dim(self) -> int | None:
        """The stacked-layers dim of the leaf, or None."""
        return self.layers_at if self.stacked else None

    @once
    def body(self) -> tuple[int, ...]:
        """The shape without the stacked dim (computed once per leaf: the rule sets read it often)."""
        return self.body_of(self.leaf.shape)

    def body_of(self, xs: Sequence) -> tuple:
        """``xs`` (a shape or a spec, one entry per leaf dim) without the stacked dim."""
        xs = tuple(xs)
        return xs[:self.layers_at] + xs[self.layers_at + 1:] if self.stacked else xs

    def leaf_of(self, body: Sequence, fill=None) -> tuple:
        """A body spec (or shape) with ``fill`` put back at the stacked dim."""
        body = tuple(body)
        return body[:self.layers_at] + (fill,) + body[self.layers_at:] if self.stacked else body

    def body_dim(self, dim: int) -> int:
        """The body index of leaf dim ``dim`` (not the stacked one)."""
        return dim - 1 if self.stacked and dim > self.layers_at else dim

    def leaf_dim(self, dim: int) -> int:
        """The leaf index of body dim ``dim``."""
        return dim + 1 if self.stacked and dim >= self.layers_at else dim

    @property
    def name(self) -> str:
        return self.leaf.parts[-1]

    @property
    def unit_name(self) -> str:
        return self.unit.rsplit("/", 1)[-1]

    @property
    def layer_name(self) -> str:
        """The unit's name, or its container's for a numbered child (``nn.Sequential``'s ``classifier/1``).

        A Sequential names its layers by position, so ``1`` says nothing; the
        container (``classifier``) is the name the model gave the layer.
        """
        named = [p for p in self.unit.split("/") if not p.isdigit()]
        return named[-1] if named else self.unit_name


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


# Leaf names that hold a layer's parameter: the layer is the parent path.
_LAYER_LEAVES = KERNEL_LEAVES | {"bias", "b", "embedding", "scale"}


def unit_of(path: str) -> str:
    """The layer a leaf belongs to: its parent for kernels, biases, scales; else the leaf itself.

    >>> unit_of("params/mlp/up/kernel"), unit_of("params/pos_embed")
    ('params/mlp/up', 'params/pos_embed')
    """
    return _parent(path) if path.rsplit("/", 1)[-1].lower() in _LAYER_LEAVES else path


_INDEXED = re.compile(r"^(\D*?)(_?)(\d+)$")


def layer_group(path: str) -> str:
    """``params/layers_3/mlp/up/kernel`` -> ``params/layers_*/mlp/up/kernel``: the repeated-layer pattern.

    >>> layer_group("params/h/11/attn/c_attn/kernel")
    'params/h/*/attn/c_attn/kernel'
    """
    return "/".join(_group_part(part) for part in path.split("/"))


@functools.lru_cache(maxsize=1 << 14)
def _group_part(part: str) -> str:
    """One path component of :func:`layer_group` (repeated layers repeat their components)."""
    return _INDEXED.sub(lambda m: m.group(1) + m.group(2) + "*", part)


def _is_norm_part(part: str) -> bool:
    return bool(NORM.search(part.lower()))


def is_norm_leaf(leaf: Leaf) -> bool:
    parts = leaf.parts
    if parts[-1] == "scale":  # flax norms name their gain `scale`; dense layers never do
        return True
    return parts[-1] in ("bias", "mean", "var", "weight") and any(
        _is_norm_part(p) for p in parts[-3:-1])


def stacked_patterns(stacked: str | Mapping[str, int] | None) -> list[tuple[re.Pattern, int]]:
    """``stacked=`` as ``[(regex, layers dim)]``: a regex (dim 0), ``"regex:dim"`` or ``{regex: dim}``.

    >>> [(r.pattern, d) for r, d in stacked_patterns("layers:1")]
    [('layers', 1)]
    >>> [(r.pattern, d) for r, d in stacked_patterns({"blocks": 0, "scan": 1})]
    [('blocks', 0), ('scan', 1)]
    """
    if stacked is None:
        return []
    if isinstance(stacked, Mapping):
        return [(re.compile(k), int(v)) for k, v in stacked.items()]
    m = _AT_DIM.match(stacked)
    return [(re.compile(m.group(1)), int(m.group(2)))] if m else [(re.compile(stacked), 0)]


_AT_DIM = re.compile(r"^(.*):(\d+)$", re.S)


def detect_stacked(leaves: Sequence[Leaf], stacked: str | Mapping[str, int] | None = None) -> dict[str, int | None]:
    """The stacked-layers dim of each leaf path (None: not stacked).

    A subtree is taken as an ``nn.scan`` stack when all its leaves share one
    dim L >= 2 at the same index (0, or 1 for ``variable_axes={'params': 1}``,
    where every leaf has rank >= 2) and either a norm parameter in it has rank
    >= 2 (norm params are 1-D unless stacked), or its name looks like a layer
    stack (``layers``, ``scan``, ``blocks``...) and it holds >= 4 leaves. Flax
    metadata naming a dim ``layers`` also marks it, and the leaves of its subtree
    without metadata that share that dim. ``stacked`` (a regex on the
    path, ``"regex:dim"`` or ``{regex: dim}``) forces it.

    >>> shapes = {"s/ln/scale": (8, 3), "s/up/kernel": (8, 3, 32), "s/down/kernel": (32, 3, 8)}
    >>> detect_stacked([Leaf(p, x, "float32", 4) for p, x in shapes.items()])
    {'s/ln/scale': 1, 's/up/kernel': 1, 's/down/kernel': 1}
    """
    out: dict[str, int | None] = {leaf.path: None for leaf in leaves}
    forced = stacked_patterns(stacked)
    by_prefix: dict[str, list[Leaf]] = defaultdict(list)
    for leaf in leaves:
        parts = leaf.parts
        prefix = parts[0]
        for i in range(1, len(parts)):  # "/".join(parts[:i]), built up one part at a time
            if i > 1:
                prefix = f"{prefix}/{parts[i - 1]}"
            by_prefix[prefix].append(leaf)
    for leaf in leaves:
        if not forced and not leaf.names:
            continue
        hit = [d for rx, d in forced if rx.search(leaf.path) and len(leaf.shape) > d]
        names = [i for i, n in enumerate(leaf.names or ()) if n in ("layers", "layer", "stack", "scan")]
        if hit:
            out[leaf.path] = hit[0]
        elif names and len(leaf.shape) > 1:
            out[leaf.path] = names[0]
    if forced:
        return out
    for prefix in sorted(by_prefix, key=lambda p: p.count("/")):
        group = by_prefix[prefix]
        if len(group) < 2:
            continue
        if any(out[leaf.path] is not None for leaf in group):
            _stack_siblings(group, out)
            continue
        for at in (0, 1):
            if any(len(leaf.shape) <= at for leaf in group):
                continue
            leads = {leaf.shape[at] for leaf in group}
            if len(leads) != 1 or next(iter(leads)) < 2:
                continue
            norm_signal = any(is_norm_leaf(leaf) and len(leaf.shape) >= 2 for leaf in group)
            # a list of layers (``layers/0``, ``layers/1``: numbered children) holds each layer apart
            depth = prefix.count("/") + 1
            numbered = all(len(leaf.parts) > depth and leaf.parts[depth].isdigit() for leaf in group)
            # ``layers_3`` (or ``layers_3_attn``) is one layer of a loop (its index in the name), not a stack
            last = prefix.rsplit("/", 1)[-1]
            name_signal = (bool(SCAN_NAMES.search(last)) and not re.search(r"[_.-]\d+(?:$|[_.-])", last)
                           and len(group) >= 4 and not numbered)
            if norm_signal or name_signal:
                for leaf in group:
                    out[leaf.path] = at
                break
    return out


def _stack_siblings(group: Sequence[Leaf], out: dict[str, int | None]) -> None:
    """Metadata named the layers dim of some leaves of ``group``: when they agree on one dim and
    count, and every other leaf of the group has that count there, the group is one ``nn.scan``
    stack, and its leaves without metadata (``nn.Dense``'s bias beside a kernel given
    ``with_logical_partitioning``) are stacked alike."""
    marked = {(out[leaf.path], leaf.shape[out[leaf.path]]) for leaf in group if out[leaf.path] is not None}
    rest = [leaf for leaf in group if out[leaf.path] is None]
    if len(marked) != 1 or not rest:
        return
    ((at, n),) = marked
    if all(len(leaf.shape) > at and leaf.shape[at] == n for leaf in rest):
        for leaf in rest:
            out[leaf.path] = at


def classify(leaves: Sequence[Leaf], stacked: str | Mapping[str, int] | None = None) -> list[Facts]:
    """Classify every leaf. Pure; the order of the result follows ``leaves``."""
    stack = detect_stacked(leaves, stacked)
    weights = set(quantized_scales(leaves).values())
    blocks = recurrence_blocks(leaves, stack)
    return _routed_experts(_mirrored_experts([_classify_one(leaf, stack[leaf.path], leaf.path in weights,
                                                            _recurrent_module(leaf.path) not in blocks)
                                              for leaf in leaves]))


def _recurrent_module(path: str) -> str | None:
    """The deepest module on ``path`` named like a recurrent layer (``.../RNN_0/cell``), or None."""
    if not RECURRENT.search(path.rpartition("/")[0]):  # one search of the modules for most leaves, not one a module
        return None
    parts = path.split("/")
    named = [i for i in range(len(parts) - 1) if RECURRENT.search(parts[i])]
    return "/".join(parts[:named[-1] + 1]) if named else None


def recurrence_blocks(leaves: Sequence[Leaf], stack: Mapping[str, int | None]) -> frozenset[str]:
    """Modules named like a recurrent layer that hold a parameter no gated cell holds: a 3-D weight
    (Griffin's block-diagonal RG-LRU gates) or a 1-D parameter that is neither a bias nor a norm's
    (its decay ``a_param``). A cell (flax's LSTM/GRU/MGU/Simple cells) holds only 2-D gate kernels,
    their biases and norms, all applied at every time step; such a module is a block of layers around
    an elementwise recurrence, whose dense layers run once per sequence and pair like any block's.

    >>> from tpflax._src.facts.tree import Leaf
    >>> lf = lambda p, s: Leaf(p, tuple(s), "float32", 4, "params")
    >>> recurrence_blocks([lf("params/recurrent/x/kernel", (8, 8)), lf("params/recurrent/lru/a", (8,)),
    ...                    lf("params/rnn/cell/hi/kernel", (8, 8)), lf("params/rnn/cell/hi/bias", (8,))],
    ...                   {})
    frozenset({'params/recurrent'})
    """
    out = set()
    for leaf in leaves:
        module = _recurrent_module(leaf.path)
        if module is None or module in out:
            continue
        at = stack.get(leaf.path)
        body = tuple(leaf.shape) if at is None else tuple(leaf.shape[:at] + leaf.shape[at + 1:])
        name = leaf.parts[-1].lower()
        if len(body) == 3 or (len(body) == 1 and name not in ("bias", "b") and not is_norm_leaf(leaf)):
            out.add(module)
    return frozenset(out)


_SCALE = re.compile(r"scale", re.I)


def quantized_scales(leaves: Sequence[Leaf]) -> dict[str, str]:
    """``{scale path: kernel path}`` of the quantized kernels in the tree.

    A quantized kernel is an integer leaf (int8, int4...) of rank >= 2 named like a kernel
    (``kernel``, ``w``, ``weight``) with a float sibling named like a scale (``scale``,
    ``kernel_scale``) whose dims other than 1 each size a different dim of the kernel: a
    per-channel dequantization scale (``x @ (kernel.astype(f32) * scale)``).

    >>> leaves = [Leaf("up/kernel", (64, 256), "int8", 1, numeric="int"), Leaf("up/scale", (256,), "float32", 4),
    ...           Leaf("ids", (16, 8), "int32", 4, numeric="int")]
    >>> quantized_scales(leaves)
    {'up/scale': 'up/kernel'}
    """
    kernels = {_parent(x.path): x for x in leaves
               if x.numeric == "int" and len(x.shape) >= 2 and x.parts[-1].lower() in KERNEL_LEAVES}
    out: dict[str, str] = {}
    for x in leaves if kernels else ():
        k = kernels.get(_parent(x.path))
        if k is None or x.numeric != "float" or not _SCALE.search(x.parts[-1]) or k.path in out.values():
            continue
        if scale_dims(x.shape, k.shape) is not None:
            out[x.path] = k.path
    return out


def scale_dims(scale: Sequence[int], kernel: Sequence[int]) -> dict[int, int] | None:
    """``{scale dim: kernel dim}`` for the scale's dims other than 1, or None when they do not size
    distinct kernel dims. Broadcasting (aligned from the right) first, else the one kernel dim of each size.

    >>> scale_dims((256,), (64, 256)), scale_dims((1, 256), (64, 256)), scale_dims((64,), (64, 256))
    ({0: 1}, {1: 1}, {0: 0})
    """
    wide = [i for i, n in enumerate(scale) if n != 1]
    if not wide or len(scale) > len(kernel):
        return None
    off = len(kernel) - len(scale)
    if all(scale[i] == kernel[i + off] for i in wide):
        return {i: i + off for i in wide}
    out: dict[int, int] = {}
    for i in wide:
        dims = [d for d, n in enumerate(kernel) if n == scale[i] and d not in out.values()]
        if len(dims) != 1:
            return None
        out[i] = dims[0]
    return out


def _mirrored_experts(facts: list[Facts]) -> list[Facts]:
    """3-D kernels ``(E, x, y)`` with an ``(E, y, x)`` sibling are experts, whatever their names.

    An MoE MLP under a plain name (``mlp/wi``, ``ffn/w_up``) has the same layout
    as a named one: E kernels side by side, up ``(E, d, f)`` and down ``(E, f, d)``.
    A DenseGeneral attention pair ``(d, heads, head_dim)``/``(heads, head_dim, d)``
    is not mirrored this way; an einsum one ``(heads, d, head_dim)``/``(heads,
    head_dim, d)`` is. It is told apart by its heads times head_dim making d, or,
    where they do not (Gemma 3: 4 x 256 heads on d=1152; Gemma: 8 x 256 on 2304), by
    the key/value kernel beside it: a ``(kv_heads, d, head_dim)`` or ``(2|3, heads, d,
    head_dim)`` stack reading the same d into the same head_dim under other leading
    dims, or by a block named like attention. An expert block's kernels all lead with E.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    stacks: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for i, f in enumerate(facts):
        if f.kind in ("dense", "attention") and len(f.body) == 3 and f.body[1] != f.body[2]:
            groups[f.group].append(i)
        elif f.kind == "attention" and (at := projection_stack(f.body)) is not None:  # (d, head_dim) it reads into
            stacks[f.group].add((f.body[at[0]], f.body[at[2]]))
    norms = {f.body[-1] for f in facts if f.kind == "norm" and f.body}
    kv_like: dict[str, set[tuple[tuple[int, ...], tuple[int, int]]]] = defaultdict(set)
    for f in facts:
        if f.kind in ("dense", "attention", "conv") and len(f.body) in (3, 4):
            kv_like[f.group].add((f.body[:-2], f.body[-2:]))
    out = list(facts)
    for group, idx in groups.items():
        bodies = {facts[i].body for i in idx}
        named = bool(ATTN.search(group)) and not EXPERT.search(group)
        for i in idx:
            e, x, y = facts[i].body
            # (heads, d, head_dim)/(heads, head_dim, d) attention mirrors too, but there
            # heads * head_dim == d, and d (the larger) is the norms' width.
            heads = e * min(x, y) == max(x, y) and (max(x, y) in norms or not norms)
            # or a key/value projection (or stack) of its block reads d into head_dim under other heads,
            # or the block is named like attention
            heads = (heads or named or bool({(x, y), (y, x)} & stacks[group])
                     or any(lead != (e,) and pair in ((x, y), (y, x)) for lead, pair in kv_like[group]))
            if (e, y, x) in bodies and e not in (x, y) and not heads:
                out[i] = dataclasses.replace(facts[i], kind="expert")
    return out


def _routed_experts(facts: list[Facts]) -> list[Facts]:
    """Sibling 3-D kernels ``(E, x, y)`` beside a router ``(d, E)`` are experts, whatever their names.

    DBRX's ``ffn`` holds ``w1``, ``v1`` and ``w2`` all stored ``(E, f, d)`` (no mirrored sibling, no expert name)
    beside ``router`` ``(d, E)``: a 2-D kernel of the same block reading the width ``d`` the 3-D kernels carry
    into as many outputs as they have leading elements scores one expert each. Asked of every 3-D kernel of the
    block: at least two, each leading with the router's width ``E`` and carrying ``d`` and another width (neither
    ``E``, nor ``E * that width == d``, an einsum attention's heads x head_dim), in a block not named like
    attention and holding no attention kernel or q/k/v stack (an einsum attention's ``(heads, d, head_dim)`` query
    and output beside a ``(d, heads)`` gate are heads). A scanned stack's layers dim is no body dim
    (:attr:`Facts.body`).
    """
    blocks: dict[str, list[int]] = defaultdict(list)
    scores: dict[str, set[tuple[int, int]]] = defaultdict(set)  # group -> {(d, E)} of its 2-D kernels
    heads: set[str] = set()  # blocks with an attention kernel or a q/k/v stack: a (d, heads) gate is no router
    for i, f in enumerate(facts):
        if f.kind == "attention" or (len(f.body) == 4 and projection_stack(f.body) is not None):
            heads.add(f.group)
        if f.kind in ("dense", "expert") and len(f.body) == 3:
            blocks[f.group].append(i)
        elif f.kind in ("dense", "router") and len(f.body) == 2 and f.body[1] > 1:
            scores[f.group].add(tuple(f.body))
    out = list(facts)
    for group, idx in blocks.items():
        if len(idx) < 2 or ATTN.search(group) or group in heads or all(facts[i].kind == "expert" for i in idx):
            continue
        if any(all(_scored(facts[i].body, d, e) for i in idx) for d, e in scores[group]):
            for i in idx:
                out[i] = dataclasses.replace(facts[i], kind="expert")
    return out


def _scored(body: tuple[int, ...], d: int, e: int) -> bool:
    """A 3-D kernel one of ``e`` experts each read from width ``d`` (:func:`_routed_experts`).

    >>> _scored((6, 128, 64), 64, 6), _scored((4, 80, 16), 64, 4), _scored((4, 16, 64), 64, 4)
    (True, False, False)
    """
    lead, x, y = body
    return lead == e and d in (x, y) and e not in (x, y) and x != y and e * min(x, y) != max(x, y)


def fused_projection(body: Sequence[int]) -> bool:
    """A fused DenseGeneral's ``(d, 3, heads, head_dim)`` q/k/v (or ``(d, 2, kv_heads, head_dim)`` k/v) kernel:
    the projections' count second, after a d no conv window is as wide as (MaxText's GPT-3 ``qkv_proj``).

    >>> fused_projection((256, 3, 4, 64)), fused_projection((3, 3, 64, 64)), fused_projection((7, 3, 3, 64))
    (True, False, False)
    """
    return len(body) == 4 and body[1] in (2, 3) and body[0] >= 16


def projection_stack(body: Sequence[int]) -> tuple[int, int, int] | None:
    """``(d, heads, head_dim)``'s dims in a 4-D stack of 2 or 3 attention projections, else None.

    Three layouts: a fused DenseGeneral's ``(d, n, heads, head_dim)`` (:func:`fused_projection`), an einsum's
    ``(n, heads, d, head_dim)`` (Gemma's ``qkv_einsum``) and ``(n, d, heads, head_dim)`` (an ``nn.Einsum``
    written ``"bsd,cdhk->cbshk"``). A conv window is small and square, ``(3, 3, cin, cout)``: its second dim is
    neither the stack's heads (no wider than d) nor a d (no conv window is 16 wide).

    >>> projection_stack((256, 3, 4, 64)), projection_stack((3, 4, 256, 64)), projection_stack((3, 256, 4, 64))
    ((0, 2, 3), (2, 1, 3), (1, 2, 3))
    >>> projection_stack((3, 3, 64, 64)), projection_stack((3, 5, 3, 64))
    (None, None)
    """
    if len(body) != 4:
        return None
    if fused_projection(body):
        return 0, 2, 3
    if body[0] not in (2, 3) or body[0] == body[1]:
        return None
    if body[1] <= body[2]:
        return 2, 1, 3
    return (1, 2, 3) if body[1] >= 16 else None


def classify_weight(f: Facts) -> Facts:
    """``f`` (an integer leaf) classified as the float kernel it stands for: a quantized kernel."""
    return _classify_one(f.leaf, f.layers_at if f.stacked else None, weight=True)


def _classify_one(leaf: Leaf, layers_at: int | None, weight: bool = False, cell: bool = True) -> Facts:
    """The facts of one leaf; ``weight``: an integer leaf that is a quantized kernel, classified as a float one;
    ``cell``: a name like a recurrent layer's on its path is a cell's, not a block's (:func:`recurrence_blocks`)."""
    parts = leaf.parts
    name = parts[-1]
    unit = unit_of(leaf.path)
    group = _parent(unit)
    shape = tuple(leaf.shape)
    body = shape if layers_at is None else shape[:layers_at] + shape[layers_at + 1:]
    lower_path = leaf.path.lower()
    unit_parts = unit.lower().split("/")

    def facts(kind: str) -> Facts:
        out = Facts(leaf=leaf, kind=kind, stacked=int(layers_at is not None), unit=unit, group=group,
                    layers_at=layers_at or 0)
        out.__dict__["body"] = body  # what Facts.body computes
        return out

    if leaf.numeric in ("bool", "key") or (leaf.numeric == "int" and not weight):
        return facts("int")
    if leaf.collection and leaf.collection != "params":
        return facts("state")
    if len(body) == 0:
        return facts("scalar")
    if 0 in shape:  # nothing to split, and no layer to pair: a zero width (or layer count) divides by zero
        return facts("other")
    if is_norm_leaf(leaf) or (len(body) == 1 and any(_is_norm_part(p) for p in unit_parts[-2:])):
        return facts("norm")
    if name.lower() in ("bias", "b"):
        return facts("bias")
    raw = name.lower() not in KERNEL_LEAVES and name != "embedding"
    if name == "embedding" or (raw and EMBED.search(name) and not NOT_A_TABLE.search(name)):
        return facts("embedding")
    if len(body) == 1 or (raw and body[0] == 1):
        return facts("other")  # e.g. a learned class token (1, 1, d)
    if EXPERT.search(lower_path) and ROUTER.search(unit.rsplit("/", 1)[-1]):
        return facts("router")
    if len(body) == 3 and EXPERT.search(lower_path) and not ATTN.search(lower_path):
        return facts("expert")
    conv_named = any(CONV.search(p) for p in unit_parts[-2:])
    if not conv_named and projection_stack(body) is not None:
        # (3, heads, d, head_dim) or (3, d, heads, head_dim) q/k/v or (2, kv_heads, d, head_dim) k/v stack
        # of an einsum, or a fused DenseGeneral's (d, 3, heads, head_dim): a conv window is small and
        # square (3, 3, cin, cout), these are not.
        return facts("attention")
    if len(body) == 4 or (len(body) == 3 and conv_named):
        return facts("conv")
    if cell and RECURRENT.search(lower_path) and len(body) == 2:
        return facts("recurrent")
    if len(body) in (2, 3) and (ATTN.search(lower_path) and ATTN_PROJ.match(unit.rsplit("/", 1)[-1])
                                or len(body) == 3 and ATTN_PROJ.match(unit.rsplit("/", 1)[-1])):
        return facts("attention")
    if len(body) in (2, 3):
        return facts("dense")
    return facts("other")
