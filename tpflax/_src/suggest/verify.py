"""``--verify``: compile the top candidates on CPU-emulated meshes and compare XLA's memory."""

from __future__ import annotations

from tpflax._src.suggest.records import Suggestion, Verification

EMULABLE = 64  # --verify compiles on CPU-emulated meshes up to this many devices


def verify_suggestion(s: Suggestion, top: int = 2) -> tuple[Verification, ...]:
    """Compile the top candidates on a CPU-emulated mesh of the same shape (``--verify``).

    Needs a :mod:`tpflax.zoo` model, ``devices <= 64``, and that many jax devices
    (set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts;
    the CLI does it). XLA's bytes are arguments + outputs + temporaries minus
    aliased (donated) buffers, per device.

    >>> import tpflax
    >>> from tpflax import zoo
    >>> s = tpflax.suggest_mesh(zoo.get("mlp"), 128, "1GiB", batch=128)
    >>> verify_suggestion(s, top=1)[0].note
    '128 devices: CPU emulation is limited to 64'
    """
    import jax

    out = []
    cands = list(s.ranked[:max(top, 0)])
    for c in cands:
        ctx = c.context
        est = c.per_device
        fits_est = c.fits
        if ctx is None or ctx.zoo is None:
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note="needs a tpflax.zoo model to build the training step"))
            continue
        if s.devices > EMULABLE:
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note=f"{s.devices} devices: CPU emulation is limited to {EMULABLE}"))
            continue
        if len(jax.devices()) < s.devices:
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note=f"only {len(jax.devices())} jax devices; set XLA_FLAGS="
                                         f"--xla_force_host_platform_device_count={s.devices} before jax starts"))
            continue
        import optax

        from tpflax._src.dryrun import dry_run
        from tpflax._src.mesh import make_mesh
        from tpflax._src.step import make_train_step

        mesh = make_mesh(c.mesh)
        opt = ctx.optimizer if ctx.optimizer is not None else optax.sgd(0.0)
        ts = make_train_step(ctx.zoo, c.plan, mesh, opt, ctx.batch)
        dr = dry_run(ts, c.plan, mesh, progress=True)  # on a terminal: shows the compile of each shape
        m = dr.memory
        if m.get("argument") is None or m.get("temp") is None:
            out.append(Verification(c.mesh, est, None, fits_est, None, None, dr.compile_seconds,
                                    note="XLA reported no memory analysis"))
            continue
        compiled = int(m.get("argument") or 0) + int(m.get("output") or 0) + int(m.get("temp") or 0) \
            - int(m.get("alias") or 0)
        fits_xla = compiled <= c.device_memory
        out.append(Verification(c.mesh, est, compiled, fits_est, fits_xla, fits_xla == fits_est,
                                dr.compile_seconds))
    return tuple(out)
