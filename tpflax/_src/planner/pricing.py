"""What plan() prices candidate layouts with: hardware, tokens per step, activation bytes, memory."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tpflax._src.cost.activations import layer_key, token_rows, trace_activations
from tpflax._src.cost.batch import bare_shape, parse_batch, size_problem
from tpflax._src.cost.price import DEFAULT_TOKENS
from tpflax._src.cost.residual import Recompute, stack_lengths
from tpflax._src.errors import OptionError, TpflaxError
from tpflax._src.facts.classify import Facts
from tpflax._src.facts.tree import itemsize
from tpflax._src.hardware import DEFAULT_PLAN_HARDWARE, get_hardware, parse_bytes


def pricing(hardware: Any, batch: Any, device_memory: Any) -> dict[str, Any]:
    """The chooser's knobs for :class:`tpflax._src.planner.builders.Options`.

    ``batch`` (the global batch) sets the tokens per step and the activation
    dtype; without it, :data:`tpflax._src.cost.price.DEFAULT_TOKENS` float32
    tokens (a model's ``sample`` is a tracing example, not the training batch).

    >>> import jax
    >>> k = pricing(None, (jax.ShapeDtypeStruct((8, 16), "int32"),), "16GB")
    >>> k["hardware"].name, k["tokens"], k["act_item"], k["device_memory"]
    ('tpu-v5e', 128, 4, 16000000000)
    >>> pricing(None, None, None)["tokens"]
    8192
    """
    try:
        hw = get_hardware(hardware if hardware is not None else DEFAULT_PLAN_HARDWARE)
        memory = parse_bytes(device_memory) if device_memory is not None else None
    except TpflaxError as e:
        raise OptionError(f"plan(hardware={hardware!r}, device_memory={device_memory!r}): {e}") from None
    tokens, act_item = DEFAULT_TOKENS, 4
    if batch is not None and (why := size_problem(batch)) is not None:  # batch=True was priced as one token
        raise OptionError(f"plan(batch={batch!r}): {why}")
    if batch is not None:
        b = parse_batch(batch, None, None)
        tokens, act_item = max(1, token_rows(b, None)), itemsize(b.act_dtype)
    return {"hardware": hw, "tokens": int(tokens), "act_item": act_item, "device_memory": memory}


def token_batch(batch: Any, sample: Any, tables: bool) -> Any:
    """A bare batch size (``8``) with a sample as the sample with that leading dim, as
    :func:`tpflax.estimate` reads it. A bare-shape batch (``(8, 32)``, ``"8x32"``) of a model on token ids as that many ids (256
    tokens), not 8 rows of 32 features: when the model's first sample input is integer of the same
    rank, or, without a sample, when the shape is ``(batch, seq)`` and the tree has a token table
    (``tables``: an embedding that is no position or token-type table). Anything else as given.

    >>> import jax
    >>> ids = (jax.ShapeDtypeStruct((2, 16), "int32"),)
    >>> pricing(None, token_batch((8, 32), ids, True), None)["tokens"], pricing(None, (8, 32), None)["tokens"]
    (256, 8)
    >>> token_batch("8x32", (jax.ShapeDtypeStruct((2, 16), "float32"),), True)
    '8x32'
    >>> token_batch(8, (jax.ShapeDtypeStruct((2, 16, 64), "float32"),), False)[0].shape
    (8, 16, 64)
    """
    import jax
    import numpy as np

    if isinstance(batch, int) and not isinstance(batch, bool) and sample is not None:
        leaves = jax.tree_util.tree_leaves(sample)
        if leaves and all(len(getattr(x, "shape", ())) for x in leaves):
            return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype), sample)

    shape = None if isinstance(batch, Mapping) else bare_shape(batch)
    if shape is None:
        return batch
    first = sample[0] if isinstance(sample, (tuple, list)) and sample else None
    dtype = getattr(first, "dtype", None)
    if dtype is not None:
        ids = np.issubdtype(np.dtype(dtype), np.integer) and len(first.shape) == len(shape)
    else:
        ids = tables and len(shape) == 2
    return (jax.ShapeDtypeStruct(shape, "int32"),) if ids else batch


def token_tables(kinds: Any) -> bool:
    """Whether ``(kind, unit name)`` pairs include a token table (an embedding no position table)."""
    from tpflax._src.facts.classify import POS_EMBED

    return any(kind == "embedding" and not POS_EMBED.search(name) for kind, name in kinds)


def expert_buffers(model: Any, sample: Any, tree: Any, flow: Any) -> dict[str, tuple[float, bool]]:
    """``{path: (rows, batch free)}`` of the dispatched buffer each traced expert kernel reads, at the
    sample's batch: the rows of a buffer that keeps the batch, or the whole of one the dispatch summed the
    batch into (:func:`tpflax._src.cost.buffers.batched_rows`, read by the estimate too and kept per model:
    priced here, traced once). Empty without such kernels.
    """
    from tpflax._src.cost.buffers import batched_paths, batched_rows, ragged_buffers, ragged_groups
    from tpflax._src.model import as_model

    paths = batched_paths(flow)
    ragged = frozenset(ragged_groups(flow))
    if not paths and not ragged:
        return {}
    m = as_model(model, sample, tree)
    per_example, whole = batched_rows(m, paths) if paths else ({}, {})
    out = {p: (r * (m.batch_size or 1), False) for p, r in per_example.items()}
    out.update({p: (float(r), True) for p, r in whole.items()})
    # ragged_dot experts reading tokens sorted over the whole batch: whole on every device of the batch axes, as
    # the estimate reads them (cost.buffers.ragged_buffers)
    out.update({p: (float(r), True) for p, r in (ragged_buffers(m, ragged) if ragged else {}).items()})
    return out


def recompute(model: Any, sample: Any, tree: Any, mesh: Any, flow: Any, facts: Sequence[Facts]) -> Recompute | None:
    """What tells the chooser which split rows' sums a remat'd step's recompute runs again, as the estimate reads it
    (:class:`tpflax._src.cost.residual.Recompute`): the layer calls (traced once per model, kept for the
    estimate), the norms' and the scanned stacks' layer paths, and whether a traced contraction of another's output
    (an edge's reader) is neither an attention layer nor a table's ``attend`` (the estimate asks that of the plan's
    rows, not all found yet here; a tied head reading an attention-only stack is no row).
    A model whose layer calls do not trace is priced as a plain function (attention and expert rows only).
    None unless most of the model's matmuls run rematerialised (:attr:`Dataflow.remat`)."""
    if flow.remat < 0.5:
        return None
    kinds = {f.path: f.kind for f in facts}
    try:
        calls = trace_activations(model, variables=tree, sample=sample, mesh=mesh)
    except TpflaxError:  # the dataflow traced; only the layer interception failed
        calls = {}
    return Recompute(calls,
                     frozenset(layer_key(f.path.rsplit("/", 1)[0]) for f in facts if f.kind == "norm"),
                     stack_lengths((f.unit, f.leaf.shape[f.layers_dim] if f.layers_dim is not None else None)
                                   for f in facts),
                     any(kinds.get(e.dst, "attention") not in ("attention", "embedding") for e in flow.edges))


def _patches(batch: Any, convs: Any, beside_ids: bool) -> tuple[int, int, int] | None:
    """``(images, patches per image, width)`` a batch of images makes through a patch embedding, from shapes
    alone: ``B`` images of ``(H/p) * (W/p)`` patches ``D`` wide for the one patch size ``p`` of the 2-D conv kernels
    ``(p, p, C, D)`` (``convs``, bodies without a stacked dim) that read the image's ``C`` channels (its last dim,
    or its second: channels first), with ``p`` even and tiling ``H`` and ``W``: a patchify conv, kernel == stride
    (ViT, Swin, ConvNeXt's stem). The image is the batch's one 4-D float leaf, whatever sits beside it with fewer
    dims (``{"image": ..., "label": (B,)}``, or the int labels a bare shape ``(B, H, W, C)`` gets). None where the
    batch holds no float image (``(B, H, W, C)`` or ``(B, C, H, W)``) or two, where an integer (or bool) leaf of 2
    or more dims sits beside it (token ids: CLIP, a captioner; the ids count the tokens) unless ``beside_ids``
    (:func:`image_tokens` prices the image's own tower), where no conv or convs of two sizes read it, and for an
    odd kernel: a centred stem (ResNet's 7x7, a UNet's 3x3) whose stride the tree cannot tell. The chooser
    otherwise counts an image batch's tokens as its images (8 for 8 images of 1024 patches each).

    >>> import jax
    >>> img = (jax.ShapeDtypeStruct((8, 32, 32, 3), "float32"),)
    >>> _patches(img, [(4, 4, 3, 48), (2, 2, 48, 96)], False), _patches(img, [(7, 7, 3, 64)], False)
    ((8, 64, 48), None)
    >>> _patches((jax.ShapeDtypeStruct((2, 3, 224, 224), "float32"),), [(16, 16, 3, 768)], False)
    (2, 196, 768)
    >>> ids = jax.ShapeDtypeStruct((8, 16), "int32")
    >>> label = jax.ShapeDtypeStruct((8,), "int32")
    >>> [_patches(b, [(4, 4, 3, 48)], False) for b in ({"image": img[0], "label": label}, (8, 32, 32, 3),
    ...                                               {"image": img[0], "ids": ids})]
    [(8, 64, 48), (8, 64, 48), None]
    >>> _patches({"image": img[0], "ids": ids}, [(4, 4, 3, 48)], True)
    (8, 64, 48)
    >>> [_patches(b, [(4, 4, 3, 48)], False) for b in ("8x32x32x3", "8x512", 8)]  # the CLI's shape string, a count
    [(8, 64, 48), None, None]
    """
    import numpy as np

    if batch is None or isinstance(batch, int):  # a count says nothing of images; "8x32x32x3" (the CLI's) may
        return None
    try:
        b = parse_batch(batch, None, None)
    except (TpflaxError, TypeError, ValueError):
        return None
    def kind(dtype: Any) -> str:
        if str(dtype) == "bfloat16":
            return "f"
        try:
            return np.dtype(dtype).kind
        except TypeError:
            return "?"

    if not beside_ids and any(kind(dtype) in "biu" and len(shape) >= 2 for _, shape, dtype in b.leaves):
        return None  # token ids (or a per-token mask) beside the image (CLIP, a captioner): they count the tokens
    images = [shape for _, shape, dtype in b.leaves if kind(dtype) == "f" and len(shape) == 4]
    if len(images) != 1:  # no image, or two the shapes cannot tell apart
        return None
    x, = images  # beside it only labels, one per image: {"image": ..., "label": (B,)}, a bare shape's y
    sizes = set()
    for body in convs:
        if len(body) != 4 or body[0] != body[1] or body[0] < 2 or body[0] % 2:
            continue
        p, c = body[0], body[2]
        for h, w in ((x[1], x[2]),) * (x[3] == c) + ((x[2], x[3]),) * (x[1] == c):
            if h % p == 0 and w % p == 0:
                sizes.add(((h // p) * (w // p), body[3]))
    if len(sizes) != 1:
        return None
    (n, width), = sizes
    return x[0], n, width


# leaves of one row each that a ViT prepends to its patches: a class token (ViT's ``cls_token``, CLIP's
# ``class_embedding``), DeiT's distillation token
_EXTRA_TOKEN = re.compile(r"^(cls|class|dist|distillation)(_token|_embedding|_emb)?$", re.I)


def image_tokens(batch: Any, facts: Any) -> tuple[int, int, str] | None:
    """``(tokens, width, tower)`` the image of an untraced tree's batch makes through its patch embedding
    (:func:`_patches`), a class token (or DeiT's distillation token: a leaf named for one, as wide as the
    patches) counted once per image: ``B * ((H/p) * (W/p) + 1)``, a ViT's or CLIP's rows. ``tower``: where
    token ids sit beside the image (CLIP, a captioner), the module whose leaves read the image's tokens, the
    widest one holding the patch embedding and no token table (CLIP's ``vision_model``), the ids counting the
    rest's; ``""`` without ids. None where :func:`_patches` reads no patches, or ids sit beside an image
    whose tower cannot be told from theirs (no token table, or one module holding both: a flat captioner's
    ``patch_embed`` and blocks at the root beside its ``tok_embed``, the patch layer alone being no tower).

    >>> import jax
    >>> from tpflax._src.facts.tree import Leaf
    >>> from tpflax._src.facts.classify import Facts
    >>> def f(path, shape, kind):
    ...     return Facts(Leaf(path, shape, "float32", 4), kind, 0, path.rsplit("/", 1)[0], "")
    >>> fs = [f("vision/patch/kernel", (8, 8, 3, 64), "conv"), f("vision/cls", (64,), "other"),
    ...       f("text/tok/embedding", (1000, 64), "embedding")]
    >>> img = jax.ShapeDtypeStruct((8, 32, 32, 3), "float32")
    >>> image_tokens((img,), fs), image_tokens((jax.ShapeDtypeStruct((8, 16), "int32"), img), fs)
    ((136, 64, ''), (136, 64, 'vision'))
    >>> image_tokens((jax.ShapeDtypeStruct((8, 16), "int32"), img), fs[:2]) is None  # no table: the ids count
    True
    >>> flat = [f("root/patch_embed/kernel", (8, 8, 3, 64), "conv"), f("root/cls_token", (1, 1, 64), "other"),
    ...         f("root/vis_block_0/fc1/kernel", (64, 256), "dense"), f("root/tok_embed/embedding", (1000, 64), "embedding")]
    >>> image_tokens((jax.ShapeDtypeStruct((8, 16), "int32"), img), flat) is None  # one module holds both
    True
    """
    from tpflax._src.facts.classify import POS_EMBED

    convs = [f for f in facts if f.kind == "conv"]
    got = _patches(batch, [f.body for f in convs], True)
    if got is None:
        return None
    images, n, width = got
    tower = ""
    if _patches(batch, [f.body for f in convs], False) is None:  # token ids beside the image
        patch = [f.path.split("/") for f in convs if _patches(batch, [f.body], True) == got]
        tables = [f.path for f in facts if f.kind == "embedding" and not POS_EMBED.search(f.unit_name)
                  and not _EXTRA_TOKEN.match(f.path.rsplit("/", 1)[-1])]
        # the patch embedding's own layer is no tower: above it, a module holding the image's leaves and no table
        top = [p for p in ("/".join(patch[0][:i]) for i in range(1, len(patch[0]) - 1))
               if all(q[:p.count("/") + 1] == p.split("/") for q in patch)
               and not any(t.startswith(p + "/") for t in tables)]
        if not tables or not top:
            return None
        tower = top[0]
    inside = [f for f in facts if not tower or f.path.startswith(tower + "/")]
    extra = sum(1 for f in inside if _EXTRA_TOKEN.match(f.path.rsplit("/", 1)[-1])
                and math.prod(f.body) == width)
    return images * (n + extra), width, tower
