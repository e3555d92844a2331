"""What the benchmark scripts share: which lit_attrib they measured, profiles as JSON rows, step timing."""

from __future__ import annotations

import cProfile
import hashlib
import io
import json
import pstats
import subprocess
import time
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]


def lit_attrib_commit() -> str:
    """The checked-out commit, with ``+dirty`` when lit_attrib/ has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "lit_attrib"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def lit_attrib_sources() -> str:
    """SHA-256 (first 16 hex digits) of lit_attrib's Python sources as imported (they may change under a dirty tree)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "lit_attrib").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def profile_table(profile: cProfile.Profile, sort: str, count: int) -> list[dict]:
    """The ``count`` functions of a cProfile run with the largest ``sort`` (``tottime_s`` or ``cumtime_s``)."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        short = file
        for prefix in (str(ROOT) + "/", "site-packages/"):
            if prefix in short:
                short = short.split(prefix, 1)[1]
        rows.append({"function": f"{short}:{line}({name})" if line else name, "calls": calls,
                     "tottime_s": round(own, 4), "cumtime_s": round(cumulative, 4)})
    return sorted(rows, key=lambda r: r[sort], reverse=True)[:count]


def report_load(load: dict, threads: int) -> None:
    """Print the 1-minute load averages around a run and warn when other processes shared the CPUs."""
    print(f"\n1-minute load average: {load['before']:.2f} before, {load['after']:.2f} after")
    if max(load.values()) > threads + 0.5:
        print("WARNING: other processes shared the CPUs, so the timings are unreliable; rerun on an idle machine")


def write_results(results: dict, output: Path) -> None:
    """Write the results as JSON (creating the folder) and say where."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {output}")


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self.in_step = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
        self.in_step = False
