"""Checkpoints with orbax: save sharded trees, restore them onto any mesh.

``save_checkpoint(path, tree)`` writes one tree with orbax-checkpoint,
atomically: the tree goes to a hidden sibling directory, a ``tpflax.json``
marker is written last, and only then is the directory renamed into place. A
save that dies part-way leaves the previous checkpoint (or nothing) at
``path``, never a checkpoint that restores wrong. ``save_checkpoint(root, tree,
step=, keep=)`` writes through ``orbax.checkpoint.CheckpointManager`` instead:
step directories, the last ``keep`` kept, orbax's own layout.

``restore_checkpoint`` reads a tree, an orbax step directory or a manager root
(its latest step, or ``step=``) straight into a plan's layout on a mesh of any
shape (or onto one device): each device reads only its own slices, so an
unsharded checkpoint is converted without the whole tree ever sitting on one
device. orbax is imported only when a function here runs.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from tpflax._src.apply.bind import bind_mesh, is_graph_node, match_plan, rebox_all
from tpflax._src.apply.put import check_values
from tpflax._src.apply.stored import has_layouts, mark_stored, model_order, reorder, tree_layouts
from tpflax._src.checkpoint_layout import (
    MARKER,
    STEP_METADATA,
    TPFLAX_OLD,
    TPFLAX_TMP,
    Located,
    locate,
    manager_steps,
    sibling,
)
from tpflax._src.errors import CheckpointError, OptionError, PlanMismatchError, TreeError
from tpflax._src.facts.tree import Leaf, is_box, key_kinds, keystr, unbox, unboxed, walk
from tpflax._src.planner.decision import require_plan
from tpflax._src.planner.plan import Plan
from tpflax._src.progress import Progress

# jax 0.12 deprecates constructing jax.sharding.SingleDeviceSharding directly (a DeprecationWarning on
# every restore without a plan); make_single_device_sharding is in jax 0.10.2 already, the class is
# the fallback for any jax without it
_one_device = getattr(jax.sharding, "make_single_device_sharding", None) or jax.sharding.SingleDeviceSharding

FORMAT = "tpflax.checkpoint"
VERSION = 1


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - orbax is in the test and checkpoint extras
        raise CheckpointError("checkpoints need orbax-checkpoint; pip install 'tpflax[checkpoint]'") from e
    return ocp


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _marker(tree: Any, plan: Plan | None) -> dict[str, Any]:
    leaves, _ = walk(tree)
    return {"format": FORMAT, "version": VERSION,
            "leaves": [{"path": x.path, "shape": list(x.shape), "dtype": x.dtype} for x in leaves],
            "plan": json.loads(plan.to_json()) if plan is not None else None}


def save_checkpoint(path: str | os.PathLike, tree: Any, *, plan: Plan | None = None,
                    overwrite: bool = False, step: int | None = None,
                    keep: int | None = None) -> Path:
    """Save a tree (sharded or not) with orbax, atomically; or as one step of a CheckpointManager.

    Every process of a multi-host run must call it with the same ``path`` on a
    shared filesystem; each writes the shards it holds.

    With ``step``, ``path`` is a ``CheckpointManager`` root and the tree is
    saved by ``orbax.checkpoint.CheckpointManager`` as its single ``default``
    item: ``path/<step>/default``, the last ``keep`` steps kept. That is
    orbax's own layout, so a training loop may equally use its own manager
    (async saves, ``step_prefix``, best-N policies) and restore with
    :func:`restore_checkpoint` all the same.

    Args:
        path: the checkpoint directory to create, or the manager root with ``step``.
        tree: arrays (flax boxes and nnx Variables are unwrapped to their values). Python scalars
            are saved as the int32 / float32 jax makes of them (64-bit with ``jax_enable_x64``).
            An nnx Module or Optimizer is saved as its ``nnx.state(...)``: restore it with
            ``like=obj`` (a new object) or ``like=nnx.state(obj)`` (its state, for ``nnx.update``).
        plan: stored alongside (``tpflax.json``, or the step's custom metadata) for reference.
            A plan that stores fused kernels head-aligned (``plan(..., fused="aligned")``) must be
            passed with a tree placed by it: those leaves, and the optimizer-state leaves tied to
            them by path, are written in the model's order, so the checkpoint restores onto any
            plan and mesh.
        overwrite: replace an existing checkpoint at ``path`` (or the existing
            ``step``; the old one stays in place until the new one is complete
            without ``step``).
        step: save as this step of a CheckpointManager at ``path``.
        keep: with ``step``: keep only the newest ``keep`` steps (orbax's
            ``max_to_keep``; default: all).

    Returns:
        The absolute checkpoint path (the step directory with ``step``).

    Raises:
        CheckpointError: ``path`` (or the step) exists and ``overwrite`` is
            False, or the save failed.
        TreeError: a leaf restore could not give back bit-exact, as :func:`tpflax.shard`
            refuses to place it (nothing is written): a numpy int64/float64 leaf or a Python
            int past int32 (jax, without ``jax_enable_x64``, reads them as 32 bits), or a
            donated array.
        OptionError: ``step`` that is not a whole number >= 0, ``keep`` without ``step``, or
            ``keep`` < 1 (nothing is written).

    >>> import jax.numpy as jnp, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(os.path.join(d, "ck"), {"w": jnp.ones(3)}).name
    'ck'
    >>> [save_checkpoint(os.path.join(d, "run"), {"w": jnp.ones(3) * s}, step=s, keep=2).name
    ...  for s in range(3)]
    ['0', '1', '2']
    >>> sorted(os.listdir(os.path.join(d, "run")))
    ['1', '2']
    """
    if step is not None and not (isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 0):
        # orbax would write a "-1" step directory and then fail to find it (a bare KeyError)
        raise OptionError(f"step={step!r} is not a step number: pass a whole number >= 0 (e.g. step=0), "
                          "or no step to save one checkpoint at path")
    if keep is not None and (step is None or int(keep) < 1):
        raise OptionError(f"keep={keep} needs step= (it keeps the newest steps of a CheckpointManager) "
                          "and must be >= 1")
    if not isinstance(path, (str, os.PathLike)):  # an int was pathlib's bare TypeError, a tree the order swapped
        raise OptionError(f"path is {type(path).__name__}, not a directory path: the order is "
                          "save_checkpoint(path, tree, plan=...)")
    if plan is not None:  # a dict was a bare AttributeError ("'dict' object has no attribute 'decisions'")
        require_plan(plan, "save_checkpoint(path, tree, plan=plan)")
    if is_graph_node(tree):  # its variables, not flax's own fields (``_pytree__state``) as leaves
        from flax import nnx

        tree = nnx.state(tree)
    _check_saveable(tree)
    tree = model_order(tree, plan)
    if step is not None:
        return _save_step(Path(path).absolute(), tree, int(step), keep, overwrite, plan)
    ocp = _ocp()
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; pass overwrite=True or choose a new path")
    tmp, old = sibling(final, TPFLAX_TMP), sibling(final, TPFLAX_OLD)
    primary = jax.process_index() == 0
    if primary:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a parent directory goes: a bare FileExistsError naming the file alone
            raise CheckpointError(f"cannot save {final}: its directory {final.parent} cannot be made "
                                  f"({type(e).__name__}: {e.strerror or e}); choose a path under a directory") from e
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
    _sync("tpflax-ckpt-clean")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp, _saveable(tree))
            ckptr.wait_until_finished()
    except Exception as e:
        raise CheckpointError(f"saving {final} failed: {type(e).__name__}: {e}") from e
    _sync("tpflax-ckpt-saved")
    if primary:
        with open(tmp / MARKER, "w") as f:
            json.dump(_marker(tree, plan), f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    _sync("tpflax-ckpt-final")
    return final


def _check_saveable(tree: Any) -> None:
    """TreeError, naming every leaf, for what restore could not give back bit-exact (as shard() refuses to
    place it): a numpy 64-bit leaf or a Python int past int32, which jax (x64 off) reads back as 32 bits
    (5e9 as 705032704), and a donated array. Checked before anything is written."""
    problems = []
    for path, b in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        x, where = unbox(b), keystr(path) or "the root"
        dtype = getattr(x, "dtype", None)
        if isinstance(x, jax.ShapeDtypeStruct):
            problems.append(f"{where}: abstract leaf (jax.ShapeDtypeStruct, shape {tuple(x.shape)}) holds no values "
                            "to save; save the arrays (tpflax.init_sharded makes them)")
        elif dtype is None and not isinstance(x, (int, float, complex, bool, np.generic)):
            problems.append(f"{where}: leaf of type {type(x).__name__} is not an array; checkpoints hold arrays and "
                            "numbers: keep it out of the saved tree")
        elif isinstance(dtype, np.dtype) and dtype.kind in "OSU":
            problems.append(f"{where}: array of dtype {dtype} (shape {tuple(np.shape(x))}) is not numeric; keep it "
                            "out of the saved tree or encode it as numbers")
    if problems:  # orbax's error named one leaf by its key tuple, and its threads logged tracebacks
        raise TreeError("the tree has leaves a checkpoint cannot hold", problems)
    values = [unbox(b) for b in jax.tree_util.tree_leaves(tree, is_leaf=is_box)]
    check_values(tree, values, what="the tree", doing="saved")


def _as_jax_holds(x: Any) -> Any:
    """A Python scalar as the numpy scalar jax makes of it (int32 / float32 unless jax_enable_x64), as
    plans record it and restore returns it; orbax would write it as 64 bits."""
    if type(x) in (int, float, complex):
        return np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
    return x


def _saveable(tree: Any) -> Any:
    """``tree`` unboxed, its zero-size leaves None: orbax refuses to write an array with no elements,
    and there is nothing to write (``tpflax.json`` records their shapes and dtypes; restore remakes them).
    Python scalars are written as the 32-bit values jax holds (see :func:`_as_jax_holds`)."""
    return jax.tree_util.tree_map(lambda x: None if 0 in jax.numpy.shape(x) else _as_jax_holds(x),
                                  unboxed(tree))


def _save_step(root: Path, tree: Any, step: int, keep: int | None, overwrite: bool,
               plan: Plan | None) -> Path:
    """One step through orbax's CheckpointManager (its atomic tmp-dir-and-rename, its layout)."""
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    try:
        with ocp.CheckpointManager(root, options=options) as manager:
            if step in manager.all_steps():
                if not overwrite:
                    raise CheckpointError(f"step {step} already exists in {root}; pass overwrite=True "
                                          "or save a new step")
                manager.delete(step)
            manager.save(step, args=ocp.args.StandardSave(_saveable(tree)), force=True,
                         custom_metadata={"tpflax": _marker(tree, plan)})
            manager.wait_until_finished()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"saving step {step} to {root} failed: {type(e).__name__}: {e}") from e
    return manager_steps(root)[step]


