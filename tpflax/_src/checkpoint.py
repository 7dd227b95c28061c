"""Checkpoints with orbax: save sharded trees, restore them onto any mesh.

``save_checkpoint`` writes a (sharded) tree with orbax-checkpoint, atomically:
the tree goes to a hidden sibling directory, a ``tpflax.json`` marker is
written last, and only then is the directory renamed into place. A save that
dies part-way leaves the previous checkpoint (or nothing) at ``path``, never a
checkpoint that restores wrong.

``restore_checkpoint`` reads it straight into a plan's layout on a mesh of any
shape (or onto one device): each device reads only its own slices, so an
unsharded checkpoint is converted without the whole tree ever sitting on one
device. orbax is imported only when a function here runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
from jax.sharding import NamedSharding, SingleDeviceSharding

from tpflax._src.apply.bind import bind_mesh, rebox_all
from tpflax._src.errors import CheckpointError, PlanMismatchError
from tpflax._src.facts.tree import Leaf, is_box, keystr, unbox, unboxed, walk
from tpflax._src.planner.plan import Plan, check_tree_matches
from tpflax._src.progress import Progress

MARKER = "tpflax.json"
FORMAT = "tpflax.checkpoint"
VERSION = 1
_TMP = ".tpflax-tmp"
_OLD = ".tpflax-old"


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - orbax is in the test and checkpoint extras
        raise CheckpointError("checkpoints need orbax-checkpoint; pip install 'tpflax[checkpoint]'") from e
    return ocp


def _siblings(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}{tag}"


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


def save_checkpoint(path: str | os.PathLike, tree: Any, *, plan: Plan | None = None,
                    overwrite: bool = False) -> Path:
    """Save a tree (sharded or not) with orbax, atomically.

    Every process of a multi-host run must call it with the same ``path`` on a
    shared filesystem; each writes the shards it holds.

    Args:
        path: the checkpoint directory to create.
        tree: arrays (flax boxes and nnx Variables are unwrapped to their values).
        plan: stored alongside (``tpflax.json``) for reference.
        overwrite: replace an existing checkpoint at ``path`` (the old one stays
            in place until the new one is complete).

    Returns:
        The absolute checkpoint path.

    Raises:
        CheckpointError: ``path`` exists and ``overwrite`` is False, or the save failed.

    >>> import jax.numpy as jnp, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(os.path.join(d, "ck"), {"w": jnp.ones(3)}).name
    'ck'
    """
    ocp = _ocp()
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; pass overwrite=True or choose a new path")
    leaves, _ = walk(tree)
    tmp, old = _siblings(final, _TMP), _siblings(final, _OLD)
    primary = jax.process_index() == 0
    if primary:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
    _sync("tpflax-ckpt-clean")
    values = unboxed(tree)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp, values)
            ckptr.wait_until_finished()
    except Exception as e:
        raise CheckpointError(f"saving {final} failed: {type(e).__name__}: {e}") from e
    _sync("tpflax-ckpt-saved")
    if primary:
        marker = {"format": FORMAT, "version": VERSION,
                  "leaves": [{"path": x.path, "shape": list(x.shape), "dtype": x.dtype} for x in leaves],
                  "plan": json.loads(plan.to_json()) if plan is not None else None}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
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


def _check_complete(final: Path) -> None:
    if final.is_dir() and ((final / MARKER).exists() or (final / "commit_success.txt").exists()
                           or (final / "_CHECKPOINT_METADATA").exists()):
        return
    old = _siblings(final, _OLD)
    if not final.exists() and old.is_dir() and (old / MARKER).exists():
        raise CheckpointError(
            f"{final} is missing: a save over it was interrupted after the new checkpoint was "
            f"written; the previous complete checkpoint is at {old}; rename it back or save again")
    if not final.exists():
        raise CheckpointError(f"no checkpoint at {final}; check the path")
    raise CheckpointError(f"{final} is not a complete checkpoint (no {MARKER} or orbax commit "
                          "marker); it was not written by a finished save")


def checkpoint_tree(path: str | os.PathLike) -> Any:
    """What a checkpoint holds: a tree of ``jax.ShapeDtypeStruct`` (nothing is read).

    Raises:
        CheckpointError: no complete checkpoint at ``path``.
    """
    ocp = _ocp()
    final = Path(path).absolute()
    _check_complete(final)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(final)
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {final}: {type(e).__name__}: {e}") from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                                  is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _stored_leaves(stored: Any) -> dict[str, jax.ShapeDtypeStruct]:
    flat, _ = jax.tree_util.tree_flatten_with_path(stored)
    return {keystr(p): x for p, x in flat}


def _target_problems(paths: list[str], boxes: list[Any],
                     stored_leaves: dict[str, jax.ShapeDtypeStruct]) -> list[str]:
    """The target tree must be exactly the stored tree: every difference, named at once."""
    problems = []
    for p, b in zip(paths, boxes, strict=True):
        s = stored_leaves.get(p)
        v = unbox(b)
        if s is None:
            problems.append(f"{p}: expected by the target tree but not in the checkpoint")
        elif tuple(s.shape) != tuple(getattr(v, "shape", s.shape)) or (
                hasattr(v, "dtype") and jax.numpy.dtype(v.dtype) != jax.numpy.dtype(s.dtype)):
            problems.append(f"{p}: the checkpoint holds {tuple(s.shape)} {s.dtype} but the target "
                            f"tree has {tuple(v.shape)} {v.dtype}")
    known = set(paths)
    problems += [f"{p}: in the checkpoint but not in the target tree; pass like= with the full tree"
                 for p in stored_leaves if p not in known]
    return problems


def restore_checkpoint(path: str | os.PathLike, plan: Plan | None = None, mesh: Any = None, *,
                       like: Any = None, shardings: Any = None) -> Any:
    """Restore a checkpoint onto the plan's layout on ``mesh``, bit-exact.

    The mesh may differ from the one that saved it (``{data: 2, model: 4}`` ->
    ``{model: 8}`` -> one device): each device reads only its own slices, so
    an unsharded checkpoint is converted into the plan's layout without the
    whole tree on one device.

    Args:
        path: a checkpoint from :func:`save_checkpoint` (or any orbax
            StandardCheckpointer checkpoint).
        plan: the target layout; its tree must match the checkpoint's
            (paths, shapes, dtypes). None: everything on one device.
        mesh: the target mesh (or a shape; defaults to the plan's).
        like: a tree (concrete or abstract) giving the structure to restore
            into (e.g. ``model.abstract_variables()`` or an ``nnx.State``);
            default: nested dicts as stored.
        shardings: a ``Sharding`` tree shaped like ``like`` to restore with
            instead of a plan (e.g. :func:`tpflax.train_state_shardings`).

    Raises:
        CheckpointError: no complete checkpoint at ``path``.
        PlanMismatchError: the checkpoint's tree differs from the plan / ``like``.

    >>> import jax.numpy as jnp, tempfile, os, tpflax
    >>> d = os.path.join(tempfile.mkdtemp(), "ck")
    >>> _ = save_checkpoint(d, {"w": jnp.arange(8.0)})
    >>> p = tpflax.plan({"w": jnp.arange(8.0)}, {"model": 2}, rules=[("w", "row")])
    >>> restore_checkpoint(d, p, tpflax.make_mesh({"model": 2}))["w"].sharding.spec
    P('model',)
    """
    ocp = _ocp()
    final = Path(path).absolute()
    stored = checkpoint_tree(final)
    stored_leaves = _stored_leaves(stored)
    structure = stored if like is None else like
    boxes, treedef = jax.tree_util.tree_flatten_with_path(structure, is_leaf=is_box)
    paths = [keystr(p) for p, _ in boxes]
    problems = _target_problems(paths, [b for _, b in boxes], stored_leaves)
    if problems:
        raise PlanMismatchError(f"the checkpoint {final} does not match the tree to restore", problems)
    if shardings is not None:
        shard_list = jax.tree_util.tree_leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shard_list) != len(paths):
            raise PlanMismatchError(f"shardings has {len(shard_list)} leaves but the tree has "
                                    f"{len(paths)}; lay it out like `like`")
    elif plan is not None:
        mesh = bind_mesh(plan, mesh)
        leaves = [Leaf(path=p, shape=tuple(stored_leaves[p].shape), dtype=str(stored_leaves[p].dtype),
                       itemsize=jax.numpy.dtype(stored_leaves[p].dtype).itemsize) for p in paths]
        check_tree_matches(plan, leaves)
        shard_list = [NamedSharding(mesh, plan.decisions[p].spec) for p in paths]
    else:
        device = jax.local_devices()[0]
        shard_list = [SingleDeviceSharding(device)] * len(paths)
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(tuple(stored_leaves[p].shape), stored_leaves[p].dtype, sharding=s)
        for p, s in zip(paths, shard_list, strict=True)])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(final, target)
    except Exception as e:
        raise CheckpointError(f"restoring {final} failed: {type(e).__name__}: {e}") from e
    if like is None:
        return restored
    return rebox_all([b for _, b in boxes], treedef.flatten_up_to(restored), treedef)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, plan: Plan, mesh: Any = None,
                       *, overwrite: bool = False) -> Path:
    """Rewrite a checkpoint (e.g. an unsharded one) in the plan's layout on ``mesh``.

    Restores straight onto the mesh (each device reads its slices) and saves
    from there, so the whole tree never sits on one device.
    """
    bar = Progress(f"converting checkpoint {src} -> {dst}")  # shown on a terminal only
    tree = restore_checkpoint(src, plan, mesh)
    bar.step("saving")
    out = save_checkpoint(dst, tree, plan=plan, overwrite=overwrite)
    bar.done("converted")
    return out


__all__ = ["checkpoint_tree", "convert_checkpoint", "restore_checkpoint", "save_checkpoint"]
