"""The image-text side of Hugging Face transformers `CLIPModel` and `SiglipModel`: the
model's own `get_image_features` / `get_text_features`, with the tokenizer and image
processor saved (`save_pretrained`) in the model's folder, read strictly offline.

The folder's tokenizer and processor files are read as plain data first: a file naming
code of its own (`auto_map`, `trust_remote_code`) or a hub address is refused, naming the
file and key, before transformers reads them; transformers then builds only its own
classes (`trust_remote_code=False`, `local_files_only=True`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import ImageText
from ..core.models import plain_errors

TOKENIZER_CONFIG, PREPROCESSOR_CONFIG = "tokenizer_config.json", "preprocessor_config.json"
# the files by which transformers picks a tokenizer's or processor's class
CLASS_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json", PREPROCESSOR_CONFIG,
               "processor_config.json")


def check_class_files(folder: Path) -> None:
    """Refuse the folder's tokenizer / processor configs if they are not plain data or name
    code shipped with the folder or a hub address (nothing is imported here)."""
    errors = []
    for name in CLASS_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_bytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            errors.append(f"{f}: not valid JSON ({e})")
            continue
        errors += plain_errors(data, str(f))
    if errors:
        raise ValueError("; ".join(errors))


def _pooled(out: Any) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as `pooler_output` of a model output;
    # earlier versions returned the tensor itself
    return out.pooler_output if hasattr(out, "pooler_output") else out


class Tokenize:
    """texts -> the BatchEncoding the text tower takes: padded to the text tower's length
    (SigLIP was trained on max-length padding and pools the last token), truncated to it."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length

    def __call__(self, texts):
        return self.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.length, return_tensors="pt")


class Preprocess:
    """A transformers image processor as a dataset transform: PIL image -> (3, H, W)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFImageText(ImageText):
    """A transformers image-text model: its own image and text features, the tokenizer and
    image processor of its folder (`model.path`)."""

    processor = ""  # the processor class a folder without preprocessor_config.json gets
    pools_at_eos = False  # the text tower pools the end-of-text token (CLIP)

    def encode_image(self, images):
        return _pooled(self.model.get_image_features(pixel_values=images))

    def encode_text(self, tokens):
        return _pooled(self.model.get_text_features(**tokens))

    def folder(self) -> Path | None:
        path = (getattr(self.model, "amp_spec", None) or {}).get("path")
        return None if path is None else Path(path).expanduser()

    def tokenizer(self):
        folder = self.folder()
        name = type(self.model).__name__
        if folder is None:
            raise ValueError(f"{name} has no model folder (model.path) to read its tokenizer "
                             "from (a model built from a config, or a pruned model: its "
                             "tokenizer is the original's)")
        if not (folder / TOKENIZER_CONFIG).is_file():
            raise ValueError(f"path: {folder} has no {TOKENIZER_CONFIG}: save the tokenizer "
                             "there with save_pretrained (it is read from the model folder, "
                             "never from the hub)")
        check_class_files(folder)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                trust_remote_code=False)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"path: {folder}: the tokenizer cannot be read "
                             f"({str(e).splitlines()[0]})") from None
        self._check_fits(tok, folder)
        return Tokenize(tok, self.model.config.text_config.max_position_embeddings)

    def _check_fits(self, tok, folder: Path) -> None:
        """Refuse a tokenizer whose ids the text tower cannot take (an index error later,
        or features pooled at the wrong token)."""
        cfg = self.model.config.text_config
        if len(tok) > cfg.vocab_size:
            raise ValueError(f"path: {folder}: the tokenizer has {len(tok)} tokens, the text "
                             f"tower's vocabulary {cfg.vocab_size} (text_config.vocab_size)")
        # eos_token_id 2 is transformers' legacy CLIP config: it pools the highest id
        if self.pools_at_eos and cfg.eos_token_id != 2 and tok.eos_token_id != cfg.eos_token_id:
            raise ValueError(f"path: {folder}: the tokenizer's end-of-text id is "
                             f"{tok.eos_token_id}, the text tower pools id {cfg.eos_token_id} "
                             "(text_config.eos_token_id)")

    def transform(self):
        import transformers

        folder = self.folder()
        if folder is not None and (folder / PREPROCESSOR_CONFIG).is_file():
            check_class_files(folder)
            try:
                processor = transformers.AutoImageProcessor.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"path: {folder}: the image processor cannot be read "
                                 f"({str(e).splitlines()[0]})") from None
        else:  # the class's own defaults at the vision tower's size
            processor = getattr(transformers, self.processor)(
                **self.sizes(self.model.config.vision_config.image_size))
        return Preprocess(processor)

    def sizes(self, size: int) -> dict:
        raise NotImplementedError


class HFClipImageText(HFImageText):
    processor = "CLIPImageProcessor"
    pools_at_eos = True

    def sizes(self, size):
        return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


class HFSiglipImageText(HFImageText):
    processor = "SiglipImageProcessor"

    def sizes(self, size):
        return {"size": {"height": size, "width": size}}

