"""Validation states entering each searched block, computed once for the whole search.

The blocks before l never change while block l is searched, so the state entering
block l is the same for every trial. Two modes:

    full           the states entering every searched block are kept
    checkpointed   when those do not fit the budget: only the states entering about every
                   sqrt(L)-th searched block (the checkpoints) are kept, and the states
                   entering the block being searched are recomputed once from the nearest
                   checkpoint below it (a few blocks, which are still the original ones);
                   at most ceil(L / k) + 1 blocks' states are held instead of L (fewer
                   checkpoints, farther apart, when the budget asks for it)

Both give bit-identical states, hence identical sizes. Storage tiers: the model's device
while the held states fit `device_bytes`, else host memory up to `host_bytes`, else files
in `directory` up to `disk_bytes`. Each rank caches only its own shard of every
validation batch (the batches it is given are its shard).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import Adapter
from ..utils.progress import progress


def _nbytes(state: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))


def _move(state: tuple, device) -> tuple:
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in state)


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def checkpoint_plan(starts: Sequence[int], fit: int) -> list[int]:
    """The checkpoints: every k-th searched block from the first, k = ceil(sqrt(L)), or
    farther apart when only `fit` blocks' states fit the budget (one is kept free for the
    block being searched)."""
    starts = sorted(starts)
    wanted = math.ceil(len(starts) / math.ceil(math.sqrt(len(starts))))
    count = max(1, min(wanted, fit - 1))
    return starts[::math.ceil(len(starts) / count)]


class StateCache:
    def __init__(self, device_bytes: int = 2 << 30, host_bytes: int = 8 << 30,
                 directory: str | None = None, disk_bytes: int | None = None):
        self.device_bytes, self.host_bytes, self.directory = device_bytes, host_bytes, directory
        self.disk_bytes = disk_bytes  # None: no limit
        self.tier = "empty"
        self.checkpoints: list[int] | None = None  # None: full mode
        self.full_bytes = 0  # the states entering every searched block
        self.nbytes = 0  # held now
        self.peak_bytes = 0
        self.recomputed_blocks = 0
        self.block_forwards = 0  # image-block forwards run by filling and recomputing
        self.why = ""
        self._mem: dict[tuple[int, int], tuple] = {}
        self._sizes: dict[tuple[int, int], int] = {}
        self._dir: Path | None = None
        self._device = torch.device("cpu")
        self._starts: list[int] = []
        self._batches = 0
        self._tower: nn.Module | None = None
        self._adapter: Adapter | None = None

    # ---- filling ------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, tower: nn.Module, adapter: Adapter, images: Iterable[torch.Tensor],
             count: int, starts: Sequence[int], show_progress: bool = True) -> str:
        """One pass over the `count` validation batches `images`, keeping the state entering
        each block of `starts` (full mode) or of the checkpoints only; returns `describe()`."""
        self._device = next(tower.parameters()).device
        self._tower, self._adapter = tower, adapter
        self._starts, self._batches = sorted(set(starts)), count
        last = self._starts[-1]
        wanted: set[int] = set()
        for b, x in enumerate(progress(images, "caching validation states", show_progress,
                                       total=count, unit="img")):
            state = adapter.embed(tower, x.to(self._device))
            if self.tier == "empty":
                wanted = set(self._choose(_nbytes(state) * count))
            # a start of len(blocks) is the state after the last block (a pooling head's MLP)
            for i in range(last + 1):
                if i in wanted:
                    self._put((i, b), state)
                if i == last or (self.checkpoints is not None and i >= max(wanted)):
                    break
                state = adapter.run_block(tower, i, state)
                self.block_forwards += x.shape[0]
        return self.describe()

    def _choose(self, per_block: int) -> list[int]:
        """Pick the mode and the storage tier from the bytes of one block's states; returns
        the blocks whose states the filling pass keeps."""
        self.full_bytes = per_block * len(self._starts)
        budget = self.device_bytes + self.host_bytes + (
            math.inf if self.disk_bytes is None else self.disk_bytes)
        keep = self._starts
        if self.full_bytes > budget:
            self.checkpoints = checkpoint_plan(self._starts, int(budget // max(per_block, 1)))
            keep = self.checkpoints
            held = per_block * (len(keep) + 1)
            if held > budget:
                raise MemoryError(
                    f"the validation state cache needs at least {gib(held)} per rank in "
                    f"checkpointed mode ({len(keep)} checkpoints + 1 block of {gib(per_block)})"
                    f", more than the budget of {gib(budget)} (amp.cache.device_gib + host_gib "
                    "+ disk_gib): raise the budget, or lower data.val_images")
            self.why = (f"the full cache of {gib(self.full_bytes)} exceeds the budget of "
                        f"{gib(budget)}; holding {len(keep)} checkpoints + 1 recomputed block "
                        f"of {gib(per_block)} each")
        else:
            held = self.full_bytes
            self.why = f"the full cache of {gib(self.full_bytes)} fits the budget"
        on_accelerator = self._device.type != "cpu"
        if held <= self.device_bytes:
            self.tier = "device"
        elif held <= self.host_bytes + (0 if on_accelerator else self.device_bytes):
            self.tier = "host"
        else:
            self.tier = "disk"
            root = Path(self.directory) if self.directory else None
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="amp-states-", dir=root))
        return keep

    def describe(self) -> str:
        """The mode, the tier and why, with the bytes (this rank's shard)."""
        mode = "full" if self.checkpoints is None else (
            f"checkpointed at blocks {self.checkpoints}")
        tier = self.tier if self.tier != "disk" else f"disk: {self._dir}"
        return f"{mode}, {tier} ({self.why})"

    # ---- storage ------------------------------------------------------------------------
    def _put(self, key: tuple[int, int], state: tuple) -> None:
        if self.tier == "device":
            self._mem[key] = state
        elif self.tier == "host":
            self._mem[key] = _move(state, "cpu")
        else:
            torch.save(_move(state, "cpu"), self._dir / f"{key[0]}_{key[1]}.pt")
        self._sizes[key] = _nbytes(state)
        self.nbytes += self._sizes[key]
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def _has(self, start: int) -> bool:
        return (start, 0) in self._sizes

    def get(self, start: int, batch: int) -> tuple:
        if (start, batch) not in self._sizes:
            self._recompute(start, batch)
        if self.tier == "disk":
            state = torch.load(self._dir / f"{start}_{batch}.pt", weights_only=True)
        else:
            state = self._mem[(start, batch)]
        return _move(state, self._device)

    @torch.no_grad()
    def _recompute(self, start: int, batch: int) -> None:
        """The states of `batch` entering `start` from the nearest checkpoint below it (a
        batch at a time: a search that reads the first batches only recomputes those); the
        blocks in between are not searched yet, so they are the ones the checkpoint went
        through. `recomputed_blocks` counts each block once per recomputation of its states
        (at batch 0)."""
        if self.checkpoints is None or start not in self._starts:
            raise KeyError(f"no cached states enter block {start}")
        base = max(c for c in self.checkpoints if c <= start)
        if not self._has(base):
            raise KeyError(f"the checkpoint at block {base} was already freed")
        state = self.get(base, batch)
        for i in range(base, start):
            state = self._adapter.run_block(self._tower, i, state)
        self.block_forwards += (start - base) * state[0].shape[0]
        self._put((start, batch), state)
        if batch == 0:
            self.recomputed_blocks += start - base

    def recomputable(self, start: int) -> bool:
        """Whether the states entering `start` can be computed again from a checkpoint
        (checkpointed mode, not itself a checkpoint)."""
        return self.checkpoints is not None and start not in self.checkpoints

    def drop(self, start: int) -> None:
        """Free the states entering block `start` (its search is over)."""
        for key in [k for k in self._sizes if k[0] == start]:
            self.nbytes -= self._sizes.pop(key)
            self._mem.pop(key, None)
            if self._dir is not None:
                (self._dir / f"{key[0]}_{key[1]}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        self._mem.clear()
        self._sizes.clear()
        self.nbytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.close()
