"""Small activations broadcast over the residual stream: the feature split they hand XLA.

DiT's adaLN-Zero computes, once per example, a ``(batch, 6 d)`` modulation from the conditioning
vector, cuts it into shift, scale and gate, and applies them elementwise to the residual stream of
every token (``x + gate * attn(norm(x) * (1 + scale) + shift)``). Split on its outputs, that kernel
hands XLA a feature-split modulation, and XLA's sharding propagation carries the split into the
product and on into the residual stream: the stream stays feature-split, and every kernel that reads
it whole or writes it gathers it (measured on a 2-block DiT, data=2,model=4: 8 stream-sized gathers per
block, 2 for q/k/v's one input and 2 for each of attention output, MLP up and MLP down). Gathering the
small modulation would cost next to nothing, but XLA does not choose that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tpflax._src.trace.records import Dataflow

# per contraction that reads or writes the feature-split stream: its forward gather and one backward
# (a reader's input again for its weight gradient; a writer's output gradient, for both products)
GATHERS_PER_TOUCH = 2


def spread_streams(flow: Dataflow, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[float, int, int]]:
    """``{path: (stream rows / its own rows, stream width, gathers)}`` for kernels reading fewer rows than
    the widest contraction whose output is combined elementwise with an activation of more rows.

    The stream's width is the kernel's kept dim over its fused pieces (a shift, a scale or a gate);
    the gathers are :data:`GATHERS_PER_TOUCH` per activation of that width at the stream's rows that
    contractions beside it (under the same parent layer) read (q, k and v reading one input: one) and per
    contraction writing one.

    >>> import jax, flax.linen as nn
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x, c):
    ...         gate = nn.Dense(16, name="ada")(c)[:, None]
    ...         return x + gate * nn.Dense(16, name="out")(nn.relu(nn.Dense(64, name="up")(x)))
    >>> x, c = jax.ShapeDtypeStruct((2, 8, 16), "float32"), jax.ShapeDtypeStruct((2, 16), "float32")
    >>> v = jax.eval_shape(Block().init, jax.random.key(0), x, c)
    >>> from tpflax._src.trace.dataflow import dataflow
    >>> spread_streams(dataflow(Block(), (x, c), v), {"params/ada/kernel": (16, 16), "params/up/kernel": (16, 64),
    ...                                                "params/out/kernel": (64, 16)})
    {'params/ada/kernel': (8.0, 16, 4)}
    """
    out: dict[str, tuple[float, int, int]] = {}
    widest = max((u.tokens for u in flow.uses), default=0)
    for (uid, dim), rows in flow.spread.items():
        u = flow.uses[uid]
        # a kernel reading every token (q/k/v, whose heads dim the scores broadcast over the keys) is no
        # small activation: only one reading fewer rows than the widest contraction (one per example)
        if not u.tokens or u.tokens >= widest or rows <= u.rows or u.path not in shapes or u.path in out:
            continue
        width = shapes[u.path][dim] // flow.fused.get((uid, dim), 1)
        touches = _touches(flow, shapes, uid, rows, width)
        if touches:
            out[u.path] = (rows / u.rows, width, GATHERS_PER_TOUCH * len(touches))
    return out


def _touches(flow: Dataflow, shapes: Mapping[str, tuple[int, ...]], uid: int, rows: int, width: int) -> set:
    """The stream's reads and writes by the contractions of the nearest layer enclosing the kernel's that has
    any: its own layer's parent (DiT's block, the modulation Dense inside it), or further up when the
    modulation sits in a submodule of its own (flaxdiff's ``AdaLNParams`` / ``MMAdaLNZero`` under the
    block: that submodule holds no other contraction but modulation kernels alike, MM-DiT's time and text
    projections: as many rows, their outputs spread as far). The first enclosing layer with any other
    contraction stops the walk, so the stream of one block is never counted with the next block's."""
    parts = flow.uses[uid].path.split("/")[:-2]  # the kernel's layer's parent, then its parents
    # other modulation kernels: their outputs reach the same rows (a self-attention's key beside its query
    # does too, but its value does not: that block stops the walk)
    alike = {u for (u, _), n in flow.spread.items() if n == rows}
    while parts:
        parent = "/".join(parts) + "/"
        touches = set()
        for w in flow.uses:
            if w.id == uid or w.op != "dot" or w.rows != rows or not w.path.startswith(parent) \
                    or w.path not in shapes:
                continue
            if width == math.prod(shapes[w.path][d] for d in w.contracted):
                # readers of one activation (a self-attention's q, k and v) share its gather
                touches.add(("reads", flow.inputs.get(w.id, w.id)))
            elif width == math.prod(shapes[w.path][d] for d in w.kept):
                touches.add(("writes", w.id))
        if touches or any(w.id != uid and w.op in ("dot", "conv") and w.path.startswith(parent)
                          and (w.rows != flow.uses[uid].rows or w.id not in alike) for w in flow.uses):
            return touches
        parts.pop()
    return set()


def reader_streams(flow: Dataflow, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[float, int, int]]:
    """``{path: (1.0, output width, gathers)}`` for kernels contracted once, with one kept dim, whose output (or
    what is computed from it at the same rows and width) later contractions read.

    Split on its outputs, such a kernel hands XLA a feature-split activation, and XLA's sharding propagation
    carries the split on through what is computed from it (a residual add, a norm's scale, a mean over
    streams): every later contraction reading an activation of that width at those rows computed from it
    gathers it, forward and backward (:data:`GATHERS_PER_TOUCH`); readers of one activation share a gather.
    Gemma 3n's AltUp projects the residual stream into three more, ``(d, d)`` each, mixed with it in every
    layer, and projects them back before the final norm and the tied logits: split, they left 1.4x the hand
    layout's collectives (benchmarks/probe_gemma.py).

    >>> import jax, flax.linen as nn
    >>> class Block(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = x + nn.Dense(16, name="proj")(x)
    ...         return nn.Dense(16, name="a")(x) + nn.Dense(16, name="b")(nn.relu(x))
    >>> x = jax.ShapeDtypeStruct((2, 8, 16), "float32")
    >>> v = jax.eval_shape(Block().init, jax.random.key(0), x)
    >>> from tpflax._src.trace.dataflow import dataflow
    >>> reader_streams(dataflow(Block(), (x,), v), {f"params/{n}/kernel": (16, 16) for n in ("proj", "a", "b")})
    {'params/proj/kernel': (1.0, 16, 4)}
    """
    out: dict[str, tuple[float, int, int]] = {}
    dots: dict[str, int] = {}
    for u in flow.uses:
        dots[u.path] = dots.get(u.path, 0) + (u.op == "dot")
    bit = {p: 1 << i for i, p in enumerate(flow.paths)}
    for u in flow.uses:
        if u.op != "dot" or dots[u.path] != 1 or len(u.kept) != 1 or u.path not in shapes or not u.rows:
            continue
        width = shapes[u.path][u.kept[0]]
        reads = {flow.inputs.get(w.id, w.id) for w in flow.uses
                 if w.op == "dot" and w.rows == u.rows and w.path in shapes and w.path != u.path
                 and flow.grad_deps.get(w.id, 0) & bit.get(u.path, 0)
                 and math.prod(shapes[w.path][d] for d in w.contracted) == width}
        if reads:
            out[u.path] = (1.0, width, GATHERS_PER_TOUCH * len(reads))
    return out
