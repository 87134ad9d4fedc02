"""The model sweep behind `amp bench models` (and the fast subset in the tests): every
ViT-like model timm and open_clip can build, at reduced depth and width with random
weights, either pruned end to end (find_mlps, score, search, physical prune, save/load
giving the same outputs) or refused with AMP's documented error (`UnsupportedModel`).

timm's own tests walk `timm.list_models()` the same way.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.adapter import UnsupportedModel, vision_tower
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..core.models import create_model
from ..core.serialization import load_pruned, save_pruned
from ..data import digits_raw, to_model_input
from ..search.pruner import AMPPruner
from ..utils.progress import progress

# timm's model modules of transformer families with one token sequence through a stack of
# blocks (timm registers every model under its module). A module without an adapter is
# swept too: its models must be refused clearly. CNNs, MLP-Mixers and hierarchical windowed
# transformers are left out (the families tests check their refusal on a few).
TIMM_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid",
                    "vision_transformer_relpos", "vision_transformer_sam", "deit", "eva",
                    "timm_eva", "beit", "cait", "xcit", "naflexvit", "vitamin", "pit", "levit",
                    "convit", "crossvit", "tnt", "volo", "qwen3_vit", "gemma4_vit",
                    "deepseek_vit")
# architecture arguments that shrink a model; a model that refuses one is built without it
SMALL = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}
# per-name extras some families need to build small (GQA head counts per block, ...)
EXTRA = {"sapiens2": {"num_kv_heads": 2}, "cait": {"depth_token_only": 1},
         "deepseek_vit": {"patch_size": 8}, "intern300m": {"patch_size": 8},
         "gemma4_vit": {"patch_size": 8, "pooling_kernel_size": 2},
         "convit": {"local_up_to_layer": 1}}
SIZE = 32


@dataclass
class SweepRow:
    library: str
    name: str
    family: str  # the adapter that drove it, or the model class when refused
    mlp_kinds: str
    status: str  # ok | refused | not built | error
    detail: str


def timm_vit_names() -> list[str]:
    """Every model timm registers under one of TIMM_VIT_MODULES (those this timm has)."""
    import timm
    from timm.models import list_modules

    have = set(list_modules())
    return sorted({n for m in TIMM_VIT_MODULES if m in have for n in timm.list_models(module=m)})


def open_clip_names() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def transformers_names() -> list[str]:
    """The small transformers models swept: one per adapter and MLP layout."""
    from ..families.transformers_vision import SMALL_MODELS

    return list(SMALL_MODELS)


def small_spec(library: str, name: str, drop: Iterable[str] = ()) -> dict:
    """A ModelSpec dict of `name` at 32x32 input, 2 blocks, width 64 (minus `drop`)."""
    if library == "transformers":  # already small: the family's own small configs
        from ..families.transformers_vision import SMALL_MODELS

        return copy.deepcopy(SMALL_MODELS[name])
    small = {k: v for k, v in SMALL.items() if k not in set(drop)}
    for key, extra in EXTRA.items():
        if key in name:
            small.update(extra)
    if library == "timm":
        return {"library": "timm", "name": name, "kwargs": {**small, "num_classes": 0}}
    import open_clip

    vision = open_clip.get_model_config(name)["vision_cfg"]
    if vision.get("timm_model_name"):
        v = {"image_size": SIZE, "timm_model_kwargs": small}
    elif isinstance(vision.get("layers"), (list, tuple)):  # a ResNet tower: keep its stages
        v = {"image_size": 64}
    else:
        v = {"image_size": SIZE, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    return {"library": "open_clip", "name": name,
            "kwargs": {"image_only": True, "embed_dim": 32, "vision_cfg": v}}


def _build(library: str, name: str):
    """The smallest variant that builds: drop width, then all shrinking arguments."""
    errors = []
    for drop in ((), ("embed_dim", "num_heads"), tuple(SMALL)):
        spec = small_spec(library, name, drop)
        try:
            torch.manual_seed(0)
            return create_model(spec).eval(), spec
        except Exception as e:  # noqa: BLE001  (a sweep reports every failure as a row)
            errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError(errors[0])


def _input_size(tower) -> int:
    """The square input size the tower was built for (timm `patch_embed.img_size`, open_clip
    `image_size`)."""
    for owner in (tower, getattr(tower, "trunk", None)):
        for holder in (getattr(owner, "patch_embed", None), owner):
            size = getattr(holder, "img_size", None) or getattr(holder, "image_size", None)
            if size is not None:
                return int(size[0] if isinstance(size, (tuple, list)) else size)
    return SIZE


def _images(n: int, size: int) -> torch.Tensor:
    x, _ = digits_raw()
    return to_model_input(x[:n], size, (0.5,) * 3, (0.5,) * 3)


def sweep_one(library: str, name: str, work_dir: Path, images: int = 48) -> SweepRow:
    """Prune one model end to end (or record its refusal); never raises."""
    try:
        model, spec = _build(library, name)
    except Exception as e:  # noqa: BLE001
        return SweepRow(library, name, "", "", "not built", str(e).splitlines()[0][:160])
    try:
        tower, adapter = vision_tower(model)
    except UnsupportedModel as e:
        return SweepRow(library, name, type(model).__name__, "", "refused", str(e)[:300])
    kinds = ",".join(sorted({v.kind for v in find_mlps(tower).values()}))
    try:
        x = _images(images, _input_size(tower))
        third = images // 3
        imp = AMPImportance(20.0, show_progress=False)
        imp.accumulate(model, [x[:third]])
        result = AMPPruner(model, x[:1], imp, [x[third:2 * third], x[2 * third:]],
                           threshold=5e-3, max_steps=2, show_progress=False).step()
        with torch.no_grad():
            want = adapter.features(tower, x[:4])
        save_pruned(model, work_dir / name)
        loaded = load_pruned(work_dir / name)
        t2, a2 = vision_tower(loaded)
        with torch.no_grad():
            got = a2.features(t2, x[:4])
        if not torch.allclose(got, want, rtol=0, atol=1e-5):
            raise AssertionError(f"loaded model differs by {float((got - want).abs().max())}")
        removed = 1 - result.mlp_params["after"] / result.mlp_params["before"]
        kept = f"; kept whole: {', '.join(result.kept_whole)}" if result.kept_whole else ""
        return SweepRow(library, name, adapter.family, kinds, "ok",
                        f"{len(result.hidden_sizes)} MLPs, {removed:.0%} MLP params "
                        f"removed{kept}")
    except UnsupportedModel as e:
        return SweepRow(library, name, adapter.family, kinds, "refused", str(e)[:300])
    except Exception as e:  # noqa: BLE001
        return SweepRow(library, name, adapter.family, kinds, "error",
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def sweep(names: Iterable[tuple[str, str]], show_progress: bool = True) -> list[dict]:
    """Rows (as dicts) for (library, name) pairs, in order."""
    names = list(names)
    rows = []
    with tempfile.TemporaryDirectory(prefix="amp-sweep-") as tmp:
        for i in progress(range(len(names)), "model sweep", enabled=show_progress):
            library, name = names[i]
            rows.append(asdict(sweep_one(library, name, Path(tmp))))
    return rows


# the fast subset `make test` sweeps: the first registered model matching each pattern, one
# per family and layout (the whole sweep is `amp bench models`)
FAST = (("timm", "vit_small_patch16_224"), ("timm", "vit_base_patch16_siglip_224"),
        ("timm", "vit_pe_core_tiny_patch16_384"), ("timm", "vit_so150m_patch16_reg4_map_256"),
        ("timm", "vit_base_patch16_sapiens2"), ("timm", "vit_small_patch16_18x2_224"),
        ("timm", "vit_base_patch16_xp_224"), ("timm", "vitamin_small_224"),
        ("timm", "beitv2_base_patch16_224"), ("timm", "cait_xxs24_224"),
        ("timm", "vit_relpos_small_patch16_224"), ("timm", "eva02_tiny_patch14_224"),
        ("timm", "vit_small_patch14_dinov2"), ("timm", "xcit_tiny_12_p16_224"),
        ("timm", "naflexvit_base_patch16_map"), ("timm", "samvit_base_patch16"),
        ("timm", "qwen3_vit_88m_merge"), ("timm", "deepseek_vit_412m_enc"),
        ("timm", "gemma4_vit_167m_enc"), ("timm", "convit_tiny"), ("timm", "volo_d1_224"),
        ("open_clip", "ViT-B-16-SigLIP2"), ("open_clip", "PE-Core-T-16-384"),
        ("open_clip", "ViTamin-S"), ("open_clip", "ViT-B-32"), ("open_clip", "RN50"),
        ("open_clip", "convnext_base"),
        *(("transformers", n) for n in ("CLIPModel", "SiglipVisionModel",
                                        "Dinov2Model-swiglu", "ViTModel")))


def all_models() -> list[tuple[str, str]]:
    return ([("timm", n) for n in timm_vit_names()]
            + [("open_clip", n) for n in open_clip_names()]
            + [("transformers", n) for n in transformers_names()])


def summary(rows: list[dict]) -> list[dict]:
    """One row per (library, family, MLP kinds, status) with the count and an example."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["library"], r["family"], r["mlp_kinds"], r["status"])
        g = groups.setdefault(key, {"library": r["library"], "family": r["family"],
                                    "mlp_kinds": r["mlp_kinds"], "status": r["status"],
                                    "models": 0, "example": r["name"], "detail": r["detail"]})
        g["models"] += 1
    order = {"ok": 0, "refused": 1, "not built": 2, "error": 3}
    libraries = {"timm": 0, "open_clip": 1}
    return sorted(groups.values(), key=lambda g: (libraries.get(g["library"], 2),
                                                  order[g["status"]], -g["models"],
                                                  g["family"]))


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def sweep_markdown(rows: list[dict], groups: list[dict], seconds: float) -> str:
    """The summary table (one row per family, MLP kinds and status), then every model."""
    import open_clip
    import timm
    import transformers

    lines = ["# Every ViT of timm and open_clip, and transformers' vision encoders, through "
             "AMP", "",
             f"`amp bench models`: {len(rows)} models (timm {timm.__version__}, open_clip "
             f"{open_clip.__version__}, transformers {transformers.__version__}, torch "
             f"{torch.__version__}) in {seconds / 60:.1f} min. "
             "Each is built at 32x32 input, 2 blocks and width 64 where it accepts them, with "
             "random weights, then scored, searched (threshold 5e-3, 2 steps), physically "
             "pruned, saved and loaded (outputs equal to 1e-5), or refused with "
             "`amp.UnsupportedModel` before any work. The share of MLP parameters removed "
             "only shows the mechanics (random weights).", "",
             "| library | family | MLP kind | status | models | example | detail |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['library']} | {g['family']} | {g['mlp_kinds']} | {g['status']} | "
              f"{g['models']} | `{g['example']}` | {_cell(g['detail'])} |" for g in groups]
    lines += ["", "## Every model", "", "| library | model | family | MLP kind | status | detail |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['library']} | `{r['name']}` | {r['family']} | {r['mlp_kinds']} | "
              f"{r['status']} | {_cell(r['detail'])} |" for r in rows]
    return "\n".join(lines) + "\n"
