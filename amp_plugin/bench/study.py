"""`amp study`: the paper's claims measured on label-free ViTs trained on the digits.

    criterion     entropy Taylor vs one-hot cross-entropy Taylor (digit labels, through a
                  logistic-regression head) vs Torch-Pruning's MagnitudeImportance, each at
                  the same kept MLP parameters (budget mode), before and after distillation
    budget        at several budgets of MLP parameters: the authors' per-block rule (budget
                  mode), the same MLP parameters kept uniformly (top-scored neurons in every
                  block), and global allocation by each search measure; some of them also
                  distilled; differences to uniform paired by seed
    distillation  original vs pruned vs distilled (from the criterion runs)
    val_size      sizes and accuracy vs the number of validation images of the search

Every model is judged first against the original teacher's features, kept fixed (what a
user keeps when the pruned model replaces the original: prototype accuracy on the
original's class means, kNN in the original's index, identification of each test image
among the original's embeddings, mean cosine to the original's embedding), then by kNN
and a linear probe re-fit on its own features (which saturate: they barely tell pruning
methods apart).

Teachers: the demo's (committed) and a deeper one trained the same way (SimCLR, cached), one
per seed. A seed draws the calibration / validation images (and the deeper teacher);
evaluation always uses the demo's fixed train/test split. Every search ranks neurons by the
criterion being compared and tests candidates on the validation entropy, so the criterion
comparison isolates the neuron ranking.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..config import Recipe
from ..core.adapter import vision_tower
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..core.models import create_model
from ..core.serialization import is_pruned_dir, load_pruned, save_pruned
from ..core.tp import build_dependency_graph, mlp_group, prune_mlps
from ..data.base import choose_disjoint, get_source
from ..data.digits import digits_splits
from ..data.transforms import batches
from ..distill import Distiller, TrainImages
from ..evaluate.cosine import cosine_to_original
from ..evaluate.extract import extract_features
from ..evaluate.features import knn_top1, linear_probe
from ..evaluate.identification import identification_rate
from ..evaluate.labelled import LabelledFeatures
from ..evaluate.original_knn import original_knn_top1
from ..evaluate.prototype import prototype_accuracy
from ..pretrain import train_simclr
from ..run.layout import RunDir
from ..search.greedy import keep_order
from ..search.pruner import AMPPruner
from ..utils.io import atomic_write, write_json
from .study_report import plot_study, study_markdown

CRITERIA = ("entropy", "one_hot", "magnitude")
# criteria at one budget (with distillation: recovery), sizings across budgets,
# validation-set size; `experiments` runs a subset
EXPERIMENTS = ("criteria", "budget", "val_size")
FIXED_SIDE = ("prototype", "original_knn", "identification", "cosine_to_original")
REFIT = ("knn", "linear")
METRICS = FIXED_SIDE + REFIT  # the order of the study's tables


@dataclass
class StudyConfig:
    out: Path
    recipe: Recipe  # the demo recipe: model, data, teacher training, AMP and distill settings
    seeds: tuple[int, ...] = (0, 1, 2)
    deep_depth: int = 8
    deep_epochs: int = 60
    budgets: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65)
    # sizes at each budget: the authors' rule (greedy entropy rise), uniform, and global
    # allocation by each search measure
    measures: tuple[str, ...] = ("kl", "cosine", "entropy_rise")
    distill_budgets: tuple[float, ...] = (0.2, 0.5)  # budget rows also distilled here
    distill_hows: tuple[str, ...] = ("authors", "uniform", "global_kl")
    criterion_budget: float = 0.5
    val_sizes: tuple[int, ...] = (64, 128, 256, 512, 768)
    tolerance: float = 0.02
    max_searches: int = 8
    distill_epochs: int = 4
    cache: Path = Path(".cache/study")
    teachers: tuple[str, ...] = ("demo", "deep")
    experiments: tuple[str, ...] = EXPERIMENTS
    deep_teacher_seed: int | None = None  # one deeper teacher for every seed (draws still vary)
    log: Callable[[str], None] = field(default=lambda msg: None)


# ---- teachers ------------------------------------------------------------------------------
def _train_teacher(recipe: Recipe, depth: int, epochs: int, seed: int, path: str) -> str:
    """One deeper SimCLR teacher (run in a worker process: training is single-threaded)."""
    spec = recipe.model.model_copy(update={"kwargs": {**recipe.model.kwargs, "depth": depth}})
    torch.manual_seed(seed)
    model = create_model(spec)
    d, t = recipe.data, recipe.train
    raw = digits_splits(d, 0, raw=True)["train"].images
    history = train_simclr(model, raw, d.image_size, d.mean, d.std, epochs, t.batch_size, t.lr,
                           t.temperature, seed, show_progress=False)
    save_pruned(model, path, meta={"simclr_loss": history, "seed": seed})
    return path


def teachers(cfg: StudyConfig) -> dict[str, dict[int, nn.Module]]:
    """{"demo": {seed: model}, "deep": {seed: model}}; deeper ones trained once, cached."""
    r = cfg.recipe
    out = {}
    if "demo" in cfg.teachers:
        demo = load_pruned(r.train.checkpoint).eval()
        out["demo"] = {s: demo for s in cfg.seeds}
    if "deep" not in cfg.teachers:
        return out
    fixed = cfg.deep_teacher_seed
    paths = {s: cfg.cache / f"deep{cfg.deep_depth}_e{cfg.deep_epochs}_seed"
                            f"{s if fixed is None else fixed}" for s in cfg.seeds}
    todo = sorted({s if fixed is None else fixed for s, p in paths.items()
                   if not is_pruned_dir(p)})
    if todo:
        cfg.log(f"training {len(todo)} teachers of {cfg.deep_depth} blocks "
                f"({cfg.deep_epochs} epochs each, 2 processes)")
        with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
            list(pool.map(_train_teacher, [r] * len(todo), [cfg.deep_depth] * len(todo),
                          [cfg.deep_epochs] * len(todo), todo,
                          [str(cfg.cache / f"deep{cfg.deep_depth}_e{cfg.deep_epochs}_seed{s}")
                           for s in todo]))
    out["deep"] = {s: load_pruned(p).eval() for s, p in paths.items()}
    return out


# ---- data and evaluation -------------------------------------------------------------------
@dataclass
class Draw:
    calib: list  # (images, labels) batches
    val_images: torch.Tensor
    batch_size: int

    def val(self, n: int | None = None) -> list[torch.Tensor]:
        x = self.val_images[:n] if n else self.val_images[:512]
        return batches(x, min(self.batch_size, len(x)))


def draw(cfg: StudyConfig, seed: int) -> Draw:
    d = cfg.recipe.data
    train = digits_splits(d, 0)["train"]
    order = choose_disjoint(len(train.images), d.calib_images, max(cfg.val_sizes), seed,
                            "the digits training split")
    calib, val = order[:d.calib_images], order[d.calib_images:]
    return Draw(batches(train.images[calib], d.batch_size, False, train.labels[calib]),
                train.images[val], d.batch_size)


class Probe:
    """Every metric of `METRICS` on the demo's fixed digits split: the fixed-side ones
    against the original teacher's features (extracted once per teacher), kNN top-1 and
    the linear probe re-fit on the model's own features."""

    def __init__(self, recipe: Recipe):
        self.split = digits_splits(recipe.data, 0)
        self.k, self.t = 20, 0.07
        self._originals: dict[int, tuple[nn.Module, LabelledFeatures]] = {}

    def features(self, model: nn.Module) -> LabelledFeatures:
        tr, te = self.split["train"], self.split["test"]
        return LabelledFeatures(extract_features(model, tr.images, show_progress=False),
                                tr.labels,
                                extract_features(model, te.images, show_progress=False),
                                te.labels)

    def original(self, teacher: nn.Module) -> LabelledFeatures:
        """The teacher's features, once (the teacher is kept so that its id stays its own)."""
        if id(teacher) not in self._originals:
            self._originals[id(teacher)] = (teacher, self.features(teacher))
        return self._originals[id(teacher)][1]

    def __call__(self, model: nn.Module, teacher: nn.Module) -> dict[str, float]:
        ref = self.original(teacher)
        own = ref if model is teacher else self.features(model)
        return {
            "prototype": prototype_accuracy(ref.train, ref.train_labels, own.test,
                                            own.test_labels),
            "original_knn": original_knn_top1(ref.train, ref.train_labels, own.test,
                                              own.test_labels, self.k, self.t),
            "identification": identification_rate(ref.test, own.test),
            "cosine_to_original": cosine_to_original(ref.test, own.test),
            "knn": knn_top1(*own.as_tuple(), self.k, self.t),
            "linear": linear_probe(*own.as_tuple()),
        }


