"""The ingest step's stage pipeline (streams/pipeline.py) with stand-in events and stages, no broker."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from streams.metrics import Metrics
from streams.pipeline import StagePipeline
from streams.runtime import Health


class _Message:
    """Faust's reference counting: a record is acked (committable) when the count drops to zero."""

    def __init__(self, offset: int = 0) -> None:
        self.refcount, self.acked = 1, False
        self.value, self.topic, self.partition, self.offset = b"raw", "lw.predictions", 0, offset

    def incref(self) -> None:
        self.refcount += 1


class _Event:
    def __init__(self, offset: int = 0) -> None:
        self.message = _Message(offset)

    def ack(self) -> None:
        self.message.refcount -= 1
        self.message.acked = self.message.refcount == 0


class _Stage:
    """Records the steps it saw; a step can be held open, or made to fail a number of times."""

    def __init__(self, name: str = "stage") -> None:
        self.name = name
        self.seen: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.fail: dict[str, int] = {}  # step -> failures left

    async def handle(self, items) -> None:
        step = items[0]
        if step in self.hold:
            await self.hold[step].wait()
        if self.fail.get(step, 0) > 0:
            self.fail[step] -= 1
            raise RuntimeError(f"boom in {step}")
        self.seen.append(step)


def _runtime(*stages: _Stage, dead_letter_fails: bool = False) -> SimpleNamespace:
    letters: list[dict] = []

    async def dead_letter(record: dict) -> None:
        if dead_letter_fails:
            raise ConnectionError("dlq unreachable")
        letters.append(record)

    return SimpleNamespace(stages=list(stages), health_board=Health(), metrics=Metrics(), dead_letter=dead_letter,
                           letters=letters)


def test_stages_of_a_step_overlap_the_next_step_and_records_are_acked_after_them() -> None:
    stage = _Stage()
    runtime = _runtime(stage)

    async def run() -> None:
        pipeline = StagePipeline(runtime)
        stage.hold["s1"] = asyncio.Event()
        first = [_Event(), _Event()]
        await pipeline.submit(first, ["s1"])
        for e in first:  # what Faust's take_events does when the loop body returns
            e.ack()
        await asyncio.sleep(0)  # let the stage task start
        assert not any(e.message.acked for e in first)  # step 1's stages still run: not committable
        second = [_Event()]
        submitted = asyncio.ensure_future(pipeline.submit(second, ["s2"]))
        await asyncio.sleep(0)
        assert not submitted.done()
        stage.hold["s1"].set()
        await submitted
        assert all(e.message.acked for e in first)
        second[0].ack()
        await pipeline.wait()
        assert second[0].message.acked
        assert stage.seen == ["s1", "s2"]

    asyncio.run(run())
    assert runtime.health_board.reasons() == []


def test_a_failing_stage_is_retried_on_the_same_step_and_the_others_are_not_rerun() -> None:
    flaky, steady = _Stage("flaky"), _Stage("steady")
    flaky.fail["s1"] = 2
    runtime = _runtime(flaky, steady)

    async def run() -> None:
        pipeline = StagePipeline(runtime, attempts=3, backoff_s=0.0)
        events = [_Event()]
        await pipeline.submit(events, ["s1"])
        events[0].ack()
        await pipeline.wait()
        assert events[0].message.acked
        assert runtime.letters == []

    asyncio.run(run())
    assert flaky.seen == ["s1"] and steady.seen == ["s1"]  # each stage took the step once
    assert runtime.metrics.stage_retries.labels("flaky")._value.get() == 2
    assert runtime.health_board.reasons() == []


def test_a_step_that_keeps_failing_is_dead_lettered_before_its_records_are_acked() -> None:
    broken = _Stage("broken")
    broken.fail["bad"] = 99
    runtime = _runtime(broken)

    async def run() -> None:
        pipeline = StagePipeline(runtime, attempts=2, backoff_s=0.0)
        events = [_Event(7), _Event(8)]
        await pipeline.submit(events, ["bad"])
        for e in events:
            e.ack()
        await pipeline.wait()
        assert all(e.message.acked for e in events)
        health = runtime.health_board.reasons()
        assert health and "boom in bad" in health[0]
        await pipeline.submit([_Event(9)], ["good"])
        await pipeline.wait()

    asyncio.run(run())
    assert [(r["offset"], r["topic"]) for r in runtime.letters] == [(7, "lw.predictions"), (8, "lw.predictions")]
    assert all("stage broken failed 2 times" in r["reason"] and "boom in bad" in r["reason"] for r in runtime.letters)
    assert runtime.health_board.reasons() == []  # a later step succeeded


def test_records_stay_unacked_when_their_failed_step_cannot_be_dead_lettered() -> None:
    broken = _Stage("broken")
    broken.fail["bad"] = 99
    runtime = _runtime(broken, dead_letter_fails=True)

    async def run() -> None:
        pipeline = StagePipeline(runtime, attempts=1, backoff_s=0.0)
        events = [_Event()]
        await pipeline.submit(events, ["bad"])
        events[0].ack()
        with pytest.raises(ConnectionError):
            await pipeline.wait()  # the agent crashes here; the records were never acked, so they are replayed
        assert not events[0].message.acked

    asyncio.run(run())
