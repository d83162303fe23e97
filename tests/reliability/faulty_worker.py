"""`python -m tests.reliability.faulty_worker worker`: layerwatch's worker plus a stage that fails on cue.

The stage ("flaky", added to ``streams.stages.STAGES`` and ``streams.runtime.AGENTS`` the
way docs/architecture.md adds a stage) fails deterministically, by model id:

- a step holding model ``flaky`` fails twice, then succeeds (the pipeline's retries);
- a step holding model ``doomed`` always fails (the step is dead-lettered);
- every step it finishes is appended, as a JSON list of event ids, to ``LW_TEST_STAGE_LOG``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence


class FlakyStage:
    name = "flaky"

    def __init__(self, runtime: Any):
        self.log_path = os.environ["LW_TEST_STAGE_LOG"]
        self.failures: dict[str, int] = {}

    async def start(self) -> None:
        pass

    async def handle(self, items: Sequence[Any]) -> None:
        models = {d.batch.model_id for d in items}
        ids = [e for d in items for e in d.batch.event_ids]
        if "doomed" in models:
            raise RuntimeError("injected failure (doomed)")
        if "flaky" in models:
            step = ids[0]
            self.failures[step] = self.failures.get(step, 0) + 1
            if self.failures[step] <= 2:
                raise RuntimeError(f"injected failure {self.failures[step]} (flaky)")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(ids) + "\n")

    async def stop(self) -> None:
        pass

    def health(self) -> str:
        return ""


def main() -> int:
    import streams.runtime
    import streams.stages

    streams.runtime.AGENTS = (*streams.runtime.AGENTS, "flaky")
    streams.stages.STAGES["flaky"] = FlakyStage
    from streams.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
