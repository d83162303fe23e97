"""The ingest agent's stage pipeline (streams/app.py) with stand-in events and stages, no broker."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from streams.app import Runtime, StagePipeline


class _Message:
    """Faust's reference counting: a record is acked (committable) when the count drops to zero."""

    def __init__(self) -> None:
        self.refcount, self.acked = 1, False

    def incref(self) -> None:
        self.refcount += 1


class _Event:
    def __init__(self) -> None:
        self.message = _Message()

    def ack(self) -> None:
        self.message.refcount -= 1
        self.message.acked = self.message.refcount == 0


class _Stage:
    """Records the steps it saw; a step can be held open, or made to fail."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    async def handle(self, items) -> None:
        step = items[0]
        if step in self.hold:
            await self.hold[step].wait()
        if step in self.fail:
            raise RuntimeError(f"boom in {step}")
        self.seen.append(step)


def _runtime(stage: _Stage) -> Runtime:
    writer = SimpleNamespace(healthy=True, degraded_reason="")
    return Runtime(settings=None, store=None, writer=writer, metrics=None, limits=None, agents=frozenset({"sink"}),
                   stages=[stage])


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
        # meanwhile the agent decodes and writes step 2; submitting it waits for step 1's stages
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
    assert runtime.health()["status"] == "ok"


def test_a_failed_stage_degrades_health_until_a_later_step_succeeds() -> None:
    stage = _Stage()
    runtime = _runtime(stage)
    stage.fail.add("bad")

    async def run() -> None:
        pipeline = StagePipeline(runtime)
        failed = [_Event()]
        await pipeline.submit(failed, ["bad"])
        failed[0].ack()
        with pytest.raises(RuntimeError, match="boom in bad"):
            await pipeline.submit([_Event()], ["next"])  # the agent crashes here and Faust restarts it
        assert failed[0].message.acked  # as before the pipeline: the crashed step's records are released
        health = runtime.health()
        assert health["status"] == "degraded" and "boom in bad" in health["reason"]
        await pipeline.submit([_Event()], ["good"])
        await pipeline.wait()

    asyncio.run(run())
    assert runtime.health() == {"status": "ok", "reason": "", "agents": ["sink"]}
