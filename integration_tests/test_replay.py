"""Early decisions replayed on a recorded search (`amp bench search --orders`): a replay in
a run's batch order is that run, forward for forward; one that leaves the recorded path
says where."""

from __future__ import annotations

import pytest
from test_sequential import _Reckless, _search, _setup

from amp_plugin.bench.replay import WHOLE, RecordingDecisions, replay
from amp_plugin.search.sequential import EarlyDecisions

pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded(model, val, imp, threshold):
    recorder = RecordingDecisions()
    result = _search(model, val, imp, threshold, recorder)
    assert recorder.recording.sizes == result.hidden_sizes
    return recorder.recording, result


@pytest.mark.parametrize("exact_reference", [True, False], ids=["exact", "as-needed"])
def test_a_replay_in_a_runs_batch_order_is_that_run(exact_reference):
    """The recording is the exact search (same sizes), with every candidate and every block
    whole on every batch; replaying early decisions on it gives, in each batch order, the
    real run's sizes, image-block forwards and record (batches each trial read, trials
    decided early, E_prev's values computed), bit for bit."""
    model, val, imp = _setup(seed=2, batches=16)
    exact = _search(model, val, imp, 2e-3, None)
    recording, recorded = _recorded(model, val, imp, 2e-3)
    assert recorded.hidden_sizes == exact.hidden_sizes
    assert set(recording.start) == set(exact.hidden_sizes)
    for name in exact.hidden_sizes:
        tried = {t.size for t in exact.trace if t.block == name}
        assert {s for n, s in recording.values if n == name} == tried | {WHOLE}
        assert all(len(v) == 16 for v in recording.values.values())
    for order in (0, 1, 2):
        early = EarlyDecisions(0.99, trials=18, exact_reference=exact_reference, seed=order)
        real = _search(model, val, imp, 2e-3, early)
        replayed = replay(recording, early, 2e-3)
        assert replayed["early_decisions"] == real.extra["early_decisions"]
        assert replayed["image_block_forwards"] == real.extra["image_block_forwards"]
        assert replayed["identical"] == (real.hidden_sizes == exact.hidden_sizes)
        assert replayed["early_decisions"]["decided_early"] > 0


def test_a_replay_that_leaves_the_recorded_path_names_where():
    """Decisions that accept after two batches, unchecked (E_prev as needed: only the last
    block's accept is read to the end), take other sizes than the full pass: the replay
    stops at the first MLP, in search order, whose trials differ from the exact search's."""
    model, val, imp = _setup(seed=0, batches=6)
    exact = _search(model, val, imp, 2e-3, None)
    recording, _ = _recorded(model, val, imp, 2e-3)
    reckless = _Reckless(0.99, min_batches=2, exact_reference=False)
    real = _search(model, val, imp, 2e-3, reckless)
    assert real.hidden_sizes != exact.hidden_sizes

    def path(trace, name):
        return [(t.size, t.accepted) for t in trace if t.block == name]

    first = next(n for n in reversed(list(exact.hidden_sizes))
                 if path(real.trace, n) != path(exact.trace, n))
    replayed = replay(recording, reckless, 2e-3)
    assert replayed == {"identical": False, "diverged_at": first,
                        "image_block_forwards": None, "early_decisions": None}


def test_bench_search_replays_each_option_in_more_orders(tmp_path):
    """`amp bench search --confidence C --orders K`: per option, K replays whose order 0 is
    the real run (same forwards), summarised over the orders that kept the exact sizes."""
    import json

    from amp_cli.app import app
    from typer.testing import CliRunner

    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, [
        "bench", "search", "--layers", "2", "--width", "64", "--val-images", "256",
        "--batch-size", "32", "--confidence", "0.99", "--reference", "exact",
        "--reference", "as-needed", "--orders", "3", "--threads", "1", "--json", str(out)],
        env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    r = json.loads(out.read_text())
    (row,) = r["seeds"]
    assert row["recorded_sizes_exact"]
    for key in ("0.99", "0.99 as-needed"):
        o = row["options"][key]
        runs = o["orders"]["runs"]
        assert o["orders"]["order_0_is_the_run"] and [x["order"] for x in runs] == [0, 1, 2]
        assert runs[0]["image_block_forwards"] == o["image_block_forwards"]
        assert runs[0]["identical"] == o["identical_sizes"]
        s = r["summary"][key]["orders"]
        kept = [x["over_cache"] for x in runs if x["identical"]]
        assert s["replays"] == 3 and s["identical"] == len(kept)
        assert s["over_cache"]["mean"] == pytest.approx(sum(kept) / len(kept))
    assert "replayed in 3 batch orders" in done.stdout
    bad = CliRunner().invoke(app, ["bench", "search", "--confidence", "0.99", "--orders", "-1"])
    assert bad.exit_code == 2 and "--orders" in bad.output