# ---- the three criteria's neuron scores ----------------------------------------------------
def entropy_scores(cfg: StudyConfig, teacher: nn.Module, d: Draw) -> dict[str, torch.Tensor]:
    imp = AMPImportance(cfg.recipe.amp.inv_temperature, show_progress=False)
    return imp.accumulate(teacher, [x for x, _ in d.calib])


def one_hot_scores(cfg: StudyConfig, teacher: nn.Module, d: Draw) -> dict[str, torch.Tensor]:
    """Taylor scores of the cross-entropy of the digit labels through a linear head fitted
    (scikit-learn logistic regression) on the calibration images' features."""
    from sklearn.linear_model import LogisticRegression

    tower, adapter = vision_tower(teacher)
    images = torch.cat([x for x, _ in d.calib])
    labels = torch.cat([y for _, y in d.calib])
    feats = F.normalize(extract_features(teacher, images, show_progress=False), dim=1)
    clf = LogisticRegression(max_iter=1000, random_state=0).fit(feats.numpy(), labels.numpy())
    head = nn.Linear(feats.shape[1], len(clf.classes_))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(clf.coef_).float())
        head.bias.copy_(torch.from_numpy(clf.intercept_).float())
    head.requires_grad_(False)

    def logits(model, x):
        t, a = vision_tower(model)
        return head(F.normalize(a.features(t, x), dim=1))

    imp = AMPImportance(cfg.recipe.amp.inv_temperature, "one_hot", feature_fn=logits,
                        show_progress=False)
    return imp.accumulate(teacher, d.calib)


