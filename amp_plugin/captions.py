"""Image-caption batches for the `clip_entropy` criterion (ALGORITHM.md section 1).

Input: a COCO captions file (the 2014/2017 `captions_{train,val}20xx.json` format:
`images` [{id, file_name}], `annotations` [{image_id, caption}]) and its image folder.
Output: fixed (images, text features) batches; the text features come from the CLIP
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

from .progress import progress
from .recipe import DataConfig, Recipe


def read_captions(path: str | Path, root: str | Path) -> list[tuple[Path, list[str]]]:
    """[(image file, its captions)] in the file's image order; checks the format first."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"data.captions: {path} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"data.captions: {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not {"images", "annotations"} <= raw.keys():
        raise ValueError(f"data.captions: {path} is not a COCO captions file "
                         "(expected top-level keys 'images' and 'annotations')")
    captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"data.captions: {path}: annotations[{i}] needs 'image_id' "
                             "and 'caption'")
        captions[ann["image_id"]].append(str(ann["caption"]).strip())
    out = []
    for i, im in enumerate(raw["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"data.captions: {path}: images[{i}] needs 'id' and 'file_name'")
        if captions.get(im["id"]):
            out.append((root / im["file_name"], captions[im["id"]]))
    if not out:
        raise ValueError(f"data.captions: {path} has no captioned images")
    return out


def _transform(cfg: DataConfig):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(cfg.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.image_size),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])


def tokenizer_for(model: nn.Module):
    """open_clip's tokenizer for the model's text tower (local BPE vocabulary only)."""
    from open_clip.tokenizer import SimpleTokenizer

    from .zoo import model_config

    spec = getattr(model, "amp_spec", None)
    if spec is None:
        raise ValueError("the CLIP model has no construction spec (build it with create_model)")
    text_cfg = model_config(spec["name"], {k: v for k, v in spec.get("kwargs", {}).items()
                                           if k == "text_cfg"})["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{spec['name']}: Hugging Face tokenizers need the hub; only "
                         "open_clip's bundled BPE tokenizer is supported")
    return SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                           **text_cfg.get("tokenizer_kwargs", {}))


@torch.no_grad()
def encode_captions(model: nn.Module, captions: list[str], batch_size: int = 256,
                    show_progress: bool = True) -> torch.Tensor:
    """Text features (N, D) of `captions`, float32, no gradient."""
    if not hasattr(model, "encode_text"):
        raise TypeError(f"criterion clip_entropy needs a CLIP model with a text tower, got "
                        f"{type(model).__name__} (image_only models have none)")
    tokenizer = tokenizer_for(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = [captions[i:i + batch_size] for i in range(0, len(captions), batch_size)]
    out = [model.encode_text(tokenizer(c).to(device)).float().cpu()
           for c in progress(chunks, "encoding captions", show_progress)]
    model.train(was_training)
    return torch.cat(out)


def caption_batches(recipe: Recipe, model: nn.Module, show_progress: bool = True
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
    """(calibration, validation) lists of (images, text features) global batches.

    One caption per image, drawn with the recipe's seed; the last incomplete validation
    batch is dropped (ALGORITHM.md 3), calibration keeps it."""
    from PIL import Image

    cfg = recipe.data
    if cfg.kind != "coco" or not cfg.captions or not cfg.root:
        raise ValueError("caption batches need data.kind: coco with data.root and data.captions")
    items = read_captions(cfg.captions, cfg.root)
    need = cfg.calib_images + cfg.val_images
    if need > len(items):
        raise ValueError(f"data.captions has {len(items)} captioned images, fewer than the "
                         f"{need} that calib_images + val_images ask for")
    rng = random.Random(recipe.seed + 1)
    chosen = rng.sample(range(len(items)), need)
    tf = _transform(cfg)
    images, texts = [], []
    for i in progress(chosen, "reading COCO images", show_progress):
        file, caps = items[i]
        if not file.is_file():
            raise FileNotFoundError(f"data.root: image {file} named in data.captions is missing")
        with Image.open(file) as im:
            images.append(tf(im.convert("RGB")))
        texts.append(caps[rng.randrange(len(caps))])
    images_t = torch.stack(images)
    text_t = encode_captions(model, texts, show_progress=show_progress)

    def split(lo: int, hi: int, drop_last: bool):
        bs = cfg.batch_size
        end = hi - ((hi - lo) % bs if drop_last else 0)
        return [(images_t[i:min(i + bs, end)], text_t[i:min(i + bs, end)])
                for i in range(lo, end, bs)]

    return split(0, cfg.calib_images, False), split(cfg.calib_images, need, True)
