"""Zero-shot evaluation of Hugging Face transformers CLIPModel and SiglipModel: the model's
own text tower, with the tokenizer and image processor saved in its folder (a small BPE
trained here with `tokenizers`, wrapped as transformers' CLIPTokenizer; random weights),
checked against a direct computation with transformers; an `amp run` end to end; vision-only
models and tokenizer files naming code of their own refused before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import amp_plugin as amp
from amp_plugin.config import DataConfig, EvalConfig
from amp_plugin.core.cost import count_mlp_params
from amp_plugin.data import get_source
from amp_plugin.data.digits import DIGIT_NAMES, write_digit_images
from amp_plugin.evaluate import EvalContext, evaluate_models, get_task, text_classifier
from amp_plugin.families.transformers_vision import TINY, HFClip

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TEXT_LENGTH = 24


def _example_eval(root: Path) -> dict:
    """The eval section of both zero-shot tasks: the classification task's example (100
    digits in class folders) and 40 other digits with two captions each."""
    images, annotations = [], []
    for i, path in enumerate(write_digit_images(root / "retrieval", range(100, 140))):
        images.append({"id": i, "file_name": str(path.relative_to(root / "retrieval"))})
        annotations += [{"id": 2 * i + k, "image_id": i, "caption": f"{text} {path.parent.name}"}
                        for k, text in enumerate(("a handwritten digit", "the number"))]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return {**get_task("zeroshot_classification").example(root),
            "zeroshot_retrieval": [{"name": "digits", "root": str(root / "retrieval"),
                                    "captions": str(captions)}]}


def _corpus(section: dict) -> list[str]:
    """Every text the zero-shot tasks will tokenize: templates x class names, captions."""
    templates = section["zeroshot_classification"][0]["templates"]
    texts = [t.format(c=name) for name in DIGIT_NAMES for t in templates]
    captions = json.loads(Path(section["zeroshot_retrieval"][0]["captions"]).read_text())
    return texts + [a["caption"] for a in captions["annotations"]]


def clip_tokenizer(corpus: list[str]):
    """A byte-level BPE trained on `corpus` (CLIP's word-end suffix and pre-tokenizer),
    as transformers' CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token=EOT, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[SOT, EOT], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges)


def _config(cls: str, tok) -> dict:
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": TEXT_LENGTH,
            "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}
    if cls == "CLIPModel":
        return {"projection_dim": 32, "vision_config": {**TINY, "intermediate_size": 128},
                "text_config": {**text, "bos_token_id": tok.bos_token_id}}
    # SigLIP has no visual projection: the text head maps into the vision width
    return {"vision_config": {**TINY, "intermediate_size": 128},
            "text_config": {**text, "bos_token_id": tok.bos_token_id,
                            "projection_size": TINY["hidden_size"]}}


def write_folder(folder: Path, cls: str, corpus: list[str], seed: int = 0) -> Path:
    """A save_pretrained folder: the model (random weights), its tokenizer, and (CLIP) its
    image processor; SigLIP's folder has none, so it gets its class's defaults."""
    import transformers

    tok = clip_tokenizer(corpus)
    torch.manual_seed(seed)
    model = amp.create_model({"library": "transformers", "name": cls,
                              "kwargs": _config(cls, tok)}).eval()
    with torch.no_grad():  # wider than transformers' init: the predictions differ by image
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if cls == "CLIPModel":
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={
            "height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hf_zs_data")
    return root, _example_eval(root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_zs")
    corpus = _corpus(data[1])
    return {cls: write_folder(root / cls, cls, corpus) for cls in ("CLIPModel", "SiglipModel")}


def _context(tmp_path: Path) -> EvalContext:
    digits = get_source("digits")
    return EvalContext(DataConfig(**digits.example(tmp_path)), digits, 0, torch.device("cpu"),
                       tmp_path / "classifiers", show_progress=False)


# ---- direct computations with transformers -------------------------------------------------
@torch.no_grad()
def direct_zero_shot(model, folder: Path, root: Path, templates: list[str],
                     processor=None) -> dict:
    """Top-1 / top-5 in % of `model` on the image folder `root`: transformers' own
    tokenizer, image processor, get_text_features and get_image_features, normalised."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if processor is None:
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder),
                                                                    local_files_only=True)
    classes = sorted(p.name for p in root.iterdir())
    # SigLIP pools the last token: its text is padded to the full length, as trained
    pad = {"padding": "max_length", "max_length": TEXT_LENGTH} \
        if type(model).__name__ == "SiglipModel" else {"padding": True}
    weights = []
    for c in classes:
        enc = tok([t.format(c=c) for t in templates], return_tensors="pt", **pad)
        emb = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=0))
    w = torch.stack(weights, dim=1)
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    pixels = processor(images=[Image.open(f).convert("RGB") for f, _ in files],
                       return_tensors="pt")["pixel_values"]
    labels = torch.tensor([i for _, i in files])
    logits = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output,
                         dim=-1) @ w
    top5 = logits.topk(5, dim=1).indices
    pred = logits.argmax(1)
    recall = [float((pred[labels == c] == c).double().mean()) for c in labels.unique()]
    return {"top1": 100 * float((pred == labels).double().mean()),
            "top5": 100 * float((top5 == labels[:, None]).any(1).double().mean()),
            "mean_per_class_recall": 100 * sum(recall) / len(recall),
            "classifier": w, "pred": pred}


def _siglip_processor():
    import transformers

    return transformers.SiglipImageProcessor(size={"height": 32, "width": 32})


# ---- (a) the zero-shot task against transformers -------------------------------------------
@pytest.mark.parametrize("cls", ["CLIPModel", "SiglipModel"])
def test_zero_shot_equals_transformers_direct(cls, folders, data, tmp_path):
    root, section = data
    folder = folders[cls]
    model = amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    assert type(model).__name__ == cls and amp.get_adapter(model).family in (
        "hf_clip", "hf_siglip")
    cfg = EvalConfig(tasks=["zeroshot_classification"], batch_size=32, workers=0,
                     zeroshot_classification=section["zeroshot_classification"])
    ev = evaluate_models(cfg, {"teacher": lambda: model}, _context(tmp_path))
    got = ev["zeroshot_classification"]["digits"]["teacher"]
    d = section["zeroshot_classification"][0]
    want = direct_zero_shot(model, folder, Path(d["root"]), d["templates"],
                            processor=_siglip_processor() if cls == "SiglipModel" else None)
    assert len(want["pred"].unique()) > 2  # the model tells images apart: a real test
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-4), metric
    # the cached classifier is the direct one: the text side is the model's own
    cache = tmp_path / "classifiers" / "digits.safetensors"
    assert cache.is_file()  # written by the task, read back here
    clf = text_classifier(model, amp.get_adapter(model).tokenizer(model), sorted(DIGIT_NAMES),
                          d["templates"], cache_path=cache)
    torch.testing.assert_close(clf, want["classifier"], rtol=1e-5, atol=1e-6)


def test_caption_features_are_the_models_text_features(folders):
    """The clip_entropy criterion's caption features: get_text_features of each caption."""
    import transformers

    from amp_plugin.data.coco import encode_captions

    folder = folders["CLIPModel"]
    model = amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    captions = ["a handwritten digit seven", "the number two"]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        want = model.get_text_features(**tok(captions, padding=True,
                                             return_tensors="pt")).pooler_output
    torch.testing.assert_close(encode_captions(model, captions, show_progress=False), want,
                               rtol=1e-5, atol=1e-6)


# ---- (b) amp run end to end ----------------------------------------------------------------
def test_amp_run_of_a_transformers_clip_recipe(folders, data, tmp_path):
    """score, prune, distill, eval (zero-shot with the model's own tokenizer, the cosine to
    the original's features) and report; the pruned and distilled models reload with
    the zero-shot numbers the run measured."""
    from amp_plugin.run import Run
    from amp_plugin.run.recipe import load_recipe

    root, section = data
    folder = folders["CLIPModel"]
    recipe = load_recipe(None, {
        "model": {"library": "transformers", "name": "auto", "path": str(folder)},
        "train": None, "stages": ["score", "prune", "distill", "eval", "report"],
        "output_dir": str(tmp_path / "run"), "amp.max_steps": 2,
        "data.calib_images": 64, "data.val_images": 64, "data.batch_size": 32,
        "data.test_fraction": 0.05, "distill.max_steps": 2, "distill.batch_size": 16,
        "distill.epochs": 1,
        "eval": {"tasks": ["cosine_to_original", "zeroshot_classification",
                           "zeroshot_retrieval"], "batch_size": 64, "max_train": 100,
                 "workers": 0, **section}})
    out = Run(recipe, show_progress=False).execute()
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    roles = ("teacher", "pruned", "distilled")
    zs = ev["zeroshot_classification"]["digits"]
    assert set(zs) == set(roles) and all(0 <= zs[r]["top1"] <= 100 for r in roles)
    retrieval = ev["zeroshot_retrieval"]["digits"]
    assert set(retrieval) == set(roles)
    assert all(0 <= v <= 100 for r in roles for v in retrieval[r].values())
    cosine = ev["cosine_to_original"]
    assert cosine["teacher"] == pytest.approx(1.0) and all(cosine[r] < 1 for r in roles[1:])
    d = section["zeroshot_classification"][0]
    original = amp.create_model(recipe.model)
    for role in ("pruned", "distilled"):
        loaded = amp.load_pruned(run / role)
        assert type(loaded).__name__ == "CLIPModel"
        assert count_mlp_params(amp.vision_tower(loaded)[0]) < count_mlp_params(
            amp.vision_tower(original)[0])
        # only the vision tower was pruned and trained: the text side is the original's
        for name, p in original.text_model.state_dict().items():
            assert torch.equal(loaded.text_model.state_dict()[name], p), (role, name)
        # the reloaded model with the original's tokenizer and processor: the run's numbers
        want = direct_zero_shot(loaded, folder, Path(d["root"]), d["templates"])
        for metric in ("top1", "top5", "mean_per_class_recall"):
            assert zs[role][metric] == pytest.approx(want[metric], abs=1e-4), (role, metric)
    report = json.loads((run / "report.json").read_text())
    assert report["zeroshot_classification"] == ev["zeroshot_classification"]
    assert out["report"]["zeroshot_retrieval"] == ev["zeroshot_retrieval"]


# ---- refusals before any work ---------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    {"library": "transformers", "name": "CLIPVisionModel",
     "kwargs": {**TINY, "intermediate_size": 128}},
    {"library": "transformers", "name": "Dinov2Model", "kwargs": {**TINY, "mlp_ratio": 2}},
], ids=["CLIPVisionModel", "Dinov2Model"])
def test_zero_shot_refuses_a_vision_only_model_before_any_work(spec, data, tmp_path):
    from amp_plugin.run import Run
    from amp_plugin.run.recipe import load_recipe

    torch.manual_seed(0)
    folder = tmp_path / "model"
    amp.create_model(spec).save_pretrained(folder)
    run = tmp_path / "run"
    recipe = load_recipe(None, {
        "model": {"library": "transformers", "name": "auto", "path": str(folder)},
        "train": None, "stages": ["score", "prune", "eval", "report"],
        "output_dir": str(run), "data.calib_images": 64, "data.val_images": 64,
        "data.batch_size": 32,
        "eval": {"tasks": ["knn", "zeroshot_classification"], "workers": 0,
                 "zeroshot_classification": data[1]["zeroshot_classification"]}})
    with pytest.raises(ValueError, match=rf"eval task zeroshot_classification needs an "
                                         rf"image-text model .* the model is {spec['name']}: "
                                         rf"{spec['name']} \(hf_\w+\) has no text tower"):
        Run(recipe, show_progress=False).execute()
    assert not (run / "pruned").exists() and not (run / "score").exists()