def magnitude_scores(teacher: nn.Module, d: Draw) -> dict[str, torch.Tensor]:
    """Torch-Pruning's MagnitudeImportance (L2 over the group: fc1 rows and fc2 columns)."""
    model = copy.deepcopy(teacher)
    tower, _ = vision_tower(model)
    dg = build_dependency_graph(tower, d.calib[0][0][:1])
    imp = tp.importance.MagnitudeImportance(p=2)
    return {n: imp(mlp_group(dg, v, range(v.hidden))).float().cpu()
            for n, v in find_mlps(tower).items()}


# ---- pruning -------------------------------------------------------------------------------
def amp_prune(cfg: StudyConfig, teacher: nn.Module, scores: dict, val: list,
              keep: float | None = None) -> tuple[nn.Module, dict]:
    """AMP on a copy of `teacher` with `scores` ranking the neurons: budget mode keeping
    `keep` of the MLP parameters, or the recipe's threshold when `keep` is None."""
    a = cfg.recipe.amp
    model = copy.deepcopy(teacher)
    imp = AMPImportance(a.inv_temperature, show_progress=False).load_scores(scores, model)
    target = None if keep is None else {"mlp_params": keep, "tolerance": cfg.tolerance,
                                        "max_searches": cfg.max_searches}
    result = AMPPruner(model, val[0][:1], imp, val, a.threshold, a.max_steps,
                       show_progress=False, target=target).step()
    return model, result.to_dict()


def global_prune(cfg: StudyConfig, teacher: nn.Module, scores: dict, val: list,
                 keep: float, measure: str) -> tuple[nn.Module, dict]:
    """Global allocation by `measure` keeping `keep` of the MLP parameters."""
    a = cfg.recipe.amp
    model = copy.deepcopy(teacher)
    imp = AMPImportance(a.inv_temperature, show_progress=False).load_scores(scores, model)
    target = {"mlp_params": keep, "tolerance": cfg.tolerance}
    result = AMPPruner(model, val[0][:1], imp, val, a.threshold, a.max_steps,
                       show_progress=False, target=target, measure=measure,
                       allocation="global").step()
    return model, result.to_dict()


def _reached(result: dict) -> bool:
    """Whether a budget-mode or global search met its target (uniform sizes always do)."""
    extra = result.get("extra") or {}
    return bool((extra.get("budget") or extra.get("allocation") or {}).get("reached", True))


def uniform_prune(teacher: nn.Module, scores: dict, mlp_params: int,
                  example: torch.Tensor) -> tuple[nn.Module, dict]:
    """The same MLP parameters kept in every block (top-scored neurons of each)."""
    model = copy.deepcopy(teacher)
    tower, _ = vision_tower(model)
    views = find_mlps(tower)
    fixed = sum(v.param_counts()[0] for v in views.values())
    per = sum(v.param_counts()[1] for v in views.values())
    size = max(1, round((mlp_params - fixed) / per))
    keep = {n: keep_order(scores[n])[:size].sort().values for n in views}
    sizes = prune_mlps(tower, example, keep)
    return model, {"hidden_sizes": sizes,
                   "mlp_params": sum(v.num_params() for v in find_mlps(tower).values())}


