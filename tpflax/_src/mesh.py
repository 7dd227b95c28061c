"""Mesh shapes, axis roles and real meshes.

Planning needs only a mesh *shape*: an ordered ``{axis name: size}``. This module
turns whatever the user gave (a dict, ``"data=2,model=4"``, a ``jax.sharding.Mesh``
or ``AbstractMesh``) into that shape, decides the role of every axis (tensor,
fsdp, data, expert), and builds real meshes with Auto axis types for apply.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from tpflax._src.errors import AbstractMeshError, DeviceError, MeshError, PlanMismatchError

TENSOR, FSDP, DATA, EXPERT = "tensor", "fsdp", "data", "expert"
ROLES = (TENSOR, FSDP, DATA, EXPERT)

# Axis names recognised without help. Anything else needs ``axis_roles=``.
DEFAULT_ROLE_NAMES: Mapping[str, str] = MappingProxyType({
    "model": TENSOR, "tensor": TENSOR, "tp": TENSOR, "mp": TENSOR,
    "fsdp": FSDP,
    "data": DATA, "dp": DATA, "batch": DATA, "replica": DATA,
    "expert": EXPERT, "ep": EXPERT,
})


@dataclass(frozen=True)
class MeshShape:
    """An ordered mesh shape with a role for every axis.

    Attributes:
        axes: ``((name, size), ...)`` in mesh order.
        roles: ``((name, role), ...)``; role is one of ``ROLES``.
    """

    axes: tuple[tuple[str, int], ...]
    roles: tuple[tuple[str, str], ...]

    @functools.cached_property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @functools.cached_property
    def role_axes(self) -> dict[str, frozenset[str]]:
        """``{role: its axes}``, size-1 axes too (found once per mesh: the estimate asks for every dim it meets)."""
        out: dict[str, set[str]] = {}
        for n, r in self.roles:
            out.setdefault(r, set()).add(n)
        return {r: frozenset(ns) for r, ns in out.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def size(self) -> int:
        return math.prod(s for _, s in self.axes)

    def axes_with(self, role: str) -> tuple[str, ...]:
        """Axes of one role with size > 1, in mesh order (size-1 axes shard nothing)."""
        sizes = self.sizes
        return tuple(n for n, r in self.roles if r == role and sizes[n] > 1)

    def group(self, role: str) -> tuple[str | tuple[str, ...] | None, int]:
        """The PartitionSpec entry and total size for all axes of ``role``."""
        axes = self.axes_with(role)
        size = math.prod(self.sizes[a] for a in axes)
        if not axes:
            return None, 1
        return (axes[0] if len(axes) == 1 else axes), size

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.axes)


def parse_mesh_string(text: str) -> dict[str, int]:
    """Parse ``"data=2,model=4"`` (also ``data:2 model:4``) into a dict."""
    out: dict[str, int] = {}
    problems = []
    # spaces around '=' or ':' ("model = 2") belong to the pair, not between pairs
    pieces = [p.strip() for p in re.sub(r"\s*([=:])\s*", r"\1", text.strip()).split(",")]
    if not any(pieces):
        raise MeshError(f"mesh {text!r} is empty; write it as name=size pairs, e.g. 'data=2,model=4'")
    if not all(pieces):
        # "data=2,,model=4", "data=2," or ",model=4": a pair left out, or one comma too many; not dropped,
        # since the caller may have meant an axis there
        where = ("starts with a comma" if not pieces[0] else "ends with a comma" if not pieces[-1]
                 else "has two commas with no axis between them")
        raise MeshError(f"cannot parse mesh {text!r}: it {where}; write name=size pairs separated by one comma, "
                        "e.g. 'data=2,model=4'")
    parts = [p for piece in pieces for p in piece.split()]
    for part in parts:
        m = re.fullmatch(r"([A-Za-z_][\w-]*)\s*[=:]\s*(-?\d+)", part)
        if not m:
            problems.append(f"{part!r} is not name=size; write e.g. 'model=4'")
            continue
        name, size = m.group(1), int(m.group(2))
        if name in out:
            problems.append(f"axis {name!r} appears twice; give each axis once")
        out[name] = size
    if problems:
        raise MeshError(f"cannot parse mesh {text!r}", problems)
    return out


def mesh_shape(mesh: Any, axis_roles: Mapping[str, str] | None = None) -> MeshShape:
    """Normalise a mesh description into a :class:`MeshShape`.

    Args:
        mesh: a ``{name: size}`` mapping, a ``"name=size,..."`` string, a sequence of
            ``(name, size)`` pairs, a ``jax.sharding.Mesh``/``AbstractMesh``, or a MeshShape.
        axis_roles: roles for axis names tpflax does not recognise (or to override
            the defaults), e.g. ``{"x": "tensor", "y": "fsdp"}``. An unknown axis of
            size 1 needs none: it splits nothing.

    >>> str(mesh_shape({"data": 2, "model": 4}))
    'data=2,model=4'
    """
    if isinstance(mesh, MeshShape):
        if not axis_roles:
            return mesh
        mesh = mesh.sizes
    pairs = _pairs(mesh)
    problems = []
    seen = set()
    for name, size in pairs:
        if not isinstance(name, str) or not name:
            problems.append(f"axis name {name!r} is not a non-empty string")
        if name in seen:
            problems.append(f"axis {name!r} appears twice; mesh axis names must be unique")
        seen.add(name)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            # an array (a batch passed where the mesh goes) is named by its type and shape, not printed whole
            shown = (f"{type(size).__name__} of shape {tuple(size.shape)}" if hasattr(size, "shape")
                     and getattr(size, "ndim", 0) else repr(size))
            problems.append(f"axis {name!r} has size {shown}; sizes must be integers >= 1")
    if not pairs:
        problems.append("the mesh has no axes; give at least one, e.g. {'model': 8}")
    try:
        if isinstance(axis_roles, (str, bytes)):
            raise TypeError
        overrides = dict(axis_roles or {})
    except (TypeError, ValueError):  # a "x=tensor" string was a bare ValueError from dict()
        raise MeshError(f"axis_roles={axis_roles!r} is not a mapping of axis name to role; write e.g. "
                        "axis_roles={'x': 'tensor', 'y': 'fsdp'} (roles: " + ", ".join(ROLES) + ")") from None
    for name, role in overrides.items():
        if role not in ROLES:
            problems.append(f"axis_roles[{name!r}] = {role!r} is not one of {', '.join(ROLES)}")
        elif name not in seen:
            problems.append(f"axis_roles names axis {name!r}, which the mesh {dict(pairs)} does not have")
    roles = []
    for name, size in pairs:
        role = overrides.get(name) or DEFAULT_ROLE_NAMES.get(str(name).lower())
        if role is None and size == 1:
            role = DATA  # shards nothing whatever its role: MaxText's meshes carry a dozen such axes
        if role is None:
            problems.append(
                f"axis {name!r} has no known role; name it model/tensor/tp/mp, fsdp, data/dp/batch/replica "
                f"or expert/ep, or pass axis_roles={{{name!r}: 'tensor'|'fsdp'|'data'|'expert'}}")
        roles.append((name, role))
    if problems:
        raise MeshError("invalid mesh", problems)
    return MeshShape(axes=tuple((n, int(s)) for n, s in pairs), roles=tuple(roles))


def batch_axes(shape: MeshShape) -> tuple[str, ...]:
    """Mesh axes a step's batch dim splits over: every data, fsdp and expert axis larger than 1, mesh order.

    The one batch-layout rule: apply places batches with it, and the cost model
    and dry run count activations with it. An expert axis splits the batch too
    (GShard, Switch, MaxText's ``activation_batch``): the layers outside the
    experts then run on a slice of the batch on each expert rank instead of the
    same work on all of them; an expert layer gathers its tokens over that axis.

    >>> batch_axes(mesh_shape({"data": 2, "fsdp": 2, "model": 2, "dp": 1}))
    ('data', 'fsdp')
    >>> batch_axes(mesh_shape({"expert": 4, "data": 2}))
    ('expert', 'data')
    """
    sizes = shape.sizes
    return tuple(n for n, r in shape.roles if r in (DATA, FSDP, EXPERT) and sizes[n] > 1)


def batch_label(shape: MeshShape) -> str:
    """How messages name the axes a batch splits over: ``"data x fsdp"``, with ``" x expert"`` when the
    mesh has an expert axis larger than 1.

    >>> batch_label(mesh_shape({"expert": 4, "data": 2})), batch_label(mesh_shape({"fsdp": 8}))
    ('data x fsdp x expert', 'data x fsdp')
    """
    return "data x fsdp" + (" x expert" if any(r == EXPERT and shape.sizes[n] > 1 for n, r in shape.roles) else "")


def batch_pspec(shape: MeshShape):
    """The ``PartitionSpec`` of a batch leaf's dims: dim 0 over :func:`batch_axes` (empty if none).

    The expert axes come last (minor-most), whatever the mesh order: an expert layer
    gathers its tokens over them alone, leaving each device the data/fsdp slice it
    had (measured on the zoo MoE, XLA:CPU, expert=4,data=2: with the expert axis
    major XLA gathered the whole batch at every expert einsum, 1.95x the step's flops).

    >>> batch_pspec(mesh_shape({"data": 2, "fsdp": 2, "model": 2}))
    P(('data', 'fsdp'),)
    >>> batch_pspec(mesh_shape({"expert": 4, "data": 2}))
    P(('data', 'expert'),)
    """
    from jax.sharding import PartitionSpec

    roles = dict(shape.roles)
    axes = sorted(batch_axes(shape), key=lambda a: roles[a] == EXPERT)  # stable: mesh order otherwise
    if not axes:
        return PartitionSpec()
    return PartitionSpec(axes[0] if len(axes) == 1 else tuple(axes))


def check_mesh_matches(mesh: Any, want: MeshShape) -> None:
    """Raise PlanMismatchError if ``mesh``'s axis names and sizes differ from ``want``'s.

    >>> check_mesh_matches({"model": 2}, mesh_shape({"model": 2}))
    >>> check_mesh_matches({"model": 4, "data": 2}, mesh_shape({"data": 2, "model": 4}))
    Traceback (most recent call last):
    tpflax._src.errors.PlanMismatchError: the mesh {'model': 4, 'data': 2} differs from the plan's mesh {'data': 2, 'model': 4} (the same axes in another order: model, data where the plan has data, model); build it with tpflax.make_mesh({'data': 2, 'model': 4}) or re-plan for this mesh
    """
    got = tuple((str(n), int(v)) for n, v in _pairs(mesh))  # names and sizes only: roles are the plan's
    if got != tuple(want.axes):
        # the same axes in another order print as equal dicts: say it is the order (it sets which axis is
        # innermost, on the fast links, which the plan's prices assumed)
        order = (f" (the same axes in another order: {', '.join(n for n, _ in got)} where the plan has "
                 f"{', '.join(want.names)})" if sorted(got) == sorted(want.axes) else "")
        raise PlanMismatchError(
            f"the mesh {dict(got)} differs from the plan's mesh {want.sizes}{order}; build it with "
            f"tpflax.make_mesh({want.sizes}) or re-plan for this mesh")


def device_mesh(mesh: Any = None, want: MeshShape | None = None):
    """THE coercion to a ``jax.sharding.Mesh``: a Mesh as is, anything else built with :func:`make_mesh`.

    Args:
        mesh: a ``jax.sharding.Mesh``, or anything :func:`mesh_shape` reads;
            None means ``want``.
        want: the shape the mesh must have (a plan's ``plan.mesh``); then an
            ``AbstractMesh`` is refused (it has no devices to place on).

    Raises:
        PlanMismatchError: the mesh differs from ``want``.
        AbstractMeshError: the mesh is abstract (a MeshError, and a PlanMismatchError as before).
        DeviceError: a shape needs more devices than there are.

    >>> device_mesh({"model": 1}).axis_names
    ('model',)
    """
    import jax

    if mesh is None and want is not None:
        mesh = want  # with its roles: axes named 'rows', 'cols' need them
    if want is not None:
        if isinstance(mesh, jax.sharding.AbstractMesh):
            raise AbstractMeshError(
                "an AbstractMesh has no devices to place arrays on; pass a jax.sharding.Mesh, e.g. "
                f"tpflax.make_mesh({want.sizes})")
        check_mesh_matches(mesh, want)
    return mesh if isinstance(mesh, jax.sharding.Mesh) else make_mesh(mesh)


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    """The names of ``mesh``'s Explicit axes, in mesh order (``jax.make_mesh``'s default axis type in jax 0.10).

    >>> import jax
    >>> from jax.sharding import AxisType
    >>> explicit_axes(jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto)))
    ('data',)
    """
    import jax

    kind = getattr(jax.sharding.AxisType, "Explicit", None)
    types = getattr(mesh, "axis_types", None) or ()
    return tuple(n for n, t in zip(getattr(mesh, "axis_names", ()), types, strict=False)
                 if kind is not None and t == kind)


def as_written_or_auto(fn: Callable[..., Any], mesh: Any, args: Sequence[Any],
                       out_shardings: Any) -> Callable[..., Any]:
    """``fn`` as it can run under ``jax.jit`` on ``mesh``: as written, or with the mesh's Explicit axes Auto.

    On a mesh with Explicit axes (``jax.make_mesh``'s default) the arguments' layouts are part of their
    types, and code written for Auto axes (every unannotated Flax model) fails to trace: a matmul whose
    contracting dims are split is "ambiguous" without an ``out_sharding=``. Such a step runs inside
    ``jax.sharding.auto_axes``, as it would on a mesh with Auto axes: its outputs come back laid out as
    ``out_shardings`` says. A step that traces as written (code written for explicit mode,
    which ``auto_axes`` would break) is kept as written, as is every step on a mesh without Explicit axes.

    Args:
        fn: the step.
        mesh: the ``jax.sharding.Mesh`` it runs on.
        args: its arguments (arrays or ``ShapeDtypeStruct``s with their shardings), traced to decide.
        out_shardings: the outputs' NamedSharding tree (or one for all), or a function of their
            ``ShapeDtypeStruct`` tree returning it.

    Raises:
        Exception: what tracing ``fn`` as written raised, when it fails with Auto axes too.
    """
    import jax

    names = explicit_axes(mesh)
    if not names:
        return fn
    try:
        jax.eval_shape(fn, *args)
        return fn
    except Exception as first:  # noqa: BLE001 - re-raised below unless Auto axes trace
        error = first
    try:
        if callable(out_shardings):  # from the outputs' shapes, traced with them all replicated
            whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            out_shardings = out_shardings(jax.eval_shape(jax.sharding.auto_axes(fn, axes=names, out_sharding=whole),
                                                         *args))
        auto = jax.sharding.auto_axes(fn, axes=names, out_sharding=out_shardings)
        jax.eval_shape(auto, *args)
    except Exception:  # noqa: BLE001 - the step as written says what is wrong
        raise error from None
    return auto


def constrain_to(x: Any, sharding: Any) -> Any:
    """``x`` laid out as ``sharding`` inside ``jax.jit``: ``with_sharding_constraint`` over Auto mesh axes,
    ``jax.sharding.reshard`` over Explicit ones (``with_sharding_constraint`` refuses a spec naming them).

    A mesh with Explicit axes (``jax.make_mesh(..., axis_types=(AxisType.Explicit, ...))``) carries their
    layout in the array's type: it is resharded to the spec's Explicit axes first, then constrained over its
    Auto ones.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto))
    >>> x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P()))
    >>> jax.jit(lambda a: constrain_to(a, NamedSharding(mesh, P("data", "model"))))(x).sharding.spec
    P('data', 'model')
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    context = jax.sharding.get_abstract_mesh()
    if (not context.empty and dict(context.shape) == dict(sharding.mesh.shape)
            and tuple(context.axis_types) != tuple(sharding.mesh.axis_types)):
        # inside jax.sharding.auto_axes (a step run by as_written_or_auto) the mesh's axes are Auto: a layout
        # is pinned on the context mesh, whose types the arrays carry
        sharding = NamedSharding(context, sharding.spec)
    mesh, spec = sharding.mesh, sharding.spec
    explicit = set(explicit_axes(mesh))
    if not explicit:
        return jax.lax.with_sharding_constraint(x, sharding)

    def only(entry: Any, keep_explicit: bool) -> Any:
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            return None
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if (a in explicit) == keep_explicit)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    x = jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*(only(e, True) for e in spec))))
    auto = PartitionSpec(*(only(e, False) for e in spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, auto)) if any(e is not None for e in auto) else x


