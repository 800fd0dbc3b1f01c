"""Profile xiaoyi's gunicorn workers with py-spy while a section runs (`--profile`)."""

from __future__ import annotations

import subprocess
from collections import Counter
from typing import Any

from bench.procs import OUT
from bench.stack import Stack
from bench.tools import py_spy


def profile_workers(stack: Stack, section: str, seconds: float) -> list[subprocess.Popen]:
    """Start py-spy on each worker for `seconds` (raw collapsed stacks in bench/out)."""
    for old in OUT.glob(f"profile-{section}-*.txt"):
        old.unlink()
    spy = py_spy()
    if spy is None:
        return []
    return [subprocess.Popen([spy, "record", "-r", "200", "-d", str(max(1, int(seconds))),
                              "-f", "raw", "--nonblocking", "-o",
                              str(OUT / f"profile-{section}-{pid}.txt"), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in stack.workers()]


def _frame(text: str) -> str:
    """Return 'function (file.py)' for one py-spy frame 'function (path/file.py:line)'."""
    name, _, where = text.partition(" (")
    return f"{name} ({where.rpartition('/')[2].split(':')[0]})" if where else name


def summarise_profile(section: str, top: int = 25) -> dict[str, Any]:
    """Return the share of samples each function is on the stack (inclusive) and on top (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in sorted(OUT.glob(f"profile-{section}-*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            frames = [_frame(f) for f in stack.split(";") if f]
            for name in set(frames):
                inclusive[name] += int(n)
            if frames:
                own[frames[-1]] += int(n)
    if not total:
        return {}
    return {"samples": total,
            "inclusive": [(k, round(100 * n / total, 1)) for k, n in inclusive.most_common(top)],
            "self": [(k, round(100 * n / total, 1)) for k, n in own.most_common(top)]}