def distill(cfg: StudyConfig, teacher: nn.Module, student: nn.Module, work: Path,
            seed: int) -> nn.Module:
    """The recipe's distillation (DeepSpeed) of `student` from `teacher`, shortened."""
    r = cfg.recipe
    rd = RunDir(work)
    if rd.root.exists():
        shutil.rmtree(rd.root)
    save_pruned(student, rd.pruned)
    dcfg = r.distill.model_copy(update={"epochs": cfg.distill_epochs,
                                        "checkpoint_every": 10**6})
    images, tensor_input = get_source("digits").train_images(r.data, 0)
    # a copy: the Distiller freezes its teacher's parameters (requires_grad False), and
    # Torch-Pruning's dependency graph of a frozen model is empty
    distiller = Distiller(dcfg, copy.deepcopy(teacher), rd.pruned,
                          TrainImages(images, tensor_input, r.data.image_size, r.data.mean,
                                      r.data.std), rd.distill, seed=seed,
                          identity={"study": str(work)}, progress_bar=False)
    distiller.run()
    out = getattr(distiller, "distilled_model", None) or load_pruned(rd.distilled)
    shutil.rmtree(rd.distill.checkpoints, ignore_errors=True)
    return out.eval()


# ---- the experiments -----------------------------------------------------------------------
def _print(msg: str) -> None:
    print(msg, flush=True)


def _seed_rows(cfg: StudyConfig, seed: int) -> tuple[list[dict], dict[str, float]]:
    """Every experiment of one seed (a worker process: seeds run side by side)."""
    torch.set_num_threads(1)
    models = teachers(cfg)  # cached by now: loads only
    probe = Probe(cfg.recipe)
    work = cfg.out / "work"
    rows: list[dict] = []
    seconds: dict[str, float] = {}

    def timed(part: str, fn, *args):
        s = time.perf_counter()
        out = fn(*args)
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - s
        return out

    d = draw(cfg, seed)
    val = d.val()
    for name, by_seed in models.items():
        teacher = by_seed[seed]
        base = dict(teacher=name, seed=seed)
        cfg.log(f"seed {seed}, {name} teacher: scores")
        original = timed("evaluation", probe, teacher, teacher)
        rows.append(dict(base, experiment="original", **original))
        scores = {"entropy": timed("scores", entropy_scores, cfg, teacher, d),
                  "one_hot": timed("scores", one_hot_scores, cfg, teacher, d),
                  "magnitude": timed("scores", magnitude_scores, teacher, d)}
        # 1 + 3: criteria at equal kept MLP parameters, before and after distillation
        at_budget = {}  # the entropy run at the criterion budget is also a curve point
        for crit in CRITERIA if "criteria" in cfg.experiments else ():
            cfg.log(f"seed {seed}, {name} teacher: {crit} at {cfg.criterion_budget:.0%}")
            pruned, res = timed("search", amp_prune, cfg, teacher, scores[crit], val,
                                cfg.criterion_budget)
            acc = timed("evaluation", probe, pruned, teacher)
            if crit == "entropy":
                at_budget = {cfg.criterion_budget: (pruned, res)}
            student = timed("distillation", distill, cfg, teacher, pruned,
                            work / f"{name}_{seed}_{crit}", seed)
            after = timed("evaluation", probe, student, teacher)
            rows.append(dict(base, experiment="criterion", criterion=crit,
                             kept=res["mlp_params"]["after"] / res["mlp_params"]["before"],
                             hidden_sizes=res["hidden_sizes"], threshold=res["threshold"],
                             reached=res["extra"]["budget"]["reached"], **acc,
                             **{f"{k}_distilled": v for k, v in after.items()}))
        # 2: sizes at equal kept MLP parameters across budgets (entropy scores): the
        # authors' rule, uniform, and global allocation by each measure
        for keep in cfg.budgets if "budget" in cfg.experiments else ():
            cfg.log(f"seed {seed}, {name} teacher: sizes at {keep:.0%}")
            pruned, res = at_budget.get(keep) or timed(
                "search", amp_prune, cfg, teacher, scores["entropy"], val, keep)
            before = res["mlp_params"]["before"]
            # uniform keeps what the authors' rule kept, so the two compare at equal size
            uni, ures = uniform_prune(teacher, scores["entropy"], res["mlp_params"]["after"],
                                      val[0][:1])
            variants = [("authors", pruned, res["mlp_params"]["after"], res),
                        ("uniform", uni, ures["mlp_params"], ures)]
            for m in cfg.measures:
                g, gres = timed("search", global_prune, cfg, teacher, scores["entropy"], val,
                                res["mlp_params"]["after"] / before, m)
                variants.append((f"global_{m}", g, gres["mlp_params"]["after"], gres))
            for how, model, after, r in variants:
                row = dict(base, experiment="budget", how=how, budget=keep,
                           kept=after / before, hidden_sizes=r["hidden_sizes"],
                           reached=_reached(r),
                           **timed("evaluation", probe, model, teacher))
                if keep in cfg.distill_budgets and how in cfg.distill_hows:
                    student = timed("distillation", distill, cfg, teacher, model,
                                    work / f"{name}_{seed}_{how}_{keep}", seed)
                    row.update({f"{k}_distilled": v for k, v in
                                timed("evaluation", probe, student, teacher).items()})
                rows.append(row)
        # 4: validation-set size, at the recipe's threshold
        for n in cfg.val_sizes if "val_size" in cfg.experiments else ():
            cfg.log(f"seed {seed}, {name} teacher: {n} validation images")
            pruned, res = timed("search", amp_prune, cfg, teacher, scores["entropy"],
                                d.val(n))
            rows.append(dict(base, experiment="val_size", val_images=n,
                             kept=res["mlp_params"]["after"] / res["mlp_params"]["before"],
                             hidden_sizes=res["hidden_sizes"],
                             original_sizes=res["original_sizes"],
                             **timed("evaluation", probe, pruned, teacher)))
    return rows, seconds


