"""The gathers XLA:CPU compiles around an FFT (``jnp.fft``, a Hyena or FNO long convolution), priced for the estimate.

XLA's SPMD partitioner splits no real FFT (``RFFT``, ``IRFFT``): it gathers the operand whole over every
mesh axis that splits it, the batch axes too, runs the transform whole on every device and slices its
output back. Backward, each FFT's transpose is another FFT of its output's gradient, gathered alike.
Measured, XLA:CPU data=2,model=4, the probe's 2-layer Hyena LM (``RFFT`` of ``f32[8,128,128]`` split
over data and model, ``IRFFT`` of ``c64[8,128,65]``): each operand gathered over model, then data,
forward and backward, 3.7 MB of the step's 7.7 MB of collectives, which the estimate lacked (0.49 of
the compiled collectives). XLA:TPU partitions them (the same step compiled for v5e:2x4: no FFT gather),
so only ``backend="cpu"`` prices them.

Newer XLA:CPU (jaxlib 0.12) partitions an FFT over the dims it does not transform, as XLA:TPU does: no gather of
the Hyena LM's operands at all. What the running XLA:CPU does is read off one tiny compile, once per process
(:func:`cpu_gathers_ffts`; probed again after a failed probe), and the gathers are priced only where it gathers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tpflax._src.cost.records import CommItem
from tpflax._src.specs import entries, entry_axes

# what the probe of :func:`cpu_gathers_ffts` read, once it ran: None until then (a failed probe is not kept)
_PROBED: bool | None = None


def cpu_gathers_ffts() -> bool:
    """Whether the running XLA:CPU gathers an FFT's operand split on a dim it does not transform: one ``rfft`` over
    dim 1 of a ``(4, 8)`` array split on dim 0 over two CPU devices, compiled (a fraction of a second, once per
    process), its program read for an all-gather. jaxlib 0.10's does (every FFT operand gathered whole), 0.12's
    does not (it splits the FFT as its operand is split). Without two CPU devices to compile for, or if the probe
    fails, the jaxlib version decides (before 0.11: it gathers), for this call only: the next call probes again
    (a probe that failed for a moment is not the answer for the whole process); a probe's answer is kept.

    >>> isinstance(cpu_gathers_ffts(), bool)
    True
    """
    global _PROBED
    if _PROBED is not None:
        return _PROBED
    import jax

    try:
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        devices = jax.devices("cpu")
        if len(devices) >= 2:
            mesh = Mesh(np.array(devices[:2]), ("a",))
            f = jax.jit(lambda x: jnp.fft.rfft(x, axis=1), in_shardings=NamedSharding(mesh, PartitionSpec("a", None)))
            _PROBED = "all-gather" in f.lower(jax.ShapeDtypeStruct((4, 8), jnp.float32)).compile().as_text()
            return _PROBED
    except Exception:  # noqa: BLE001 - a probe that cannot run: the version decides, this time
        pass
    return jax.__version_info__ < (0, 11)


def fft_items(s: Any, reads: Sequence[tuple]) -> list[CommItem]:
    """All-gathers of each traced FFT's operand (forward) and of its output's gradient (backward) on XLA:CPU.

    Args:
        s: the estimate's :class:`~tpflax._src.cost.scope.Scope`.
        reads: :attr:`tpflax._src.cost.traced.Traced.fft_reads`.

    Returns:
        Per FFT and pass, one all-gather over the tensor axes that split its operand's dims (the kernel dims
        they carry, as the plan splits them), of the operand's batch shard, then one over the batch axes of the
        whole operand when its leading dim is the batch's; none on another backend, nor where the running XLA:CPU
        partitions an FFT (:func:`cpu_gathers_ffts`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, tpflax
    >>> from jax.sharding import PartitionSpec as P
    >>> class M(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         h = jnp.fft.irfft(jnp.fft.rfft(nn.Dense(64, name="up")(x), axis=1), n=8, axis=1)
    ...         return nn.Dense(16, name="down")(h)
    >>> x = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
    >>> p = tpflax.plan(jax.eval_shape(M().init, jax.random.key(0), x), {"data": 2, "model": 4},
    ...                 rules=[("up/kernel", P(None, "model")), ("up/bias", P("model")), ("down/kernel", P("model", None)),
    ...                        (".*", P())])
    >>> e = tpflax.estimate(p, optax.sgd(0.1), model=M(), sample=(x,), backend="cpu")
    >>> [(i.axes, i.size) for i in e.items if "FFT" in i.why][:2]  # the rfft's operand: over model, then data
    [(('model',), 4096.0), (('data',), 8192.0)]
    """
    if s.backend != "cpu" or not cpu_gathers_ffts():
        return []
    lv, out = s.lv, []
    batch = tuple(a for a in s.batch_axes if s.mesh.sizes[a] > 1)
    for in_bytes, out_bytes, dims, batched, live, runs in reads:
        split: set[str] = set()
        paths: set[str] = set()
        for keys in dims:
            for path, k in keys:
                rep = lv.rep(path)
                d = lv.decisions.get(rep)
                if d is None:
                    continue
                spec = entries(lv.specs[rep], len(d.shape))
                axes = set(entry_axes(spec[k])) - set(s.batch_axes) if k < len(spec) else set()
                if axes:
                    split |= axes
                    paths.add(lv.label.get(rep, rep))
        t_axes = tuple(a for a in s.mesh.names if a in split and s.mesh.sizes[a] > 1)
        b_axes = batch if batched else ()
        if not t_axes and not b_axes:
            continue
        label = ", ".join(sorted(paths)) or "jnp.fft"
        n_t = math.prod(s.mesh.sizes[a] for a in t_axes)
        n_b = math.prod(s.mesh.sizes[a] for a in b_axes)
        for nbytes, what in ((in_bytes, "its operand (forward)"), (out_bytes if live else 0, "its output's "
                                                                   "gradient, the backward FFT's operand")):
            whole = nbytes * s.batch.size if batched else nbytes
            if not whole:
                continue
            if t_axes:
                out.append(CommItem("all-gather", t_axes, whole / n_b, n_t, runs, label,
                                    f"an FFT XLA:CPU does not partition: gather {what} over its split dims"))
            if b_axes:
                out.append(CommItem("all-gather", b_axes, whole, n_b, runs, label,
                                    f"an FFT XLA:CPU does not partition: gather {what} over the batch"))
    return out
