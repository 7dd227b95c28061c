"""Find the tree to restore in any orbax layout: a checkpoint, a step directory, a manager root.

orbax writes three kinds of directory, and a user may point at any of them:

- an *item*: one saved tree (``_METADATA`` plus the array store), what
  ``StandardCheckpointer`` and :func:`tpflax.save_checkpoint` write;
- a *step directory*: what ``CheckpointManager.save(step, ...)`` writes, holding
  one item per name (``default`` for a single ``StandardSave``, or the names of
  ``args.Composite(params=..., opt_state=...)``) and ``_CHECKPOINT_METADATA``;
- a *manager root*: step directories named by their step (``7``, ``checkpoint_7``,
  ``00000007``), plus orbax's temporary directories of saves in flight.

A save in flight lives under a temporary name and is renamed when it finishes,
so a directory under its final name was written by a finished save. Only a
temporary name is evidence of an unfinished one, and only then is that said.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tpflax._src.errors import CheckpointError

MARKER = "tpflax.json"
TREE_METADATA = "_METADATA"  # written by orbax's PyTree/Standard handlers into every item
STEP_METADATA = "_CHECKPOINT_METADATA"
ORBAX_TMP = ".orbax-checkpoint-tmp"
TPFLAX_TMP = ".tpflax-tmp"
TPFLAX_OLD = ".tpflax-old"
_STEP_NAME = re.compile(r"^(?:.*_)?(\d+)$")  # 7, checkpoint_7, 00000007


@dataclass(frozen=True)
class Located:
    """What a path holds: one item directory, or several items of one step restored as a dict.

    Attributes:
        path: the item directory, or the step directory when ``items`` is set.
        items: item names to restore as ``{name: tree}``; empty for one tree.
        step: the manager step it came from (None for a bare checkpoint).
    """

    path: Path
    items: tuple[str, ...] = ()
    step: int | None = None


def sibling(path: Path, tag: str) -> Path:
    """The hidden directory beside ``path`` that tpflax's atomic save uses (``.name<tag>``)."""
    return path.parent / f".{path.name}{tag}"


def is_item(path: Path) -> bool:
    """A directory holding one saved tree."""
    return (path / TREE_METADATA).is_file() or (path / MARKER).is_file()


def item_names(step_dir: Path) -> list[str]:
    """The items of an orbax step directory (its subdirectories that hold a tree), sorted."""
    return sorted(c.name for c in step_dir.iterdir() if c.is_dir() and is_item(c))


def manager_steps(root: Path) -> dict[int, Path]:
    """The finished step directories of a CheckpointManager root, by step.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("3", "checkpoint_10", "4.orbax-checkpoint-tmp-17", "notes"):
    ...     (root / name / "default").mkdir(parents=True)
    ...     (root / name / "default" / "_METADATA").touch()
    >>> sorted(manager_steps(root))
    [3, 10]
    """
    found = {}
    for c in root.iterdir():
        m = _STEP_NAME.match(c.name)
        if m and c.is_dir() and ((c / STEP_METADATA).is_file() or item_names(c)):
            found[int(m.group(1))] = c
    return found


def _unfinished(root: Path) -> list[str]:
    return sorted(c.name for c in root.iterdir() if ORBAX_TMP in c.name)


def _pick_item(step_dir: Path, item: str | None, step: int | None) -> Located:
    names = item_names(step_dir)
    if item is not None:
        if item not in names:
            raise CheckpointError(f"{step_dir} has no item {item!r}; its items are {names}; pass one "
                                  "of them as item=")
        return Located(step_dir / item, (), step)
    if len(names) == 1:
        return Located(step_dir / names[0], (), step)
    return Located(step_dir, tuple(names), step)


def _missing(final: Path) -> CheckpointError:
    old = sibling(final, TPFLAX_OLD)
    if old.is_dir() and is_item(old):
        return CheckpointError(
            f"{final} is missing: a save over it was interrupted after the new checkpoint was "
            f"written; the previous complete checkpoint is at {old}; rename it back or save again")
    if sibling(final, TPFLAX_TMP).is_dir():
        return CheckpointError(f"no checkpoint at {final}: the only save to it did not finish (its "
                               f"partial output is {sibling(final, TPFLAX_TMP)}); save again")
    return CheckpointError(f"no checkpoint at {final}; check the path")


def _not_a_checkpoint(final: Path) -> CheckpointError:
    unfinished = _unfinished(final)
    if unfinished:
        return CheckpointError(
            f"{final} is a CheckpointManager directory whose only saves did not finish "
            f"({', '.join(unfinished)} are orbax's temporary directories of saves in flight or "
            "killed); wait for the save (manager.wait_until_finished()) or save again")
    held = sorted(c.name for c in final.iterdir())
    listing = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") if held else "nothing"
    return CheckpointError(
        f"{final} holds no checkpoint: no {TREE_METADATA} (a saved tree), no item directories (an "
        f"orbax step directory) and no step directories (a CheckpointManager root); it holds "
        f"{listing}; point at the directory save_checkpoint or CheckpointManager wrote")


def locate(path: Path, *, step: int | None = None, item: str | None = None) -> Located:
    """Resolve ``path`` (an item, a step directory or a manager root) to what to restore.

    Args:
        path: an absolute path.
        step: the manager step to read (default: the latest); only for a manager root.
        item: the item of a step to read (default: the only one, or all as a dict).

    Raises:
        CheckpointError: nothing restorable at ``path``, or ``step``/``item`` not there.
    """
    if not path.exists():
        raise _missing(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory")
    if is_item(path):
        if step is not None or item is not None:
            raise CheckpointError(f"{path} is one saved tree, not a CheckpointManager directory; "
                                  "drop step= and item=")
        return Located(path)
    if item_names(path):
        if step is not None:
            raise CheckpointError(f"{path} is one step's directory; drop step=, or pass its parent "
                                  "(the manager root) with step=")
        return _pick_item(path, item, None)
    steps = manager_steps(path)
    if not steps:
        raise _not_a_checkpoint(path)
    chosen = max(steps) if step is None else int(step)
    if chosen not in steps:
        raise CheckpointError(f"no step {chosen} in {path}; its finished steps are "
                              f"{sorted(steps)} (an older step may have been deleted by keep=/max_to_keep)")
    return _pick_item(steps[chosen], item, chosen)


__all__ = ["Located", "MARKER", "TPFLAX_OLD", "TPFLAX_TMP", "is_item", "item_names", "locate",
           "manager_steps", "sibling"]
