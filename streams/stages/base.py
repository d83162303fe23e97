"""The protocol every detection stage implements (see streams/stages/__init__.py and docs/architecture.md)."""

from __future__ import annotations

from typing import Protocol, Sequence

from streams.rows import Delivered


class Stage(Protocol):
    """A consumer of the decoded prediction batches of each ingest step (see streams/stages/).

    ``handle`` gets one step's batches, in order, after the sink wrote them; the step's
    records are acked only when every stage's ``handle`` returned, so a stage that raises
    gets the step replayed. Heavy work belongs in the stage's own thread, not on the loop.
    ``health`` is "" when the stage is fine, else a one-line reason (shown by ``/health``).
    """

    name: str

    async def start(self) -> None: ...

    async def handle(self, items: Sequence[Delivered]) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> str: ...