def sharding_mesh(mesh: Any = None, want: MeshShape | None = None):
    """The mesh to describe a layout on: an ``AbstractMesh`` as is, anything else as :func:`device_mesh`.

    A ``NamedSharding`` needs no devices (``jax.jit(...).lower`` for a pod this
    host does not have), so only placing arrays refuses an abstract mesh.

    Raises:
        PlanMismatchError: the mesh differs from ``want``.
        DeviceError: a shape needs more devices than there are.

    >>> import jax
    >>> sharding_mesh(jax.sharding.AbstractMesh((16, 8), ("data", "model"))).shape["data"]
    16
    """
    import jax

    if isinstance(mesh, jax.sharding.AbstractMesh):
        if want is not None:
            check_mesh_matches(mesh, want)
        return mesh
    return device_mesh(mesh, want)


def _pairs(mesh: Any) -> list[tuple[Any, Any]]:
    if isinstance(mesh, MeshShape):
        return list(mesh.axes)
    if isinstance(mesh, str):
        return list(parse_mesh_string(mesh).items())
    if isinstance(mesh, Mapping):
        return list(mesh.items())
    # jax.sharding.Mesh and AbstractMesh both expose axis_names and a shape mapping.
    names = getattr(mesh, "axis_names", None)
    if names is not None and hasattr(mesh, "shape"):
        shape = mesh.shape
        return [(n, int(shape[n])) for n in names]
    if isinstance(mesh, Sequence) and all(isinstance(p, Sequence) and len(p) == 2 for p in mesh):
        return [tuple(p) for p in mesh]
    raise MeshError(
        f"cannot read a mesh from {type(mesh).__name__}; pass a dict like {{'data': 2, 'model': 4}}, "
        "a 'data=2,model=4' string, or a jax.sharding.Mesh / AbstractMesh")


