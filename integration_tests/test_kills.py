"""`amp run` killed with SIGKILL again and again, at random points of every stage (score,
prune, distill, eval, report), then run to the end: the outputs equal those of a run that
was never interrupted (scores, sizes, trace, pruned and distilled weights, the loss log,
the evaluation and every number of the report). The demo recipe, reduced, in real
processes; the seed of the kill points is printed when the test fails."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# about eight minutes on a 2-core CPU: `make test-slow`, not `make test`
pytestmark = pytest.mark.slow

SETS = {"data.calib_images": 256, "data.val_images": 256, "amp.checkpoint_every": 1,
        "distill.max_steps": 6, "distill.checkpoint_every": 1, "eval.tasks": ["knn"]}
# (stage, how many kills once it has begun)
PLAN = [("score", 1), ("prune", 1), ("distill", 2), ("eval", 1), ("report", 1)]
# what differs between any two runs: timings, where files are, where a run resumed from,
# and what the search held in memory (a resumed search caches only the blocks left)
VARYING = {"seconds", "eval_seconds", "resumed_from", "paths", "cache", "cache_bytes"}


def _env() -> dict[str, str]:
    group = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in group}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _start(run: Path, log: Path) -> subprocess.Popen:
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return subprocess.Popen([sys.executable, "-m", "amp_cli.app", "run", "demo_digits",
                             "--out", str(run), "--no-progress", *sets],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env())


def _finish(run: Path, log: Path) -> None:
    proc = _start(run, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]


def _kill_in(stage: str, delay: float, run: Path, log: Path) -> int:
    """Start `amp run`; once it logs `stage <stage>`, wait `delay` s and SIGKILL it.
    Returns its exit status (-9 when the kill landed, 0 if it finished first)."""
    proc = _start(run, log)
    deadline = time.time() + 600
    while f"stage {stage}" not in log.read_text():
        if proc.poll() is not None:
            return proc.returncode
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in VARYING}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "distill" / "loss.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def test_killed_at_random_points_of_every_stage_ends_as_an_uninterrupted_run(tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish(ref, tmp_path / "ref.log")
    seconds = json.loads((ref / "report.json").read_text())["seconds"]

    statuses = []
    for stage, kills in PLAN:
        for k in range(kills):
            # a random point inside the stage (as long as it took uninterrupted)
            delay = rng.uniform(0, max(seconds.get(stage, 0.5), 0.5))
            log = tmp_path / f"{stage}{k}.log"
            statuses.append((stage, round(delay, 2), _kill_in(stage, delay, run, log)))
    killed = [s for s in statuses if s[2] == -signal.SIGKILL]
    assert len(killed) >= 4, (seed, statuses)  # most kills land before the run ends
    assert all(s[2] in (0, -signal.SIGKILL) for s in statuses), (seed, statuses)
    _finish(run, tmp_path / "final.log")

    why = f"seed {seed}, kills {statuses}"
    a, b = load_file(str(ref / "scores.safetensors")), load_file(str(run / "scores.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), why
    pa, pb = (json.loads((d / "prune.json").read_text())["result"] for d in (ref, run))
    assert _strip(pa) == _strip(pb), why
    for model in ("pruned", "distilled"):
        wa, wb = _weights(ref / model), _weights(run / model)
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), (model, why)
    assert _losses(ref) == _losses(run), why
    for name in ("eval.json", "report.json"):
        ja, jb = (json.loads((d / name).read_text()) for d in (ref, run))
        assert _strip(ja) == _strip(jb), (name, why)
    assert not list(run.glob(".*.*.*")), why  # no temporary leftovers of killed writers
