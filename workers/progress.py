"""One progress-bar factory for long work in workers/: a rich Progress, or a silent stand-in."""

from __future__ import annotations

from typing import Any


class NoProgress:
    """The slice of rich's Progress interface the workers use, doing nothing."""

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *_a: object, **_k: object) -> int:
        return 0

    def update(self, *_a: object, **_k: object) -> None:
        return None

    def advance(self, *_a: object, **_k: object) -> None:
        return None


def progress_bar(enabled: bool) -> Any:
    """A rich Progress bar (description, bar, n/m, elapsed) when enabled, else a no-op."""
    if not enabled:
        return NoProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
