"""What XLA adds around a grouped convolution (``feature_group_count > 1``).

XLA:CPU's SPMD partitioner splits neither a grouped convolution's batch nor its groups:
measured on RegNet (XLA:CPU, data=2 and fsdp=2 x model=4) the forward all-gathers
the input and the backward the output's gradient over the batch axes, and every
device then holds a partial sum of the kernel's gradient (reduced over every axis
that does not split the kernel: ``tpflax._src.cost.gradients``). A kernel split over a
tensor axis (its output channels) is gathered whole over that axis in the forward
and the backward, and the input and the output's gradient over it too (a 4-group
convolution on data=2 x model=4).

XLA:TPU splits a grouped convolution's batch like any other convolution's: no gather over the batch
axes, and the kernel's gradient reduced over them alone. A kernel split over a tensor axis has its
input gathered over that axis, once, in bfloat16 (its default-precision operands; a float32 model's
too), and nothing else (measured, v5e:2x4 data=2 x model=4: 4 and 8 groups, 32 and 64 channels,
float32 and bfloat16; fsdp=8 and fsdp=2 x model=4 add nothing to a normal convolution's either).

The trace says which convolutions are grouped (:attr:`tpflax._src.trace.records.Use.grouped`);
nothing here reads a name. A depthwise convolution (one input channel per group, ``grouped == 0``)
adds nothing: XLA splits its batch, and its channels over a tensor axis, with no collective.
"""

from __future__ import annotations

import math

from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import Scope, leaf_itemsize
from tpflax._src.mesh import TENSOR


def grouped_conv_items(s: Scope) -> list[CommItem]:
    """The all-gathers of every traced grouped convolution of one (plan, mesh).

    >>> import jax, optax, tpflax
    >>> def fn(v, x):  # 4 groups of 8 channels, NHWC
    ...     return jax.lax.conv_general_dilated(x, v["w"], (1, 1), "SAME", feature_group_count=4,
    ...                                         dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
    >>> v = {"w": jax.ShapeDtypeStruct((3, 3, 8, 32), "float32")}
    >>> x = jax.ShapeDtypeStruct((8, 4, 4, 32), "float32")
    >>> p = tpflax.plan(v, {"data": 2, "model": 4}, rules=[(".*", "replicate")])
    >>> e = tpflax.estimate(p, optax.sgd(0.1), model=fn, sample=(x,), backend="cpu")
    >>> [(i.kind, i.axes, i.size) for i in e.items if "grouped" in i.why]  # input + output, whole batch
    [('all-gather', ('data',), 32768.0)]
    """
    items: list[CommItem] = []
    n = s.size(s.batch_axes)
    for path, (input_per_example, per_example) in (s.grouped or {}).items():
        d = s.lv.decisions.get(path)
        if d is None:
            continue
        if not per_example:
            # depthwise (one input channel per group): XLA splits its batch and its channels like an
            # elementwise op's, with no gather (measured, XLA:CPU data=2 x model=4, channels over model);
            # its kernel's gradient is reduced over the axes not splitting it (cost.gradients)
            continue
        k, label, full = s.lv.count[path], s.lv.label[path], per_example * s.batch.size * s.act_item
        t = s.axes(path, TENSOR)
        if s.backend == "tpu":
            if t:  # its input, gathered over the tensor split in bfloat16 (the local batch, every channel)
                size = input_per_example * s.batch.size / s.shards * min(s.act_item, 2)
                items.append(CommItem("all-gather", t, size, s.size(t), k, label, "a tensor-split grouped "
                                      "convolution's input, gathered over its split in bfloat16 (XLA:TPU)"))
            continue
        if n > 1:
            items.append(CommItem("all-gather", s.batch_axes, full, n, k, label, "a grouped convolution's input "
                                  "and output gradient, gathered over the batch (XLA does not split its batch)"))
        if t:
            items.append(CommItem("all-gather", t, math.prod(d.shape) * leaf_itemsize(d), s.size(t), 2 * k, label,
                                  "a tensor-split grouped convolution's kernel, gathered whole (forward and backward)"))
            items.append(CommItem("all-gather", t, full / s.shards, s.size(t), k, label, "a tensor-split "
                                  "grouped convolution's input and output gradient, gathered over its split"))
    return items
