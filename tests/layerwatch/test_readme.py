"""The README's "Monitor your own model" block runs as written against the real broker."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from schemas.codec import decode_batch
from tests.workers.inference.conftest import consume_all

ROOT = Path(__file__).resolve().parents[2]


def readme_block(heading: str) -> str:
    """The first ```python block under the README heading ``heading`` (## level)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under '## {heading}'"
    return match.group(1)


def test_monitor_section_follows_quick_start() -> None:
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert headings.index("Monitor your own model") == headings.index(
        next(h for h in headings if h.startswith("Quick start"))) + 1


@pytest.mark.integration
def test_readme_monitor_block_runs(broker: str, tmp_path: Path) -> None:
    prefix = f"readme{uuid.uuid4().hex[:6]}."
    script = tmp_path / "readme_block.py"
    script.write_text(readme_block("Monitor your own model"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LW_KAFKA_BOOTSTRAP": broker, "LW_TOPIC_PREFIX": prefix}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'sent': 8" in done.stdout and "'dropped': 0" in done.stdout, done.stdout
    records = consume_all(broker, prefix + "predictions", lambda rs: sum(decode_batch(r.value).n for r in rs) >= 1008)
    batches = [decode_batch(r.value) for r in records]
    assert {b.model_id for b in batches} == {"my-model"}
    assert sum(b.n for b in batches if b.role == "reference") == 1000
    assert sum(b.n for b in batches if b.role == "live") == 8
    assert all(c == "alice" for b in batches if b.role == "live" for c in b.client_ids)
