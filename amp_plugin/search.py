"""AMPPruner: adaptive per-MLP sizes by binary search on the entropy (ALGORITHM.md 3).

With default options the sizes are exactly those of the reference procedure. It is
several times cheaper because:
- blocks before l never change while block l is searched, so the validation states
  entering every block are computed once (`StateCache`, on the device, in host memory
  or on disk) and a trial runs only blocks l..L-1, which are already pruned;
- a candidate size is evaluated by masking hidden neurons at the input of the output
  linear where that is exact; across a norm over the hidden dim a sliced copy is used;
- a size already measured in the same search is not measured again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .adapters import Adapter, vision_tower
from .cache import StateCache
from .cost import count_flops, count_mlp_params, count_params
from .graph import build_dependency_graph, prune_mlp
from .importance import AMPImportance, is_text, split_batch
from .mlp import MLPView, find_mlps
from .progress import progress


@dataclass
class Trial:
    block: str
    index: int
    size: int
    entropy: float
    accepted: bool
    reference: float  # E_prev the trial was compared with


@dataclass
class PruneResult:
    hidden_sizes: dict[str, int]
    original_sizes: dict[str, int]
    trace: list[Trial]
    params: dict[str, int]
    mlp_params: dict[str, int]
    flops: dict[str, int]
    entropy: dict[str, float]
    threshold: float
    max_steps: int
    round_to: int | None
    evaluations: int
    cache: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def keep_order(scores: torch.Tensor) -> torch.Tensor:
    """Neuron indices by descending score (stable, so ties keep index order)."""
    return torch.sort(scores, descending=True, stable=True).indices


def candidate_sizes(hidden: int, max_steps: int, accept: Callable[[int], bool],
                    round_to: int | None = None) -> int:
    """Binary search of section 3 on `accept(size)`; returns the kept size.

    Sizes are multiples of `round_to` (capped at `hidden`); size 0 is never tried.
    """
    unit = round_to or 1
    lo, hi, best = 0, math.ceil(hidden / unit), hidden
    for _ in range(max_steps):
        mid = (lo + hi) // 2
        if mid == 0:
            break
        size = min(mid * unit, hidden)
        if accept(size):
            hi, best = mid, size
        else:
            lo = mid
    return best


class AMPPruner:
    """Adaptive MLP pruning of a vision transformer through Torch-Pruning.

    `step()` searches every MLP from the last block to the first, prunes it physically
    through the dependency graph as soon as its size is decided, and returns a
    `PruneResult`.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        importance: AMPImportance,
        val_batches: Sequence,
        threshold: float,
        max_steps: int = 6,
        round_to: int | None = None,
        feature_fn: Callable | None = None,
        cache_device_bytes: int = 2 << 30,
        cache_host_bytes: int = 8 << 30,
        cache_dir: str | None = None,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to}")
        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance
        self.val_batches = [split_batch(b) for b in val_batches]
        if not self.val_batches:
            raise ValueError("val_batches is empty")
        self.threshold = threshold
        self.max_steps = max_steps
        self.round_to = round_to
        self.feature_fn = feature_fn or importance.feature_fn
        self.cache_limits = (cache_device_bytes, cache_host_bytes, cache_dir)
        self.show_progress = show_progress
        self.log = log or (lambda msg: None)
        self.criterion = importance.criterion

    # ---- evaluation ---------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _agree(value: float) -> float:
        """Every rank computes the entropy of the same global batches, but must take the
        same accept/reject decisions bit for bit: average the value across ranks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()

    def _entropy_full(self) -> float:
        """E_val by full forward passes (used with a custom feature_fn)."""
        device, total = self._device(), 0.0
        for images, extra in self.val_batches:
            feats = self.importance.features(self.model, images.to(device), is_text(extra))
            total += float(self.criterion(feats, _to(extra, device)))
        return self._agree(total / len(self.val_batches))

    def _entropy_suffix(self, tower: nn.Module, adapter: Adapter, start: int) -> float:
        """E_val running only blocks start..L-1 on the cached states entering `start`."""
        device, total, n_blocks = self._device(), 0.0, len(adapter.blocks(tower))
        for b, (_, extra) in enumerate(self.val_batches):
            state = self.cache.get(start, b)
            for i in range(start, n_blocks):
                state = adapter.run_block(tower, i, state)
            feats = adapter.head(tower, state)
            if is_text(extra):
                feats = adapter.project(tower, feats)
            total += float(self.criterion(feats, _to(extra, device)))
        return self._agree(total / len(self.val_batches))

    @contextmanager
    def _candidate(self, tower: nn.Module, view: MLPView, keep: torch.Tensor):
        """Temporarily keep only neurons `keep` of `view` (mask or sliced copy)."""
        if view.exact_masking:
            mask = torch.zeros(view.hidden, device=view.output.weight.device)
            mask[keep] = 1.0

            def hook(_m, args):
                return (args[0] * mask.to(args[0].dtype), *args[1:])
            handle = view.output.register_forward_pre_hook(hook)
            try:
                yield
            finally:
                handle.remove()
        else:
            parent_name, _, child = view.name.rpartition(".")
            parent = tower.get_submodule(parent_name) if parent_name else tower
            original = getattr(parent, child)
            setattr(parent, child, view.sliced_copy(keep))
            try:
                yield
            finally:
                setattr(parent, child, original)

    # ---- search -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> PruneResult:
        t0 = time.perf_counter()
        tower, adapter = vision_tower(self.model)
        views = find_mlps(tower)
        scores = self.importance.neuron_scores()
        missing = [n for n in views if n not in scores]
        if missing:
            raise ValueError(f"no scores for {missing[:3]}...; run importance.accumulate() first")
        for n, v in views.items():
            if len(scores[n]) != v.hidden:
                raise ValueError(f"scores of {n} have {len(scores[n])} entries, MLP has {v.hidden}")
        was_training = self.model.training
        self.model.eval()
        example = self.example_inputs.to(self._device())
        before = dict(params=count_params(tower), mlp=count_mlp_params(tower),
                      flops=count_flops(tower, example))
        original = {n: v.hidden for n, v in views.items()}
        dg = build_dependency_graph(tower, example)

        block_of = _block_index(adapter.blocks(tower), views) if self.feature_fn is None else None
        fast = block_of is not None
        if fast:
            self.cache = StateCache(*self.cache_limits)
            mode = self.cache.fill(tower, adapter, [im for im, _ in self.val_batches],
                                   starts=sorted(set(block_of.values())),
                                   show_progress=self.show_progress)
            self.log(f"validation states cached: {mode} ({self.cache.nbytes / 2**20:.1f} MiB)")
        else:
            mode = "none (custom feature_fn: full forward per trial)"

        def evaluate(name: str) -> float:
            if fast:
                return self._entropy_suffix(tower, adapter, block_of[name])
            return self._entropy_full()

        trace: list[Trial] = []
        evaluations = 0
        e_prev: float | None = None
        e_start: float | None = None
        names = list(views)[::-1]
        for idx in progress(range(len(names)), "AMP search", enabled=self.show_progress):
            name, view = names[idx], views[names[idx]]
            if e_prev is None:
                e_prev = evaluate(name)
                evaluations += 1
                e_start = e_prev if e_start is None else e_start
            order = keep_order(scores[name]).to(view.output.weight.device)
            measured: dict[int, float] = {}
            reference = e_prev

            def accept(size: int) -> bool:
                nonlocal evaluations
                if size not in measured:
                    with self._candidate(tower, view, order[:size]):
                        measured[size] = evaluate(name)
                    evaluations += 1
                ok = measured[size] - reference <= self.threshold
                trace.append(Trial(name, len(views) - 1 - idx, size, measured[size], ok,
                                   reference))
                return ok

            best = candidate_sizes(view.hidden, self.max_steps, accept, self.round_to)
            accepted = [t for t in trace if t.block == name and t.accepted and t.size == best]
            e_prev = accepted[-1].entropy if accepted else None
            if best < view.hidden:
                prune_mlp(dg, view, torch.sort(order[:best]).values)
            if fast:
                self.cache.drop(block_of[name])
        # the states entering the last searched block are dropped by now: full forward
        e_end = e_prev if e_prev is not None else self._entropy_full()
        self.model.train(was_training)
        sizes = {n: v.hidden for n, v in find_mlps(tower).items()}
        return PruneResult(
            hidden_sizes=sizes,
            original_sizes=original,
            trace=trace,
            params=dict(before=before["params"], after=count_params(tower)),
            mlp_params=dict(before=before["mlp"], after=count_mlp_params(tower)),
            flops=dict(before=before["flops"], after=count_flops(tower, example)),
            entropy=dict(before=float(e_start), after=float(e_end)),
            threshold=self.threshold,
            max_steps=self.max_steps,
            round_to=self.round_to,
            evaluations=evaluations,
            cache=mode,
            seconds=time.perf_counter() - t0,
        )


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _block_index(blocks: Sequence[nn.Module], views: dict[str, MLPView]) -> dict[str, int] | None:
    """Block index of each MLP, or None if some MLP is not inside exactly one block."""
    out = {}
    for name, view in views.items():
        hits = [i for i, blk in enumerate(blocks) if any(m is view.module for m in blk.modules())]
        if len(hits) != 1:
            return None
        out[name] = hits[0]
    return out
