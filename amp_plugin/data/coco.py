"""COCO-style image-caption data: batches for the `clip_entropy` criterion
(docs/algorithm.md section 1).

Input: a COCO captions file (the 2014/2017 `captions_{train,val}20xx.json` format:
`images` [{id, file_name}], `annotations` [{image_id, caption}]) and its image folder.
Output: (image, text features) datasets in a fixed order; the text features come from the CLIP
model's own text tower, computed once without gradient (the criterion treats them as
constants). Calibration and validation images are disjoint and chosen by the seed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import DataConfig
from ..core.adapter import get_adapter
from ..utils.progress import progress
from .base import DataSource, register_source
from .digits import write_digit_images
from .images import load_rgb
from .transforms import eval_transform


def _check_id(path: Path, key: str, value) -> None:
    # ids are dictionary keys here: COCO's are integers; strings are taken as well
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"data.captions: {path}: {key} is {value!r} "
                         f"({type(value).__name__}), expected an integer or string id")


def read_captions(path: str | Path, root: str | Path) -> list[tuple[Path, list[str]]]:
    """[(image file, its captions)] in the file's image order; checks the format first."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"data.captions: {path} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data.captions: {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"data.captions: {path} is nested too deeply to be a COCO captions "
                         "file") from None
    if not isinstance(raw, dict) or not {"images", "annotations"} <= raw.keys() or not all(
            isinstance(raw[k], list) for k in ("images", "annotations")):
        raise ValueError(f"data.captions: {path} is not a COCO captions file "
                         "(expected top-level lists 'images' and 'annotations')")
    captions: dict[int | str, list[str]] = defaultdict(list)
    for i, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"data.captions: {path}: annotations[{i}] needs 'image_id' "
                             "and 'caption'")
        _check_id(path, f"annotations[{i}].image_id", ann["image_id"])
        if not isinstance(ann["caption"], str) or not ann["caption"].strip():
            raise ValueError(f"data.captions: {path}: annotations[{i}].caption is "
                             f"{ann['caption']!r}, expected a non-empty string (image_id "
                             f"{ann['image_id']!r})")
        captions[ann["image_id"]].append(ann["caption"].strip())
    out = []
    for i, im in enumerate(raw["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"data.captions: {path}: images[{i}] needs 'id' and 'file_name'")
        _check_id(path, f"images[{i}].id", im["id"])
        name = im["file_name"]
        if not isinstance(name, str) or not name or Path(name).is_absolute() or (
                ".." in Path(name).parts):
            raise ValueError(f"data.captions: {path}: images[{i}].file_name is {name!r}, "
                             "expected a file name relative to data.root")
        if captions.get(im["id"]):
            out.append((root / name, captions[im["id"]]))
    if not out:
        raise ValueError(f"data.captions: {path} has no captioned images")
    return out


@torch.no_grad()
def encode_captions(model: nn.Module, captions: list[str], batch_size: int = 256,
                    show_progress: bool = True) -> torch.Tensor:
    """Text features (N, D) of `captions`, float32, no gradient."""
    try:
        side = get_adapter(model).image_text(model)
        tokenizer = side.tokenizer()
    except (TypeError, ValueError) as e:
        raise TypeError(f"criterion clip_entropy needs an image-text model with a text tower "
                        f"and its tokenizer, got {type(model).__name__} (image_only models "
                        f"have none): {e}") from None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [captions[i:i + batch_size] for i in range(0, len(captions), batch_size)]
    out = [side.encode_text(tokenizer(c).to(device)).float().cpu()
           for c in progress(chunks, "encoding captions", show_progress)]
    model.train(was_training)
    return torch.cat(out)


class CaptionedImages(Dataset):
    """(image read lazily from its file, text features) items."""

    def __init__(self, files: list[Path], text: torch.Tensor, cfg: DataConfig):
        self.files, self.text = files, text
        self.tf = eval_transform(cfg.image_size, cfg.mean, cfg.std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(load_rgb(self.files[i])), self.text[i]


def caption_datasets(cfg: DataConfig, seed: int, model: nn.Module, show_progress: bool = True
                     ) -> tuple[CaptionedImages, CaptionedImages]:
    """(calibration, validation) datasets of (image, text features) items.

    One caption per image, drawn with the recipe's seed; calibration and validation images
    are disjoint. Every chosen file is checked before any work starts; the images are read
    as they are needed."""
    if cfg.kind != "coco" or not cfg.captions or not cfg.root:
        raise ValueError("caption batches need data.kind: coco with data.root and data.captions")
    items = read_captions(cfg.captions, cfg.root)
    n_calib = len(items) - cfg.val_images if cfg.calib_images == "all" else cfg.calib_images
    need = n_calib + cfg.val_images
    if need > len(items):
        raise ValueError(f"data.captions has {len(items)} captioned images, fewer than the "
                         f"{need} that calib_images + val_images ask for")
    rng = random.Random(seed + 1)
    chosen = rng.sample(range(len(items)), need)
    files, texts = [], []
    for i in chosen:
        file, caps = items[i]
        if not file.is_file():
            raise FileNotFoundError(f"data.root: image {file} named in data.captions is missing")
        files.append(file)
        texts.append(caps[rng.randrange(len(caps))])
    text_t = encode_captions(model, texts, show_progress=show_progress)
    c = n_calib
    return (CaptionedImages(files[:c], text_t[:c], cfg),
            CaptionedImages(files[c:], text_t[c:], cfg))


@register_source
class Coco(DataSource):
    """Images with captions; the text features come from the model's own text tower."""

    name = "coco"
    gives = frozenset({"text"})
    required_keys = ("root", "captions")

    def check(self, cfg):
        read_captions(cfg.captions, cfg.root)

    def amp_datasets(self, cfg, seed, extra=None, model=None, show_progress=True):
        if model is None:
            raise ValueError("data.kind coco: caption batches need the CLIP model (its text "
                             "tower encodes the captions)")
        return caption_datasets(cfg, seed, model, show_progress=show_progress)

    def example(self, root):
        paths = write_digit_images(root / "images", range(0, 300))
        images = [{"id": i, "file_name": str(p.relative_to(root / "images"))}
                  for i, p in enumerate(paths)]
        anns = [{"id": 2 * i + k, "image_id": i, "caption": f"{text} {p.parent.name}"}
                for i, p in enumerate(paths)
                for k, text in enumerate(("a handwritten digit", "the number"))]
        captions = root / "captions.json"
        captions.write_text(json.dumps({"images": images, "annotations": anns}))
        return {"kind": "coco", "root": str(root / "images"), "captions": str(captions),
                "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "calib_images": 128,
                "val_images": 128, "batch_size": 64, "workers": 2}
