"""What the benchmark scripts share: a child run in a fresh process, and its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn(script: str, argv: list[str]) -> dict:
    """Run ``script argv`` in a fresh Python process (the project on its path) and return the
    JSON object its last line of output prints."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=path), check=False)
    if res.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def rss() -> int:
    """This process's resident memory now (bytes)."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's peak resident memory so far (bytes; Linux's ``ru_maxrss`` is in kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
