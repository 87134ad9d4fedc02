"""The demo teacher a recipe's `train:` section stands for: which saved one to use, and
training one.

A saved teacher named by `train.checkpoint` (the committed demo teacher, or the user's) is
read-only input: it is used when its fingerprint matches the train settings and is never
written. A teacher the train stage makes goes into the run directory (`RunDir.teacher`)
and later stages, in this process or another, load it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Recipe
from ..core.models import create_model
from ..core.serialization import is_pruned_dir, read_manifest
from ..utils.io import fingerprint


def teacher_fingerprint(recipe: Recipe) -> str:
    """What the trained teacher depends on: the model, the train settings and seed, and
    the digits split it sees. The calibration/validation sizes and the recipe's seed (the
    draw) are not part of it, so varying them never retrains the teacher."""
    r = recipe
    t, d = r.train, r.data
    if t is None:
        raise ValueError("the recipe has no `train:` section")
    # The order and content of these parts are those the committed demo teacher was
    # fingerprinted with (one seed then, now train.seed), so it still matches.
    parts = [r.model, t.model_dump(exclude={"checkpoint", "seed"}), d.kind, d.image_size,
             d.mean, d.std, d.test_fraction, t.seed]
    split = t.seed if d.split_seed is None else d.split_seed
    if split != t.seed:
        parts.append({"split_seed": split})
    return fingerprint(*parts)


def saved_fingerprint(path: str | Path) -> str | None:
    """The fingerprint a saved teacher was written with (None: no saved model there)."""
    if not is_pruned_dir(path):
        return None
    return read_manifest(path)["meta"].get("fingerprint")


@dataclass(frozen=True)
class TeacherChoice:
    path: Path          # where the teacher is read from (or the train stage writes it)
    ready: bool         # a saved teacher with the recipe's fingerprint is there
    committed: bool     # it is the read-only train.checkpoint
    why_not: str        # when not ready: what was looked at and found wanting


def choose_teacher(recipe: Recipe, run_teacher: Path) -> TeacherChoice:
    """`train.checkpoint` when it matches the train settings, else the run directory's
    teacher (`run_teacher`), ready or not."""
    fp = teacher_fingerprint(recipe)
    ckpt = recipe.train.checkpoint
    reasons = []
    if ckpt:
        found = saved_fingerprint(ckpt)
        if found == fp:
            return TeacherChoice(Path(ckpt), True, True, "")
        reasons.append(f"train.checkpoint {ckpt} " + (
            "holds no saved model" if found is None else
            f"was trained with other settings (fingerprint {found}, the recipe's {fp})"))
    found = saved_fingerprint(run_teacher)
    if found == fp:
        return TeacherChoice(run_teacher, True, False, "")
    reasons.append(f"{run_teacher} " + ("holds no trained teacher" if found is None else
                                         f"was trained with other settings (fingerprint "
                                         f"{found}, the recipe's {fp})"))
    return TeacherChoice(run_teacher, False, False, "; ".join(reasons))


def train_teacher(recipe: Recipe, show_progress: bool = True) -> tuple[nn.Module, list[float]]:
    """A teacher trained with SimCLR on the digits training split, as the recipe's train
    section says; returns the model (eval mode) and the mean loss of every epoch."""
    from ..data.digits import digits_splits
    from ..pretrain import train_simclr

    r, t = recipe, recipe.train
    if r.data.kind != "digits":
        raise ValueError("the train stage pre-trains the demo teacher on data.kind: digits")
    torch.manual_seed(t.seed)  # the teacher's initialisation
    model = create_model(r.model)
    raw = digits_splits(r.data, t.seed, raw=True)["train"].images
    history = train_simclr(model, raw, r.data.image_size, r.data.mean, r.data.std, t.epochs,
                           t.batch_size, t.lr, t.temperature, t.seed, show_progress)
    return model.eval(), history
