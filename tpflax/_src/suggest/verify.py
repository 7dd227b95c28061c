"""``--verify``: compile the top candidates and hold XLA's peak memory against the estimate.

With a TPU hardware preset and libtpu installed (``pip install "tpflax[tpu]"``),
the candidates compile with the TPU compiler for the preset's topology with that
many devices (64 devices of ``tpu-v5e`` -> ``tpu-v5e:8x8``); nothing is
allocated. Otherwise they compile on a CPU-emulated mesh of the same shape.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tpflax._src.errors import SuggestError
from tpflax._src.hardware import get_hardware
from tpflax._src.suggest.records import Suggestion, Verification
from tpflax._src.tpu import INSTALL, TOPOLOGIES, Topology, parse_topology, topology_for

EMULABLE = 64  # --verify compiles on CPU-emulated meshes up to this many devices


def target_hardware(target: str, hardware: str | None, devices: int) -> str:
    """The hardware preset a ``--target`` topology names, checked against ``--hardware`` and ``--devices``.

    >>> target_hardware("tpu-v5e:8x8", None, 64)
    'tpu-v5e'
    """
    topo = parse_topology(target)
    if hardware is not None and get_hardware(hardware).name != topo.generation:
        raise SuggestError(f"--target {target} is {topo.generation} but --hardware is {hardware!r}; drop "
                           "--hardware or pick a matching target")
    if topo.devices != devices:
        raise SuggestError(f"--target {topo.name} has {topo.devices} devices but --world-size is {devices}; "
                           f"pass --world-size {topo.devices}")
    return topo.generation


def verify_target(s: Suggestion) -> Topology | None:
    """The TPU topology ``--verify`` compiles for: the preset's with ``s.devices`` devices, or None.

    >>> import tpflax
    >>> from tpflax import zoo
    >>> verify_target(tpflax.suggest_mesh(zoo.get("mlp"), 64, hardware="tpu-v5e", batch=64)).name
    'tpu-v5e:8x8'
    """
    if s.hardware.name not in TOPOLOGIES:
        return None
    return topology_for(s.hardware.name, s.devices)


def _skip(s: Suggestion, topo: Topology | None, tpu: bool) -> str:
    """Why the CPU fallback cannot compile, or ''."""
    import jax

    why = ""
    if topo is not None and not tpu:
        why = f"libtpu is missing ({INSTALL} to compile for {topo.name}); "
    if s.devices > EMULABLE:
        return why + f"{s.devices} devices: CPU emulation is limited to {EMULABLE}"
    if len(jax.devices()) < s.devices:
        return why + (f"only {len(jax.devices())} jax devices; set XLA_FLAGS="
                      f"--xla_force_host_platform_device_count={s.devices} before jax starts")
    return ""


def _step_args(ctx: Any) -> tuple[Any, dict] | None:
    """``(model, make_train_step keywords)`` for the suggestion's model, or None without one.

    A zoo model trains on its own batch and loss. Another model (a linen or nnx
    Module, a function) trains on its sample inputs at the suggested batch, with
    the ``loss=`` given to :func:`tpflax.suggest_mesh`, else its default loss
    (next-token cross-entropy over logits), else the mean square of its float
    outputs (collectives do not depend on which loss; the peak may, by the logits'
    gradient).
    """
    if ctx is None:
        return None
    if ctx.zoo is not None:
        return ctx.zoo, {"batch": ctx.batch}
    m = ctx.model
    sample = ctx.batch if isinstance(ctx.batch, tuple) and all(hasattr(x, "shape") for x in ctx.batch) else None
    if m is None or sample is None:
        return None
    from tpflax._src.errors import OptionError
    from tpflax._src.step import default_loss

    kw = {"sample": sample, "variables": m.variables}
    if ctx.est_kwargs.get("loss") is not None:
        kw["loss"] = ctx.est_kwargs["loss"]
        return m.forward, kw
    try:
        default_loss(m, m.variables)
    except OptionError:
        kw["loss"] = _mean_square
    return m.forward, kw


def _mean_square(out: Any, *_: Any) -> Any:
    import jax
    import jax.numpy as jnp

    floats = [x for x in jax.tree.leaves(getattr(out, "logits", out)) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in floats)


def verify_suggestion(s: Suggestion, top: int = 2) -> tuple[Verification, ...]:
    """Compile the top candidates for the TPU topology (or a CPU-emulated mesh) and compare (``--verify``).

    Needs a model: a :mod:`tpflax.zoo` model, or a linen or nnx Module or a
    function given with its sample (see :func:`_step_args`). For a TPU preset (:func:`verify_target`)
    with libtpu installed, the TPU compiler's peak is compared; otherwise
    ``devices <= 64`` and that many jax devices (set
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts; the
    CLI does it), and XLA:CPU's peak (arguments + outputs + temporaries minus
    aliased buffers, per device).

    >>> import tpflax
    >>> from tpflax import zoo
    >>> s = tpflax.suggest_mesh(zoo.get("mlp"), 128, "1GiB", batch=128)
    >>> verify_suggestion(s, top=1)[0].note
    '128 devices: CPU emulation is limited to 64'
    """
    import optax

    from tpflax._src.dryrun import dry_run
    from tpflax._src.mesh import make_mesh
    from tpflax._src.step import make_train_step

    topo = verify_target(s)
    tpu = topo is not None and importlib.util.find_spec("libtpu") is not None
    out = []
    for c in s.ranked[:max(top, 0)]:
        ctx, est, fits_est = c.context, c.per_device, c.fits
        step_of = _step_args(ctx)
        skip = "needs a model to build the training step (a tpflax.zoo model, a linen or nnx Module, or a " \
               "function with sample= and variables=)" if step_of is None else ("" if tpu else _skip(s, topo, tpu))
        if skip:
            out.append(Verification(c.mesh, est, None, fits_est, None, None, note=skip))
            continue
        mesh = make_mesh(c.mesh, target=topo) if tpu else make_mesh(c.mesh)
        opt = ctx.optimizer if ctx.optimizer is not None else optax.sgd(0.0)
        dr = dry_run(make_train_step(step_of[0], c.plan, mesh, opt, **step_of[1]), c.plan, mesh,
                     progress=True)  # on a terminal: shows the compile of each shape
        where = topo.name if tpu else "cpu"
        peak = dr.memory.get("peak")
        if peak is None:
            out.append(Verification(c.mesh, est, None, fits_est, None, None, dr.compile_seconds,
                                    note="XLA reported no memory analysis", target=where))
            continue
        fits_xla = peak + (dr.memory.get("reserved") or 0) <= c.device_memory  # as DryRun.fit: XLA:TPU's figure
        out.append(Verification(c.mesh, est, int(peak), fits_est, fits_xla, fits_xla == fits_est,
                                dr.compile_seconds, target=where))
    return tuple(out)
