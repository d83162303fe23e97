"""Runs the stages of one ingest step while the ingest agent takes, decodes and writes the next.

The stages of a step start after the sink wrote it and after the previous step's stages
finished, so every stage sees the batches in order; meanwhile the event loop is free to
decode and write the next step (the stages' heavy work runs in threads).

Nothing is acked that was not done: each record's Faust reference is held until its
step's stages finished. A stage that raises is run again on the same step (only that
stage: the others already have it) after a backoff, up to ``attempts`` times, while
``/health`` reads degraded; a step that still fails goes to the dead-letter topic, record
by record, with the stage's error as the reason, and only then are its records acked.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable, Sequence

from streams.ingest import dead_letter
from streams.rows import Delivered

if TYPE_CHECKING:
    from streams.stages.base import Stage

log = logging.getLogger(__name__)


class StagePipeline:
    """One step in flight at a time; see the module doc."""

    def __init__(self, runtime: Any, attempts: int = 3, backoff_s: float = 0.5):
        self.runtime, self.attempts, self.backoff_s = runtime, attempts, backoff_s
        self._task: asyncio.Future | None = None

    async def submit(self, events: Sequence[Any], good: Sequence[Delivered]) -> None:
        """Start the stages of one step (whose sink writes are done); waits for the previous step."""
        await self.wait()
        if not self.runtime.stages or not good:
            return
        for event in events:
            event.message.incref()  # released in _run: Faust acks the record when both let go
        self._task = asyncio.ensure_future(self._run(events, good))

    async def wait(self) -> None:
        """Wait for the step in flight."""
        task, self._task = self._task, None
        if task is not None:
            await task

    async def _run(self, events: Sequence[Any], good: Sequence[Delivered]) -> None:
        failure = await run_stages(self.runtime.stages, good, self.attempts, self.backoff_s, self._failed)
        if not failure:
            self.runtime.health_board.clear("stages")
        for event in events if failure else ():
            m = event.message
            await self.runtime.dead_letter(dead_letter(m.value, failure, m.topic, m.partition, m.offset))
        for event in events:  # not in a `finally`: a step that raised here stays un-acked and is replayed
            event.ack()

    def _failed(self, stage: "Stage", exc: BaseException, attempt: int) -> None:
        log.error("stage %s failed on a step (attempt %d of %d)", stage.name, attempt, self.attempts, exc_info=exc)
        self.runtime.metrics.stage_retries.labels(stage.name).inc()
        self.runtime.health_board.fail("stages", f"stage {stage.name} failed: {exc!r}")


async def run_stages(stages: Sequence["Stage"], good: Sequence[Delivered], attempts: int, backoff_s: float,
                     on_failure: Callable[["Stage", BaseException, int], None]) -> str:
    """Hand one step to every stage at once, retrying the ones that raise; "" when all succeeded, else the reason.

    The classifier and probing work in their threads while the windows run on the loop.
    """
    pending, reason = list(stages), ""
    for attempt in range(1, attempts + 1):
        results = await asyncio.gather(*(stage.handle(good) for stage in pending), return_exceptions=True)
        failed = [(stage, r) for stage, r in zip(pending, results) if isinstance(r, BaseException)]
        for stage, exc in failed:
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            on_failure(stage, exc, attempt)
        if not failed:
            return ""
        pending = [stage for stage, _ in failed]
        reason = "; ".join(f"stage {stage.name} failed {attempts} times: {exc!r}" for stage, exc in failed)[:2000]
        if attempt < attempts:
            await asyncio.sleep(backoff_s * 2 ** (attempt - 1))  # retry backoff
    return reason


