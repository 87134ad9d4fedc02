"""The run directory: the one place that knows its file names.

    recipe.yaml            the recipe as run (after overrides)
    teacher/               the teacher the train stage made (save_pruned), when no saved
                           teacher (train.checkpoint) matches the recipe's train settings
    scores.safetensors     AMP neuron scores; scores.json: fingerprint, batches, seconds
    scores.rankR.partial   score stage in progress: rank R's partial sums and position
    prune.json             the search result (PruneResult) and its fingerprint
    prune.partial.json     prune stage in progress: sizes, trace and E_prev so far
    pruned/                the pruned model (save_pruned)
    distill/               DeepSpeed checkpoints, loss log, result, fingerprint
    distilled/             the distilled model (save_pruned)
    eval.json              evaluation of every model present
    original_features.safetensors
                           the original model's features of the labelled splits (the
                           fixed side of prototype, original_knn, identification, cosine)
    classifiers/           cached zero-shot text classifiers
    report.json, plots/    the report (a reader of everything above)
    export/                `amp export`: <model>.onnx / <model>.pt2, each with <file>.json
    .lock                  held by the run using the directory (names it)
    .hashes.json           content hashes of the files stages read, by size/mtime/ctime

A run writes and deletes only inside its directory: a symbolic link below the root (to a
file or a folder, planted or left by a copy) would carry those writes elsewhere, so it is
refused, naming the link and its target, before a run starts and whenever a path of the
layout is taken. The root itself may be a link (where the user keeps the run is theirs).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.serialization import is_pruned_dir
from ..distill.inputs import DistillPaths
from ..utils.io import read_json

MODEL_ROLES = ("pruned", "distilled")  # besides the original ("teacher")


class RunDirError(ValueError):
    """A run directory a run must not write into: a link out of it, a read-only folder."""


def _link_error(link: Path, root: Path) -> RunDirError:
    return RunDirError(f"{link} is a symbolic link to {os.readlink(link)}: a run writes "
                       f"only inside its run directory {root} and never through a link out "
                       "of it; remove the link (the run directory itself may be one)")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _inside(self, *parts: str) -> Path:
        """root/parts, refused when any part below the root is a symbolic link."""
        path = self.root
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise _link_error(path, self.root)
        return path

    def check_writable(self) -> None:
        """Refuse, before any work, a run directory holding a symbolic link anywhere below
        its root, or a folder this process cannot write (a read-only file system or
        permissions); a directory not made yet is checked where it would be made."""
        where = self.root
        while not where.exists() and not where.is_symlink() and where != where.parent:
            where = where.parent
        if where != self.root:
            if not where.is_dir():
                raise RunDirError(f"run directory {self.root}: {where} is not a folder")
            folders = [where]
        else:
            if not self.root.is_dir():
                raise RunDirError(f"run directory {self.root} is not a folder")
            folders = []
            for top, dirs, files in os.walk(self.root):  # links are listed, not followed
                folders.append(Path(top))
                for name in dirs + files:
                    if (Path(top) / name).is_symlink():
                        raise _link_error(Path(top) / name, self.root)
        for folder in folders:
            if not os.access(folder, os.W_OK | os.X_OK):
                raise RunDirError(f"run directory {self.root}: {folder} is read-only for "
                                  "this process; make it writable or choose another "
                                  "output directory")

    @property
    def recipe(self) -> Path:
        return self._inside("recipe.yaml")

    @property
    def lock(self) -> Path:
        return self._inside(".lock")

    @property
    def hash_cache(self) -> Path:
        return self._inside(".hashes.json")

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def scores(self) -> Path:
        return self._inside("scores.safetensors")

    @property
    def scores_meta(self) -> Path:
        return self._inside("scores.json")

    def score_progress(self, rank: int) -> Path:
        return self._inside(f"scores.rank{rank}.partial")

    @property
    def prune_progress(self) -> Path:
        return self._inside("prune.partial.json")

    @property
    def prune_meta(self) -> Path:
        return self._inside("prune.json")

    @property
    def pruned(self) -> Path:
        return self._inside("pruned")

    @property
    def distilled(self) -> Path:
        return self._inside("distilled")

    @property
    def distill(self) -> DistillPaths:
        return DistillPaths(checkpoints=self._inside("distill", "checkpoints"),
                            log=self._inside("distill", "loss.jsonl"),
                            result=self._inside("distill", "result.json"),
                            fingerprint=self._inside("distill", "fingerprint"),
                            distilled=self.distilled)

    @property
    def eval_json(self) -> Path:
        return self._inside("eval.json")

    @property
    def original_features(self) -> Path:
        return self.root / "original_features.safetensors"

    @property
    def classifiers(self) -> Path:
        return self._inside("classifiers")

    @property
    def report_json(self) -> Path:
        return self._inside("report.json")

    @property
    def plots(self) -> Path:
        return self._inside("plots")

    @property
    def exports(self) -> Path:
        return self.root / "export"

    # ---- reading ---------------------------------------------------------------------------
    def model_dir(self, role: str) -> Path:
        if role not in MODEL_ROLES:
            raise ValueError(f"unknown model role {role!r}; expected one of {MODEL_ROLES}")
        return getattr(self, role)

    def models_present(self) -> list[str]:
        """The pruned / distilled models this run directory holds."""
        return [r for r in MODEL_ROLES if is_pruned_dir(self.model_dir(r))]

    def stage_meta(self, stage: str) -> dict | None:
        """The JSON a completed stage wrote (score, prune, distill, eval, report)."""
        path = {"score": self.scores_meta, "prune": self.prune_meta,
                "distill": self.distill.result, "eval": self.eval_json,
                "report": self.report_json}[stage]
        return read_json(path)

    def is_run(self) -> bool:
        return self.recipe.is_file()