def test_a_clip_folder_without_a_tokenizer_is_refused_before_any_work(folders, data,
                                                                      tmp_path):
    from amp_plugin.run import Run
    from amp_plugin.run.recipe import load_recipe

    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders["CLIPModel"] / name, folder / name)
    run = tmp_path / "run"
    recipe = load_recipe(None, {
        "model": {"library": "transformers", "name": "auto", "path": str(folder)},
        "train": None, "stages": ["score", "prune", "eval"], "output_dir": str(run),
        "eval": {"tasks": ["zeroshot_retrieval"], "workers": 0,
                 "zeroshot_retrieval": data[1]["zeroshot_retrieval"]}})
    with pytest.raises(ValueError, match=r"eval task zeroshot_retrieval needs .* the model is "
                                         r"CLIPModel: path: .*no_tokenizer has no "
                                         r"tokenizer_config.json: save the tokenizer there"):
        Run(recipe, show_progress=False).execute()
    assert not (run / "pruned").exists()
    # a CLIPModel built from a config has no folder to read a tokenizer from
    model = amp.create_model(HFClip.example)
    with pytest.raises(ValueError, match="CLIPModel has no model folder"):
        amp.get_adapter(model).tokenizer(model)


def _evil_folder(src: Path, dst: Path, file: str, extra: dict) -> Path:
    """A copy of `src` whose `file` gains `extra`, next to a module that would leave a mark
    if anything imported it."""
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    (dst / file).write_text(json.dumps({**data, **extra}))
    (dst / "tokenization_evil.py").write_text(
        f"open({str(dst / 'IMPORTED')!r}, 'w').write('ran')\n")
    return dst