def run_study(cfg: StudyConfig) -> dict:
    unknown = set(cfg.teachers) - {"demo", "deep"}
    if unknown or not cfg.teachers:
        raise ValueError(f"teachers: expected demo and/or deep, got {sorted(unknown)}")
    unknown = set(cfg.experiments) - set(EXPERIMENTS)
    if unknown or not cfg.experiments:
        raise ValueError(f"experiments: expected some of {', '.join(EXPERIMENTS)}, got "
                         f"{', '.join(sorted(unknown)) or 'none'}")
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    teachers(cfg)  # train the deeper teachers once, here
    seconds: dict[str, float] = {"teachers": time.perf_counter() - t0}
    rows: list[dict] = []
    # one process per seed: each single-threaded, so seeds use the cores side by side
    worker_cfg = replace(cfg, log=_print)
    with ProcessPoolExecutor(len(cfg.seeds), mp_context=get_context("spawn")) as pool:
        for seed_rows, secs in pool.map(_seed_rows, [worker_cfg] * len(cfg.seeds), cfg.seeds):
            rows += seed_rows
            for k, v in secs.items():
                seconds[k] = seconds.get(k, 0.0) + v
    shutil.rmtree(cfg.out / "work", ignore_errors=True)
    seconds["total"] = time.perf_counter() - t0
    config = _config_dict(cfg)
    result = {"config": config, "rows": rows, "summary": summarize(rows, config),
              "seconds": seconds, "processes": len(cfg.seeds)}
    write_json(cfg.out / "study.json", result)
    return _render(result, cfg.out)


def _render(result: dict, out: Path) -> dict:
    plots = plot_study(result, out)
    atomic_write(out / "study.md", study_markdown(result, plots))
    return result


def rerender(out: Path) -> dict:
    """Summary, study.md and plots again from the rows of `out/study.json` (no model runs)."""
    path = Path(out) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no study.json (run `amp study {out}` first)")
    result = json.loads(path.read_text())
    result["summary"] = summarize(result["rows"], result["config"])
    write_json(path, result)
    return _render(result, Path(out))


