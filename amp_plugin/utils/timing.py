"""Timing several functions against each other on a shared, noisy machine: warm-up, then
repeats in which every function runs once (A B C, then C B A, ...), so that load from
other processes, clock changes and thermal drift fall on all of them alike."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping

from .progress import progress


def time_interleaved(runners: Mapping[str, Callable[[], object]], repeats: int = 10,
                     warmup: int = 3, min_seconds: float = 0.0,
                     sync: Callable[[], None] = lambda: None,
                     show_progress: bool = False) -> dict[str, dict]:
    """{name: {"seconds": seconds per call in each repeat, "number": calls per repeat}}.

    Every runner is called `warmup` times (round robin), then `repeats` times in turns
    whose order reverses every repeat. A timed run calls a runner `number` times, chosen
    from its last warm-up call so that a run lasts about `min_seconds` (short calls are
    timed in groups, above the timer's and the scheduler's granularity). `sync` waits for
    queued work (CUDA) before each clock reading. The garbage collector is off while
    timing, as in `timeit`.
    """
    if repeats < 1 or warmup < 0 or min_seconds < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0, min_seconds >= 0; got {repeats}, "
                         f"{warmup}, {min_seconds}")
    names = list(runners)
    number = dict.fromkeys(names, 1)
    calls = max(warmup, 1 if min_seconds else 0)  # a call to calibrate `number` at least
    for i in range(calls):
        for name in names:
            sync()
            t0 = time.perf_counter()
            runners[name]()
            sync()
            if min_seconds and i == calls - 1:
                once = max(time.perf_counter() - t0, 1e-9)
                number[name] = max(1, math.ceil(min_seconds / once))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in progress(range(repeats), "timing", enabled=show_progress):
            for name in names if r % 2 == 0 else reversed(names):
                fn, n = runners[name], number[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                seconds[name].append((time.perf_counter() - t0) / n)
    finally:
        if enabled:
            gc.enable()
    return {name: {"seconds": seconds[name], "number": number[name]} for name in names}