def abstract_mesh(mesh: Any):
    """A ``jax.sharding.AbstractMesh`` (Auto axis types) with the same shape: no devices needed."""
    import jax

    shape = _named_shape(mesh)
    auto = (jax.sharding.AxisType.Auto,) * len(shape.axes)
    return jax.sharding.AbstractMesh(
        tuple(s for _, s in shape.axes), shape.names, axis_types=auto)


def under_mesh(mesh: Any):
    """A context tracing a model under ``mesh``'s abstract mesh (Auto axes), as its step runs under its mesh;
    nothing when ``mesh`` is None or a mesh is set already (the caller's ``jax.set_mesh``).

    A model that constrains its activations with bare ``PartitionSpec`` s
    (``jax.lax.with_sharding_constraint(x, P("data", None, "model"))``, as the JAX sharding guide writes
    them under ``jax.set_mesh``) traces only under a mesh of those axis names; flax's
    ``nn.with_logical_constraint`` constrains nothing without one.

    >>> import jax
    >>> with under_mesh({"data": 2, "model": 4}):
    ...     dict(jax.sharding.get_abstract_mesh().shape)
    {'data': 2, 'model': 4}
    """
    import jax

    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(abstract_mesh(mesh))


# The mesh the model traces of one tpflax call run under (estimate's plan mesh, suggest_mesh's axes): each trace
# site reads it through traced_under, so each falls back on its own (a model binding a mesh of its own).
_TRACE_MESH: contextvars.ContextVar[Any] = contextvars.ContextVar("tpflax_trace_mesh", default=None)