def _config_dict(cfg: StudyConfig) -> dict:
    a = cfg.recipe.amp
    return dict(seeds=list(cfg.seeds), deep_depth=cfg.deep_depth, deep_epochs=cfg.deep_epochs,
                budgets=list(cfg.budgets), criterion_budget=cfg.criterion_budget,
                measures=list(cfg.measures), distill_budgets=list(cfg.distill_budgets),
                distill_hows=list(cfg.distill_hows),
                val_sizes=list(cfg.val_sizes), tolerance=cfg.tolerance,
                max_searches=cfg.max_searches, distill_epochs=cfg.distill_epochs,
                threshold=a.threshold, inv_temperature=a.inv_temperature,
                max_steps=a.max_steps, calib_images=cfg.recipe.data.calib_images,
                teachers=list(cfg.teachers), experiments=list(cfg.experiments),
                deep_teacher_seed=cfg.deep_teacher_seed,
                demo_depth=cfg.recipe.model.kwargs.get("depth"))


# ---- aggregation -------------------------------------------------------------------------
def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired_differences(rows: list[dict], budgets, keys, reference: str = "uniform"
                       ) -> dict[str, list[dict]]:
    """Each sizing minus `reference` at the same budget and seed: mean and sd over seeds of
    the paired difference (the spread the study's claims are judged by)."""
    by = {(r["how"], r["budget"], r["seed"]): r for r in rows}
    out: dict[str, list[dict]] = {}
    for how in dict.fromkeys(r["how"] for r in rows):
        if how == reference:
            continue
        points = []
        for b in budgets:
            pairs = [(r, by[(reference, b, r["seed"])]) for r in rows
                     if r["how"] == how and r["budget"] == b
                     and (reference, b, r["seed"]) in by]
            diffs = {k: mean_sd([a[k] - u[k] for a, u in pairs]) for k in keys
                     if pairs and all(k in a and k in u for a, u in pairs)}
            points.append(dict(budget=b, **diffs))
        out[how] = points
    return out


def summarize(rows: list[dict], config: dict) -> dict:
    """Mean and standard deviation over seeds of every measured number (`config`: the
    study's settings as study.json records them)."""
    out: dict = {}
    ran = config.get("experiments", EXPERIMENTS)  # a study.json of an older version ran all

    def group(pred, keys):
        """Mean and sd of `keys` over the rows `pred` selects (keys the rows lack, as in
        a study.json of an older version, are left out)."""
        sel = [r for r in rows if pred(r)]
        return {k: mean_sd([r[k] for r in sel]) for k in keys
                if all(k in r for r in sel)} if sel else None

    def reached(pred) -> dict[str, int]:
        """In how many seeds budget mode met its target (rows that record it)."""
        sel = [r for r in rows if pred(r) and "reached" in r]
        return {"seeds": len(sel), "reached": sum(bool(r["reached"]) for r in sel)}

    for t in config["teachers"]:
        s = out[t] = {}
        s["original"] = group(lambda r: r["teacher"] == t and r["experiment"] == "original",
                              METRICS)
        s["criterion"] = {c: dict(group(
            lambda r, c=c: r["teacher"] == t and r.get("criterion") == c,
            ("kept", *METRICS, *(f"{m}_distilled" for m in METRICS))),
            **reached(lambda r, c=c: r["teacher"] == t and r.get("criterion") == c))
            for c in CRITERIA} if "criteria" in ran else {}
        budget_rows = [r for r in rows if r["teacher"] == t and r["experiment"] == "budget"]
        hows = list(dict.fromkeys(r["how"] for r in budget_rows))
        both = ("kept", *METRICS, *(f"{m}_distilled" for m in METRICS))
        s["budget"] = {how: [dict(budget=b, **(group(
            lambda r, b=b, how=how: r in budget_rows and r["how"] == how and r["budget"] == b,
            both) or {}), **reached(lambda r, b=b, how=how: r in budget_rows
                                    and r["how"] == how and r["budget"] == b))
            for b in config["budgets"]] for how in hows}
        s["paired"] = paired_differences(budget_rows, config["budgets"], both[1:])
        vs = []
        for n in config["val_sizes"] if "val_size" in ran else ():
            sel = [r for r in rows if r["teacher"] == t and r.get("val_images") == n]
            ref = {r["seed"]: r for r in rows if r["teacher"] == t
                   and r.get("val_images") == max(config["val_sizes"])}
            change = [statistics.fmean(abs(r["hidden_sizes"][b] - ref[r["seed"]]["hidden_sizes"][b])
                                       / r["original_sizes"][b] for b in r["hidden_sizes"])
                      for r in sel]
            vs.append(dict(val_images=n, size_change=mean_sd(change),
                           **{k: mean_sd([r[k] for r in sel]) for k in ("kept", *METRICS)
                              if all(k in r for r in sel)}))
        s["val_size"] = vs
    return out