@pytest.mark.parametrize("file,extra,message", [
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tokenization_evil.Evil", None]}},
     r"tokenizer_config.json.auto_map: .* would run code shipped with a checkpoint"),
    ("tokenizer_config.json", {"trust_remote_code": True},
     r"tokenizer_config.json.trust_remote_code: True would run code shipped"),
    ("tokenizer_config.json", {"tokenizer_file": "hf-hub:owner/name"},
     r"tokenizer_config.json.tokenizer_file: 'hf-hub:owner/name' names a model hub"),
    ("preprocessor_config.json",
     {"auto_map": {"AutoImageProcessor": "tokenization_evil.Evil"}},
     r"preprocessor_config.json.auto_map: .* would run code shipped with a checkpoint"),
], ids=["auto_map", "trust_remote_code", "hub", "processor_auto_map"])
def test_tokenizer_files_naming_remote_code_are_refused(folders, data, tmp_path, file, extra,
                                                        message):
    folder = _evil_folder(folders["CLIPModel"], tmp_path / "evil", file, extra)
    model = amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    task = get_task("zeroshot_classification")
    cfg = EvalConfig(tasks=["zeroshot_classification"], workers=0,
                     zeroshot_classification=data[1]["zeroshot_classification"])
    with pytest.raises(ValueError, match=message):
        task.check(cfg, _context(tmp_path), model)
    assert not (folder / "IMPORTED").exists() and "tokenization_evil" not in sys.modules


def test_a_tokenizer_that_does_not_fit_the_text_tower_is_refused(folders, tmp_path):
    folder = tmp_path / "other_eos"
    shutil.copytree(folders["CLIPModel"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    model = amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    with pytest.raises(ValueError, match=r"the tokenizer's end-of-text id is 1, the text tower "
                                         r"pools id 5 \(text_config.eos_token_id\)"):
        amp.get_adapter(model).tokenizer(model)