@contextlib.contextmanager
def tracing_for(mesh: Any) -> Iterator[None]:
    """Within it, :func:`traced_under` given no mesh traces under ``mesh`` (None: as around it)."""
    token = _TRACE_MESH.set(mesh if mesh is not None else _TRACE_MESH.get())
    try:
        yield
    finally:
        _TRACE_MESH.reset(token)


def traced_under(mesh: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` (one abstract trace of a model) under :func:`under_mesh` ``(mesh)``, or of the mesh
    :func:`tracing_for` set when ``mesh`` is None: every trace tpflax makes of a model it knows the mesh of
    runs so. A model binding a concrete mesh of its own (``jax.shard_map(mesh=...)``, which no other context
    mesh may differ from) fails under ours: ``fn`` runs again without it, and if that fails too, the first
    failure is raised.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> f = lambda: jax.make_jaxpr(lambda x: jax.lax.with_sharding_constraint(x, P("model")))(jnp.ones(8))
    >>> traced_under({"model": 4}, f).eqns[0].primitive.name
    'sharding_constraint'
    >>> with tracing_for({"model": 4}):
    ...     traced_under(None, f).eqns[0].primitive.name
    'sharding_constraint'
    """
    context = under_mesh(mesh if mesh is not None else _TRACE_MESH.get())
    if isinstance(context, contextlib.nullcontext):
        return fn()
    try:
        with context:
            return fn()
    except Exception as first:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - the first failure says why
            raise first from None


def make_mesh(mesh: Any, devices: Sequence[Any] | None = None, *, explicit: bool = False,
              target: Any = None, axis_types: Sequence[Any] | None = None):
    """Build a ``jax.sharding.Mesh`` over real (or CPU-emulated) devices, or a TPU target's.

    Axis types are Auto unless ``explicit=True``. jax 0.10's ``jax.make_mesh``
    defaults to Explicit, under which unannotated Flax models fail to trace in
    a hand-written step. ``make_train_step``, ``jit_step`` and ``gathered_loss``
    run such code with the axes Auto (:func:`as_written_or_auto`).

    Args:
        mesh: a mesh description accepted by :func:`mesh_shape`.
        devices: devices to use, in order (a list, or an array of them such as
            ``mesh.devices``: kept as laid out when it has the mesh's shape); defaults
            to the first ``prod(sizes)`` of ``jax.devices()``. Given with a jax Mesh,
            the mesh's axes over these devices.
        explicit: use Explicit axis types instead of Auto (for a jax Mesh given:
            its devices with Explicit axes). A jax Mesh or AbstractMesh keeps its own
            axis types otherwise.
        axis_types: one ``jax.sharding.AxisType`` per axis (or its name, ``"explicit"``,
            ``"auto"``), as ``jax.make_mesh`` takes them: a mesh with some axes
            Explicit and others Auto.
        target: a TPU topology such as ``"tpu-v5e:16x16"``: the mesh is over
            that slice's abstract devices (libtpu, ``pip install "tpflax[tpu]"``),
            for :func:`tpflax.dry_run` with the TPU compiler. Nothing can be
            allocated on them. The mesh must use every device of the topology.

    Raises:
        MeshError: an unknown target (the known ones are listed), a mesh whose
            size differs from the target's device count, or ``axis_types`` that are not
            one type per axis (or contradict ``explicit=True``).
        DeviceError: too few devices, or libtpu missing for a target.

    >>> m = make_mesh({"model": 1})
    >>> m.axis_names
    ('model',)
    """
    import jax
    import numpy as np

    own = None
    if isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        own = tuple(mesh.axis_types)
    shape = _named_shape(mesh)
    types = _axis_types(shape, axis_types, explicit, own)
    if isinstance(mesh, jax.sharding.Mesh) and target is None:
        if devices is None and types == own:
            return mesh  # already a concrete jax Mesh
        # rebuilt over other devices, or with other axis types
        devices = mesh.devices if devices is None else devices
    if target is not None:
        return _target_mesh(shape, target, types)
    need = shape.size
    sizes = tuple(s for _, s in shape.axes)
    grid = np.asarray(devices, dtype=object) if isinstance(devices, np.ndarray) else None
    # a device grid (mesh.devices, mesh_utils.create_device_mesh) is its devices in order, kept as laid out
    # when it has the mesh's shape
    if isinstance(devices, (str, bytes)):  # a platform name ("cpu", "tpu"): its letters were listed as devices
        raise DeviceError(f"devices={devices!r} is a {type(devices).__name__}, not a list of jax devices; pass "
                          f"e.g. jax.devices({devices!r})[:{need}] or jax.devices()[:{need}]")
    pool = list(jax.devices() if devices is None else grid.ravel() if grid is not None else devices)
    odd = [d for d in pool if not isinstance(d, jax.Device)]
    if odd:
        raise DeviceError(f"devices for mesh {shape} must be jax devices (e.g. jax.devices()[:{need}]), but "
                          f"{len(odd)} are not: {odd[0]!r} ({type(odd[0]).__name__})")
    if len(pool) < need and devices is not None:  # the caller's list is short, not the process's devices
        raise DeviceError(
            f"mesh {shape} needs {need} devices but devices= gives {len(pool)}; pass {need} distinct devices "
            f"(e.g. jax.devices()[:{need}]; this process sees {len(jax.devices())}), or make the axis sizes "
            f"multiply to {len(pool)}")
    if len(pool) < need:
        raise DeviceError(
            f"mesh {shape} needs {need} devices but only {len(pool)} are available "
            f"({pool[0].platform if pool else 'none'}); on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before jax starts "
            f"(or run `tpflax ... --devices {need}`), or plan against an abstract mesh")
    ids = [getattr(d, "id", i) for i, d in enumerate(pool[:need])]
    if devices is not None and len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DeviceError(f"devices for mesh {shape} repeat device id(s) {dup}; a mesh needs {need} distinct "
                          "devices (pass e.g. jax.devices()[:n])")
    try:
        if devices is None:
            return jax.make_mesh(sizes, shape.names, axis_types=types)
    except Exception:  # noqa: BLE001 - fall back to a plain reshape of the device list
        pass
    if grid is None or grid.shape != sizes:
        grid = np.array(pool[:need], dtype=object).reshape(sizes)
    return jax.sharding.Mesh(grid, shape.names, axis_types=types)


def _axis_types(shape: MeshShape, given: Sequence[Any] | None, explicit: bool, own: tuple[Any, ...] | None):
    """The axis types of the mesh :func:`make_mesh` builds: ``given`` (checked), all Explicit for ``explicit``,
    else a jax mesh's ``own``, else all Auto."""
    import jax

    kinds = jax.sharding.AxisType
    n = len(shape.axes)
    if given is None:
        if explicit:
            return (kinds.Explicit,) * n
        return own if own is not None else (kinds.Auto,) * n
    names = {k.name.lower(): k for k in kinds}
    types = tuple(names.get(t.lower()) if isinstance(t, str) else t if isinstance(t, kinds) else None
                  for t in (given if isinstance(given, (list, tuple)) else (given,)))
    if len(types) != n or None in types:
        raise MeshError(f"axis_types={given!r} for mesh {shape}: give one jax.sharding.AxisType per axis ({n}), "
                        f"e.g. axis_types=({', '.join('AxisType.Explicit' if i == 0 else 'AxisType.Auto' for i in range(n))})"
                        f" (or their names: {', '.join(repr(k) for k in names)})")
    if explicit and any(t != kinds.Explicit for t in types):
        raise MeshError(f"explicit=True asks for every axis Explicit but axis_types={given!r} has others; "
                        "give one of them")
    return types


def _named_shape(mesh: Any) -> MeshShape:
    """``mesh`` as a :class:`MeshShape` for building a jax mesh, which needs axis names and sizes, not roles:
    a name tpflax does not know (``{"rows": 2, "cols": 4}``) gets a placeholder role, so :func:`make_mesh` and
    :func:`abstract_mesh` build any mesh :func:`mesh_shape` would refuse only for want of roles. A mesh that
    carries roles keeps them; one that is no list of axes is mesh_shape's MeshError."""
    if isinstance(mesh, MeshShape):
        return mesh
    try:
        pairs = _pairs(mesh)
    except Exception:  # noqa: BLE001 - mesh_shape raises the MeshError naming the problem
        return mesh_shape(mesh)
    names = {n for n, _ in pairs if isinstance(n, str) and n and DEFAULT_ROLE_NAMES.get(n.lower()) is None}
    return mesh_shape(mesh, dict.fromkeys(sorted(names), DATA) or None)


def _target_mesh(shape: MeshShape, target: Any, types: tuple[Any, ...]):
    """A mesh over a TPU topology's abstract devices, laid out along the torus when jax can."""
    import jax
    import numpy as np

    from tpflax._src.tpu import parse_topology, topology_devices, topology_for

    topo = parse_topology(target)
    if shape.size != topo.devices:
        fit = topology_for(topo.generation, shape.size)
        hint = f"use --target {fit.name}" if fit else f"no {topo.generation} topology has {shape.size} devices"
        raise MeshError(f"mesh {shape} has {shape.size} devices but target {topo.name} has {topo.devices}; "
                        f"make the axis sizes multiply to {topo.devices}, or {hint}")
    pool = topology_devices(topo)
    sizes = tuple(s for _, s in shape.axes)
    try:
        # ICI-aware order; refused when an axis is no product of physical axes, or
        # for v4's two devices per chip
        return jax.make_mesh(sizes, shape.names, axis_types=types, devices=pool)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.array(pool, dtype=object).reshape(sizes)  # id order: neighbouring chips stay together
        return jax.sharding.Mesh(grid, shape.names, axis_types=types)


def emulate_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices. Works only before jax initialises its backend."""
    import os

    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    try:
        import jax

        jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # noqa: BLE001 - backend already up; the caller checks the device count
        pass