def _item_tree(ocp: Any, item: Path) -> Any:
    from etils import epath  # orbax's own path type (installed with it)

    try:  # the handler, not a Checkpointer: an item inside a manager's step has no step metadata
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(item))
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {item}: {type(e).__name__}: {e}") from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    tree = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                                  is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    empty = _recorded_empty(item)
    if not empty:
        return tree
    # the zero-size leaves tpflax saved as None (see _saveable), back as the leaves it recorded
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return jax.tree_util.tree_unflatten(treedef, [empty.get(keystr(p)) if x is None else x for p, x in flat])


def checkpoint_tree(path: str | os.PathLike, *, step: int | None = None, item: str | None = None) -> Any:
    """What a checkpoint holds: a tree of ``jax.ShapeDtypeStruct`` (nothing is read).

    Typed PRNG keys, which orbax stores as their uint32 key data, are reported
    as the keys that were saved (``ShapeDtypeStruct(shape=(), dtype=key<fry>)``)
    when tpflax wrote the checkpoint (its record of the saved tree says so); a
    checkpoint written by orbax alone holds no such record, and its keys show
    as key data.

    Args:
        path: a saved tree, an orbax step directory, or a CheckpointManager root.
        step: the manager step (default: the latest).
        item: the step's item (default: its only one; several give ``{item: tree}``).

    Raises:
        CheckpointError: nothing restorable at ``path``.

    >>> import jax, jax.numpy as jnp, tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "run")
    >>> _ = save_checkpoint(d, {"w": jnp.ones((2, 3)), "rng": jax.random.key(0)}, step=5)
    >>> checkpoint_tree(d)["w"].shape, checkpoint_tree(d)["rng"]
    ((2, 3), ShapeDtypeStruct(shape=(), dtype=key<fry>))
    """
    ocp = _ocp()
    found = locate(Path(path).absolute(), step=step, item=item)
    if found.items:
        return {name: _saved_tree(ocp, found.path / name) for name in found.items}
    return _saved_tree(ocp, found.path)


