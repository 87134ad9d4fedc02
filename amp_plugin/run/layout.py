"""The run directory: the one place that knows its file names.

    recipe.yaml            the recipe as run (after overrides)
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
"""

from __future__ import annotations

from pathlib import Path

from ..core.serialization import is_pruned_dir
from ..distill.distiller import DistillPaths
from ..utils.io import read_json

MODEL_ROLES = ("pruned", "distilled")  # besides the original ("teacher")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def hash_cache(self) -> Path:
        return self.root / ".hashes.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.safetensors"

    @property
    def scores_meta(self) -> Path:
        return self.root / "scores.json"

    def score_progress(self, rank: int) -> Path:
        return self.root / f"scores.rank{rank}.partial"

    @property
    def prune_progress(self) -> Path:
        return self.root / "prune.partial.json"

    @property
    def prune_meta(self) -> Path:
        return self.root / "prune.json"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    @property
    def distill(self) -> DistillPaths:
        work = self.root / "distill"
        return DistillPaths(checkpoints=work / "checkpoints", log=work / "loss.jsonl",
                            result=work / "result.json", fingerprint=work / "fingerprint",
                            distilled=self.distilled)

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def original_features(self) -> Path:
        return self.root / "original_features.safetensors"

    @property
    def classifiers(self) -> Path:
        return self.root / "classifiers"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

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
