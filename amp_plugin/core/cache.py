"""Validation states entering each block, computed once for the whole search.

The blocks before l never change while block l is searched, so the state entering
block l is the same for every trial. Memory is bounded: the states stay on the model's
device while they fit in `device_bytes`, else go to host memory up to `host_bytes`,
else to files in `directory` (a temporary folder by default).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..utils.progress import progress
from .adapter import Adapter


def _nbytes(state: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))


def _move(state: tuple, device) -> tuple:
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in state)


class StateCache:
    def __init__(self, device_bytes: int = 2 << 30, host_bytes: int = 8 << 30,
                 directory: str | None = None):
        self.device_bytes, self.host_bytes, self.directory = device_bytes, host_bytes, directory
        self.mode = "empty"
        self.nbytes = 0
        self._mem: dict[tuple[int, int], tuple] = {}
        self._dir: Path | None = None
        self._device = torch.device("cpu")

    @torch.no_grad()
    def fill(self, tower: nn.Module, adapter: Adapter, images: Sequence[torch.Tensor],
             starts: Sequence[int], show_progress: bool = True) -> str:
        """One pass over the validation images, keeping the state entering each block in
        `starts`; returns the storage mode used ("device", "host" or "disk: DIR")."""
        self._device = next(tower.parameters()).device
        wanted = set(starts)
        for b in progress(range(len(images)), "caching validation states", show_progress):
            state = adapter.embed(tower, images[b].to(self._device))
            # start len(blocks): the state after the last block (an MLP of the pooling head)
            for i in range(len(adapter.blocks(tower)) + 1):
                if i in wanted:
                    if self.mode == "empty":
                        self._choose_mode(_nbytes(state) * len(wanted) * len(images))
                    self._put((i, b), state)
                if i >= max(wanted):
                    break
                state = adapter.run_block(tower, i, state)
        return self.mode if self.mode != "disk" else f"disk: {self._dir}"

    def _choose_mode(self, total: int) -> None:
        self.nbytes = total
        on_accelerator = self._device.type != "cpu"
        if total <= self.device_bytes:
            self.mode = "device"
        elif on_accelerator and total <= self.host_bytes:
            self.mode = "host"
        elif not on_accelerator and total <= self.device_bytes + self.host_bytes:
            self.mode = "host"
        else:
            self.mode = "disk"
            root = Path(self.directory) if self.directory else None
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="amp-states-", dir=root))

    def _put(self, key: tuple[int, int], state: tuple) -> None:
        if self.mode == "device":
            self._mem[key] = state
        elif self.mode == "host":
            self._mem[key] = _move(state, "cpu")
        else:
            torch.save(_move(state, "cpu"), self._dir / f"{key[0]}_{key[1]}.pt")

    def get(self, start: int, batch: int) -> tuple:
        if self.mode == "disk":
            state = torch.load(self._dir / f"{start}_{batch}.pt", weights_only=True)
        else:
            state = self._mem[(start, batch)]
        return _move(state, self._device)

    def drop(self, start: int) -> None:
        """Free the states entering block `start` (its search is over)."""
        for key in [k for k in self._mem if k[0] == start]:
            del self._mem[key]
        if self._dir is not None:
            for f in self._dir.glob(f"{start}_*.pt"):
                f.unlink()

    def close(self) -> None:
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.close()