def _saved_tree(ocp: Any, item: Path) -> Any:
    """The item's tree as it was saved: orbax's metadata, with key data shown as the recorded keys."""
    keys = _recorded_keys(item)
    flat, treedef = jax.tree_util.tree_flatten_with_path(_item_tree(ocp, item))
    return jax.tree_util.tree_unflatten(treedef, [_wanted(x, keys.get(keystr(p))) for p, x in flat])


def _recorded_leaves(item: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of the leaves tpflax recorded when it saved ``item`` (its
    ``tpflax.json``, or the CheckpointManager step's custom metadata); {} without a record."""
    marker = _read_json(item / MARKER)
    if marker is None:
        step_meta = _read_json(item.parent / STEP_METADATA)
        marker = (step_meta.get("custom_metadata") or {}).get("tpflax") if isinstance(step_meta, dict) else None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return {}
    return {str(leaf["path"]): (tuple(int(d) for d in leaf["shape"]), str(leaf.get("dtype")))
            for leaf in marker.get("leaves") or ()
            if isinstance(leaf, dict) and "path" in leaf and isinstance(leaf.get("shape"), list)}


def _recorded_keys(item: Path) -> dict[str, jax.ShapeDtypeStruct]:
    """``{path: key}`` for the typed PRNG keys tpflax recorded when it saved ``item``."""
    kinds = key_kinds()
    return {path: jax.ShapeDtypeStruct(shape, kinds[dtype][1])
            for path, (shape, dtype) in _recorded_leaves(item).items() if dtype in kinds}


def _recorded_empty(item: Path) -> dict[str, jax.ShapeDtypeStruct]:
    """``{path: leaf as stored}`` for the zero-size leaves tpflax recorded (and did not write) saving ``item``."""
    return {path: jax.ShapeDtypeStruct(*_stored_form(shape, dtype))
            for path, (shape, dtype) in _recorded_leaves(item).items() if 0 in shape}


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stored_leaves(stored: Any) -> dict[str, jax.ShapeDtypeStruct]:
    flat, _ = jax.tree_util.tree_flatten_with_path(stored)
    return {keystr(p): x for p, x in flat}


def _stored_form(shape: Any, dtype: Any) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) as orbax stores such a leaf: a typed PRNG key as its uint32 key data.

    ``dtype`` may be a key dtype or its name (plans store ``"key<fry>"``); the
    key data has the key's shape plus the implementation's trailing dimension.
    """
    kind = key_kinds().get(str(dtype))
    if kind is None:
        return tuple(shape), dtype
    data = kind[2]
    return tuple(shape) + tuple(data.shape), data.dtype


def _same_form(a: tuple[tuple[int, ...], Any], b: tuple[tuple[int, ...], Any]) -> bool:
    return a[0] == b[0] and jax.numpy.dtype(a[1]) == jax.numpy.dtype(b[1])


def _wanted(stored: jax.ShapeDtypeStruct, target: Any) -> jax.ShapeDtypeStruct:
    """The leaf to restore: ``target``'s typed PRNG key if ``stored`` is its key data, else ``stored``."""
    kind = key_kinds().get(str(getattr(target, "dtype", None)))
    if kind is None or not _same_form(_stored_form(target.shape, target.dtype),
                                      (tuple(stored.shape), stored.dtype)):
        return stored
    return jax.ShapeDtypeStruct(tuple(target.shape), kind[1])


def _as_key(x: Any, want: jax.ShapeDtypeStruct) -> Any:
    """``x`` wrapped as ``want``'s typed PRNG key when orbax gave back its raw key data."""
    kind = key_kinds().get(str(want.dtype))
    if kind is None or str(x.dtype) == str(want.dtype):
        return x
    return jax.random.wrap_key_data(x, impl=kind[0])


def _empty(stored: jax.ShapeDtypeStruct, want: jax.ShapeDtypeStruct, sharding: Any) -> Any:
    """A zero-size leaf (not in the files: see _saveable) as ``want``, placed with ``sharding``."""
    x = _as_key(jax.numpy.zeros(stored.shape, stored.dtype), want)
    return jax.device_put(x, sharding)


def _target_problems(paths: list[str], boxes: list[Any],
                     stored_leaves: dict[str, jax.ShapeDtypeStruct]) -> list[str]:
    """The target tree must be exactly the stored tree: every difference, named at once.

    A typed PRNG key of the target matches its key data in the checkpoint.
    """
    problems = []
    for p, b in zip(paths, boxes, strict=True):
        s = stored_leaves.get(p)
        v = unbox(b)
        if s is None:
            problems.append(f"{p}: expected by the target tree but not in the checkpoint")
            continue
        held = (tuple(s.shape), s.dtype)
        form = _stored_form(getattr(v, "shape", s.shape), getattr(v, "dtype", s.dtype))
        if not _same_form(form, held):
            stored_as = (f" (stored as its key data {form[0]} {jax.numpy.dtype(form[1])})"
                         if str(v.dtype) in key_kinds() else "")
            problems.append(f"{p}: the checkpoint holds {held[0]} {s.dtype} but the target "
                            f"tree has {tuple(v.shape)} {v.dtype}{stored_as}")
    known = set(paths)
    problems += [f"{p}: in the checkpoint but not in the target tree; pass like= with the full tree"
                 for p in stored_leaves if p not in known]
    return problems


def _plan_decisions(paths: list[str], stored_leaves: dict[str, Any], plan: Plan, item: Path) -> list[Any]:
    """The plan's Decision for every leaf, matched as shard() matches (PlanMismatchError otherwise).

    orbax stores a typed PRNG key as its key data, so the plan's key leaves are
    compared in that form; differences are named in it too.
    """
    stored_plan = dataclasses.replace(plan, decisions={
        k: dataclasses.replace(d, shape=shape, dtype=str(dtype))
        for k, d in plan.decisions.items() for shape, dtype in [_stored_form(d.shape, d.dtype)]})
    leaves = [Leaf(path=p, shape=tuple(stored_leaves[p].shape), dtype=str(stored_leaves[p].dtype),
                   itemsize=jax.numpy.dtype(stored_leaves[p].dtype).itemsize) for p in paths]
    # as shard() does: the planned tree, or one collection of planned linen variables
    return [plan.decisions[q] for q in match_plan(stored_plan, leaves, checkpoint=str(item))]


def _restore_item(ocp: Any, item: Path, plan: Plan | None, mesh: Any, like: Any,
                  shardings: Any) -> Any:
    if is_graph_node(like):  # an nnx Module / Optimizer: its state restored, merged into a new object
        from flax import nnx

        graphdef, state = nnx.split(like)
        if is_graph_node(shardings):
            shardings = nnx.state(shardings)
        return nnx.merge(graphdef, _restore_item(ocp, item, plan, mesh, state, shardings))
    stored = _item_tree(ocp, item)
    stored_leaves = _stored_leaves(stored)
    structure = stored if like is None else like
    boxes, treedef = jax.tree_util.tree_flatten_with_path(structure, is_leaf=is_box)
    paths = [keystr(p) for p, _ in boxes]
    values = [unbox(b) for _, b in boxes]
    problems = _target_problems(paths, values, stored_leaves)
    if problems:
        raise PlanMismatchError(f"the checkpoint {item} does not match the tree to restore", problems)
    # without like= or a plan, keys come back as the keys tpflax recorded saving them
    keys = _recorded_keys(item) if like is None else {}
    targets: list[Any] = values if like is not None else [keys.get(p) for p in paths]
    if isinstance(shardings, jax.sharding.Sharding):  # one for every leaf, as jax.jit takes one
        shard_list = [shardings] * len(paths)
    elif shardings is not None and like is None:
        shard_list = _shardings_by_path(shardings, paths, item)
    elif shardings is not None:
        shard_list = jax.tree_util.tree_leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shard_list) != len(paths):
            raise PlanMismatchError(f"shardings has {len(shard_list)} leaves but the tree has "
                                    f"{len(paths)}; lay it out like `like`")
    elif plan is not None:
        mesh = bind_mesh(plan, mesh)
        try:
            decisions = _plan_decisions(paths, stored_leaves, plan, item)
        except PlanMismatchError:
            # like= a TrainState (or {"params", "opt_state"}) with the parameters' plan: its leaves derived from
            # them as shard_train_state places them. It was refused, saying to pass like= (given) and shardings=
            derived = None if like is None else _derived_shardings(like, plan, mesh, len(paths))
            if derived is None:
                raise
            shard_list, shardings = derived, derived
        else:
            shard_list = [NamedSharding(mesh, d.spec) for d in decisions]
            targets = decisions if like is None else targets
    else:
        shard_list = [_one_device(jax.local_devices()[0])] * len(paths)
    # a typed PRNG key is read as the key the target (like= or the plan) has, not as its key data
    wanted = [_wanted(stored_leaves[p], t) for p, t in zip(paths, targets, strict=True)]
    empty = [0 in stored_leaves[p].shape for p in paths]  # saved as None: nothing to read
    target = jax.tree_util.tree_unflatten(treedef, [
        None if e else jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=s)
        for w, s, e in zip(wanted, shard_list, empty, strict=True)])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(item, target)
    except Exception as e:
        raise CheckpointError(f"restoring {item} failed: {type(e).__name__}: {e}") from e
    values = [_empty(stored_leaves[p], w, s) if e else _as_key(x, w)
              for x, w, p, s, e in zip(treedef.flatten_up_to(restored), wanted, paths, shard_list, empty,
                                       strict=True)]
    if plan is not None and has_layouts(plan):  # saved in the model's order
        lays = [d.layout for d in decisions] if shardings is None else tree_layouts(plan, structure)
        values = reorder(values, lays)
        mark_stored(values, lays)
    if like is None:
        return jax.tree_util.tree_unflatten(treedef, values)
    return rebox_all([b for _, b in boxes], values, treedef)


