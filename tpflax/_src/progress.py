"""Progress for long operations: on a terminal only.

Dry-run compiles, ``suggest --verify`` and checkpoint conversion take seconds
to minutes. They say what they are doing on stderr when stderr is a terminal,
with a ``rich`` spinner when rich is installed and plain lines otherwise, and
say nothing when stderr is piped or the command prints ``--json``
(:func:`set_quiet`), so scripts and CI logs stay clean.
"""

from __future__ import annotations

import sys
import time

_quiet = False  # set once by the command line for --json


def set_quiet(quiet: bool) -> None:
    """Silence every progress display of this process (``--json`` output)."""
    global _quiet
    _quiet = bool(quiet)


def showing(enabled: bool = True) -> bool:
    """Whether progress is shown: asked for, not silenced, and stderr is a terminal.

    >>> showing(False)
    False
    """
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(enabled and not _quiet and isatty is not None and isatty())


class Progress:
    """One long operation's progress on stderr: ``step`` says what it does now, ``done`` how it ended.

    >>> bar = Progress("dry run", enabled=False)
    >>> bar.step("compiling"); bar.done("compiled")
    """

    def __init__(self, what: str, enabled: bool = True):
        self.what, self.on, self.t0, self._status = what, showing(enabled), time.perf_counter(), None
        if not self.on:
            return
        try:
            from rich.console import Console

            self._status = Console(stderr=True).status(f"{what} ...")
            self._status.start()
        except ImportError:
            print(f"tpflax: {what} ...", file=sys.stderr, flush=True)

    def step(self, text: str) -> None:
        if not self.on:
            return
        if self._status is not None:
            self._status.update(f"{self.what}: {text}")
        else:
            print(f"tpflax: {self.what}: {text} ...", file=sys.stderr, flush=True)

    def done(self, text: str) -> None:
        if not self.on:
            return
        if self._status is not None:
            self._status.stop()
        print(f"tpflax: {self.what}: {text} ({time.perf_counter() - self.t0:.1f}s)", file=sys.stderr, flush=True)
