"""The embedded demo end to end (reduced: the committed teacher, fewer images, 6
distillation steps), first in one process that counts its model builds; then `amp run`
killed with SIGKILL at random points of every stage (score, prune, distill, eval, report)
and run to the end: the outputs equal those of the run that was never interrupted (scores,
sizes, trace, pruned and distilled weights, the loss log, the evaluation and every number
of the report), and a rerun keeps the completed stages. Real processes; the seed of the
kill points is printed when the test fails. `make test` kills once per stage, `make
test-slow` twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SETS = {"data.calib_images": 256, "data.val_images": 256, "amp.checkpoint_every": 1,
        "distill.max_steps": 6, "distill.checkpoint_every": 1, "eval.tasks": ["knn"]}
STAGES = ["score", "prune", "distill", "eval", "report"]
# what differs between any two runs: timings, where files are, where a run resumed from and
# which stages it kept from an earlier process, and what the search held in memory and ran (a
# resumed search caches and runs only the blocks left)
VARYING = {"seconds", "eval_seconds", "resumed_from", "reused", "paths", "cache",
           "cache_bytes", "image_block_forwards"}


# The uninterrupted run: the demo in one process with every model build counted (the builder
# registry is looked up at each build, so wrapping the registered timm builder sees them all).
COUNTING_RUN = textwrap.dedent("""
    import json, sys
    import amp_plugin as amp
    from amp_plugin.families.timm_vit import build_timm

    builds = []
    @amp.register_builder("timm", replace=True)
    def counting(spec):
        builds.append(spec.name)
        return build_timm(spec)

    out, sets = sys.argv[1], json.loads(sys.argv[2])
    recipe = amp.load_recipe("demo_digits", sets)
    amp.run(recipe, out, show_progress=False)
    amp.register_builder("timm", replace=True)(build_timm)
    print("BUILDS", len(builds))
""")


def _env() -> dict[str, str]:
    group = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in group}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _start(run: Path, log: Path) -> subprocess.Popen:
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return subprocess.Popen([sys.executable, "-m", "amp_cli.app", "run", "demo_digits",
                             "--out", str(run), "--no-progress", *sets],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env())


def _reference(run: Path) -> None:
    out = subprocess.run([sys.executable, "-c", COUNTING_RUN, str(run), json.dumps(SETS)],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    # one process builds the original once (the committed teacher, loaded: no training), the
    # student that DeepSpeed trains and the model the ZeRO shards are consolidated into; the
    # pruned and distilled models are evaluated from memory
    assert "BUILDS 3" in out.stdout, out.stdout[-2000:]
    report = json.loads((run / "report.json").read_text())
    for key in ("hidden_sizes", "params", "mlp_params", "flops", "accuracy", "threshold",
                "inv_temperature", "trace"):
        assert key in report, key
    assert report["threshold"] == 0.002 and report["inv_temperature"] == 20
    assert set(report["hidden_sizes"]) == {f"blocks.{i}.mlp" for i in range(4)}
    assert all(0 < h <= 256 for h in report["hidden_sizes"].values())
    assert report["mlp_params"]["after"] <= report["mlp_params"]["before"]
    assert report["flops"]["after"] <= report["flops"]["before"]
    for model in ("teacher", "pruned", "distilled"):
        assert 0 <= report["accuracy"][model] <= 100, model
    assert (run / "distilled" / "amp.json").is_file()
    assert (run / "pruned" / "model.safetensors").is_file()
    assert (run / "plots" / "hidden_sizes.png").read_bytes()[:4] == b"\x89PNG"


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


def test_demo_end_to_end_then_killed_once_in_every_stage_ends_as_it(tmp_path):
    """Eight processes: the reference, one killed in each stage, the one that finishes, the
    rerun."""
    _killed_runs_end_as_an_uninterrupted_run(tmp_path, kills=1, landed=3)


# five processes more, minutes on a 2-core CPU: `make test-slow`, not `make test`
@pytest.mark.slow
def test_killed_again_and_again_in_every_stage_ends_as_an_uninterrupted_run(tmp_path):
    _killed_runs_end_as_an_uninterrupted_run(tmp_path, kills=2, landed=6)


def _killed_runs_end_as_an_uninterrupted_run(tmp_path: Path, kills: int, landed: int) -> None:
    """`kills` kills at random points once each stage has begun; at least `landed` of them
    land before the run ends."""
    seed = int(time.time())
    rng = random.Random(seed)
    ref, run = tmp_path / "ref", tmp_path / "run"
    _reference(ref)
    seconds = json.loads((ref / "report.json").read_text())["seconds"]

    statuses = []
    for stage in STAGES:
        for k in range(kills):
            # a random point inside the stage (as long as it took uninterrupted)
            delay = rng.uniform(0, max(seconds.get(stage, 0.5), 0.5))
            log = tmp_path / f"{stage}{k}.log"
            statuses.append((stage, round(delay, 2), _kill_in(stage, delay, run, log)))
    killed = [s for s in statuses if s[2] == -signal.SIGKILL]
    assert len(killed) >= landed, (seed, statuses)  # most kills land before the run ends
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

    # a rerun keeps the completed stages
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    again = subprocess.run([sys.executable, "-m", "amp_cli.app", "run", "demo_digits", "--out",
                            str(run), "--no-progress", *sets, "--stage", "train", "--stage",
                            "score", "--stage", "prune"], capture_output=True, text=True,
                           env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: cached" in again.stdout and "kept from an earlier run" in again.stdout