def _derived_shardings(like: Any, plan: Plan, mesh: Any, n: int) -> list[Any] | None:
    """One sharding per leaf of ``like`` when it is state derived from the planned parameters (a TrainState,
    ``{"params": ..., "opt_state": ...}``: every leaf outside the plan a planned path under another root, or a
    scalar), as :func:`tpflax.shard_train_state` / :func:`tpflax.state_shardings` lay it out; else None."""
    from tpflax._src.apply.bind import derived_leaves
    from tpflax._src.apply.state import state_shardings

    if not derived_leaves(plan, walk(like)[0]):
        return None
    sh = state_shardings(like, plan, mesh, optimizer=getattr(like, "tx", None), params=getattr(like, "params", None))
    flat = jax.tree_util.tree_leaves(sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return flat if len(flat) == n else None


def _check_shardings(shardings: Any) -> None:
    """OptionError for a ``shardings=`` leaf that is no ``jax.sharding.Sharding``: a ``PartitionSpec`` failed in
    orbax ("the context mesh cannot be empty"), a string was listed as a sharding for the path ''."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or is_box(x))[0]
    odd = [(keystr(p) or "the root", unbox(x)) for p, x in flat
           if not isinstance(unbox(x), jax.sharding.Sharding)]
    if odd:
        where, x = odd[0]
        spec = isinstance(x, jax.sharding.PartitionSpec)
        raise OptionError(
            f"shardings= holds {'a PartitionSpec' if spec else type(x).__name__} at {where}"
            f"{f' and {len(odd) - 1} more leaves' if len(odd) > 1 else ''}, not a jax Sharding; pass "
            f"NamedShardings{' (NamedSharding(mesh, spec))' if spec else ''}, e.g. tpflax.shardings(plan, mesh, like), "
            "one for every leaf, or one sharding for them all")


def _shardings_by_path(shardings: Any, stored_paths: list[str], item: Path) -> list[Any]:
    """``shardings``' leaves in the order of the stored tree's leaves, matched by path (restored without
    ``like=``: the stored tree is orbax's nested dicts, whose order need not be the caller's: layers keyed
    0..10 are stored as "0", "1", "10", "2", ...; a ``TrainState``'s fields in another order)."""
    # a sharding in a flax box (jax.tree.map(lambda x: x.sharding, placed) over nn.Partitioned leaves or an nnx
    # State) is named by the box's path, as the stored leaf is, not by the box's own field (".../value")
    flat, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or is_box(x))
    given = {keystr(p): unbox(s) for p, s in flat}  # keys as text, as orbax stores them (10 and "10" alike)
    missing = [p for p in stored_paths if p not in given]
    extra = sorted(set(given) - set(stored_paths))
    if missing or extra:
        raise PlanMismatchError(
            f"shardings does not lay out the tree stored in {item} leaf for leaf: pass like= (the tree the "
            "shardings are shaped like) to restore into it, or shardings with the stored paths",
            [f"no sharding for stored leaf {p}" for p in missing[:8]]
            + [f"sharding for {p}, which is not stored" for p in extra[:8]])
    return [given[p] for p in stored_paths]


def _restore_items(ocp: Any, found: Located, plan: Plan | None, mesh: Any, like: Any,
                   shardings: Any) -> dict[str, Any]:
    """Every item of a multi-item step as ``{item: tree}``; ``like``/``shardings`` keyed by item."""
    if plan is not None:
        raise OptionError(f"{found.path} holds several items {list(found.items)}; a plan lays out one "
                          "tree: pass item= to restore the one it was made for, or shardings= "
                          "{item: tpflax.state_shardings(...)} for all of them")
    for name, given in (("like", like), ("shardings", shardings)):
        if given is not None and (not isinstance(given, dict) or set(given) != set(found.items)):
            raise OptionError(f"{found.path} holds the items {list(found.items)}; pass {name}= as a "
                              "dict with exactly those keys, or item= to restore one")
    return {name: _restore_item(ocp, found.path / name, None, mesh,
                                None if like is None else like[name],
                                None if shardings is None else shardings[name])
            for name in found.items}


def restore_checkpoint(path: str | os.PathLike, plan: Plan | None = None, mesh: Any = None, *,
                       like: Any = None, shardings: Any = None, step: int | None = None,
                       item: str | None = None) -> Any:
    """Restore a checkpoint onto the plan's layout on ``mesh``, bit-exact.

    The mesh may differ from the one that saved it (``{data: 2, model: 4}`` ->
    ``{model: 8}`` -> one device): each device reads only its own slices, so
    an unsharded checkpoint is converted into the plan's layout without the
    whole tree on one device.

    Args:
        path: a checkpoint from :func:`save_checkpoint` (or any orbax
            StandardCheckpointer checkpoint), an orbax step directory, or an
            ``orbax.checkpoint.CheckpointManager`` root (its latest step).
        plan: the target layout; its tree must match the checkpoint's
            (paths, shapes, dtypes). None: everything on one device. With ``like=`` state derived
            from the planned parameters (a ``TrainState``, ``{"params": ..., "opt_state": ...}``),
            the parameters' plan lays it out as :func:`tpflax.shard_train_state` /
            :func:`tpflax.state_shardings` do.
        mesh: the target mesh (or a shape; defaults to the plan's). Only with a plan.
        like: a tree (concrete or abstract) giving the structure to restore
            into (e.g. ``model.abstract_variables()``, an ``nnx.State`` or a
            flax ``TrainState``); default: nested dicts as stored. An nnx
            Module or Optimizer (concrete, or from ``nnx.eval_shape``) gives a
            *new* object of its structure holding the restored state (the one
            passed is left as it was), as :func:`tpflax.shard` gives one.
        shardings: a ``Sharding`` tree shaped like ``like`` (or one ``Sharding`` for every leaf) to
            restore with instead of a plan (e.g. :func:`tpflax.train_state_shardings`, or
            :func:`tpflax.state_shardings` for ``{"params": ..., "opt_state": ...}``).
            With a plan made with ``fused="aligned"``, pass it as ``plan`` too: its
            head-aligned leaves, and the optimizer-state leaves tied to them, then come
            back in its stored order (without it, in the model's order).
        step: with a manager root: the step to restore (default: the latest).
        item: with a step of several items (``args.Composite``): the one to
            restore. Default: the only item; several are restored as
            ``{item: tree}`` (then ``like`` and ``shardings`` are dicts by item).

    Raises:
        CheckpointError: nothing restorable at ``path``, no such ``step`` or
            ``item``; only a save that is still in orbax's temporary directory
            is called unfinished.
        PlanMismatchError: the checkpoint's tree differs from the plan / ``like``.
        OptionError: ``mesh`` given without a plan or ``shardings``.

    A plan that stores fused kernels head-aligned (``plan(..., fused="aligned")``) gets those
    leaves in its stored order (checkpoints hold the model's order), as :func:`tpflax.shard`
    gives them.

    Typed PRNG keys (an nnx Dropout's ``rngs/key``), which orbax stores as
    their uint32 key data, match the plan's and ``like``'s keys and come back
    as keys; without either, as the keys tpflax recorded saving them (see
    :func:`checkpoint_tree`).

    >>> import jax.numpy as jnp, tempfile, os, tpflax
    >>> d = os.path.join(tempfile.mkdtemp(), "ck")
    >>> _ = save_checkpoint(d, {"w": jnp.arange(8.0)})
    >>> p = tpflax.plan({"w": jnp.arange(8.0)}, {"model": 2}, rules=[("w", "row")])
    >>> restore_checkpoint(d, p, tpflax.make_mesh({"model": 2}))["w"].sharding.spec
    P('model',)
    """
    if not isinstance(path, (str, os.PathLike)):  # an int was pathlib's bare TypeError
        raise OptionError(f"path is {type(path).__name__}, not a checkpoint directory: the order is "
                          "restore_checkpoint(path, plan, mesh)")
    _check_shardings(shardings)
    if mesh is not None and plan is None and shardings is None:  # the mesh was dropped: all on one device
        raise OptionError("restore_checkpoint(path, mesh=...) without a plan has no layout for the mesh (everything "
                          "was restored onto one device); pass the plan, restore_checkpoint(path, plan, mesh), or "
                          "shardings=, e.g. tpflax.shardings(plan, mesh, like)")
    ocp = _ocp()
    found = locate(Path(path).absolute(), step=step, item=item)
    if found.items:
        return _restore_items(ocp, found, plan, mesh, like, shardings)
    return _restore_item(ocp, found.path, plan, mesh, like, shardings)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, plan: Plan, mesh: Any = None,
                       *, overwrite: bool = False) -> Path:
    """Rewrite a checkpoint (e.g. an unsharded one) in the plan's layout on ``mesh``.

    Restores straight onto the mesh (each device reads its slices) and saves
    from there, so the whole tree never sits on one device. The head-aligned kernels of a
    ``plan(..., fused="aligned")`` are restored into its stored order and written back in the
    model's order: the converted checkpoint restores onto any plan.
    """
    bar = Progress(f"converting checkpoint {src} -> {dst}")  # shown on a terminal only
    tree = restore_checkpoint(src, plan, mesh)
    bar.step("saving")
    out = save_checkpoint(dst, tree, plan=plan, overwrite=overwrite)
    bar.done("converted")
    return out


__all__ = ["checkpoint_tree", "convert_checkpoint", "restore_checkpoint", "save_checkpoint"]
