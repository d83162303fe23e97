"""The worker process's own set-up (pure, in a child interpreter: thread pools are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_limit_threads_caps_torch_and_every_blas_pool() -> None:
    code = (
        "import json, numpy, torch, threadpoolctl\n"
        "from streams.process import limit_threads\n"
        "before = [p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas']\n"
        "limit_threads(1)\n"
        "after = [p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas']\n"
        "print(json.dumps({'before': before, 'after': after, 'torch': torch.get_num_threads()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] and max(seen["before"]) == 2  # numpy's BLAS was found and had 2 threads
    assert seen["after"] == [1] * len(seen["before"]) and seen["torch"] == 1
