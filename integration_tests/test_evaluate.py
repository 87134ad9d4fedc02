"""Evaluation: every metric against a direct computation written here, on real digits
images, a small open_clip model and a small timm ViT (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.config import Recipe
from amp_plugin.core.cost import count_mlp_params
from amp_plugin.data import digits_raw, get_source
from amp_plugin.evaluate import (
    classification_dataset,
    clip_transform,
    extract_features,
    knn_top1,
    linear_probe,
    load_classifier,
    retrieval_dataset,
    text_classifier,
    zero_shot_classification,
    zero_shot_retrieval,
)
from amp_plugin.evaluate.throughput import measure_throughput
from amp_plugin.evaluate.zero_shot import captions_collate
from amp_plugin.run import evaluate_run
from amp_plugin.run.recipe import RecipeError, load_recipe

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {c}.", "a handwritten {c}."]
CLIP_SPEC = {
    "library": "open_clip", "name": "ViT-B-32",
    "kwargs": {"embed_dim": 64,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64,
                            "heads": 2, "layers": 1}},
}
VIT_SPEC = {"library": "timm", "name": "vit_small_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                       "num_heads": 4, "num_classes": 0}}


# ---- fixtures: datasets written from the digits images -------------------------------------
def _png(x: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((x[0].numpy() * 255).astype(np.uint8)).resize((32, 32)).save(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """An ImageFolder (12 digits per class, class folders "zero".."nine") and a COCO
    captions JSON over 24 other digits (two unique captions each)."""
    root = tmp_path_factory.mktemp("eval_data")
    x, y = digits_raw()
    counts = dict.fromkeys(range(10), 0)
    for i in range(len(x)):
        c = int(y[i])
        if counts[c] < 12:
            _png(x[i], root / "folder" / NAMES[c] / f"{i}.png")
            counts[c] += 1
    images, annotations = [], []
    for j, i in enumerate(range(1000, 1024)):
        name = NAMES[int(y[i])]
        _png(x[i], root / "coco" / f"{i}.png")
        images.append({"id": j, "file_name": f"{i}.png", "height": 32, "width": 32})
        for k, text in enumerate((f"image {j}: a handwritten {name}",
                                  f"the digit {name}, picture number {j}")):
            annotations.append({"id": 2 * j + k, "image_id": j, "caption": text})
    (root / "captions.json").write_text(json.dumps({"images": images,
                                                    "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return amp.create_model(CLIP_SPEC).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def _clip_classification_loader(model, root: Path):
    from amp_plugin.config import ZeroShotDataset

    cfg = ZeroShotDataset(name="digits", root=str(root / "folder"), templates=TEMPLATES)
    ds, classnames, templates = classification_dataset(cfg, clip_transform(model))
    return DataLoader(ds, batch_size=32), classnames, templates


# ---- direct computations -------------------------------------------------------------------
@torch.no_grad()
def direct_classifier(model, tokenizer, classnames, templates) -> torch.Tensor:
    cols = []
    for c in classnames:
        emb = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])), dim=-1)
        cols.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(cols, dim=1)


@torch.no_grad()
def direct_zero_shot(model, tokenizer, dataset, classnames, templates) -> dict:
    w = direct_classifier(model, tokenizer, classnames, templates)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    logits = F.normalize(model.encode_image(images), dim=-1) @ w
    top5 = logits.topk(5, dim=1).indices
    pred = logits.argmax(1)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique()]
    return {"top1": 100 * float((pred == labels).float().mean()),
            "top5": 100 * float((top5 == labels[:, None]).any(1).float().mean()),
            "mean_per_class_recall": 100 * float(np.mean(recalls))}


def direct_knn(train_f, train_y, test_f, test_y, k, t) -> float:
    a, b = F.normalize(train_f, dim=1).numpy(), F.normalize(test_f, dim=1).numpy()
    hits = 0
    for i in range(len(b)):
        sim = a @ b[i]
        nearest = np.argsort(-sim)[:k]
        votes = {}
        for j in nearest:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + np.exp(sim[j] / t)
        hits += max(votes, key=votes.get) == int(test_y[i])
    return 100.0 * hits / len(b)


# ---- features, kNN, linear probe -----------------------------------------------------------
@pytest.fixture(scope="module")
def vit_features():
    torch.manual_seed(1)
    model = amp.create_model(VIT_SPEC).eval()
    splits = get_source("digits").labelled_splits(_digits_cfg(), seed=0)
    train, test = splits["train"], splits["test"]
    return (model, extract_features(model, train.images[:600], 128, show_progress=False),
            train.labels[:600], extract_features(model, test.images, 128, show_progress=False),
            test.labels, test.images)


def _digits_cfg():
    from amp_plugin.config import DataConfig

    return DataConfig(kind="digits", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_extract_features_equal_model_features(vit_features, clip_model):
    model, *_, test_images = vit_features
    x = test_images[:40]
    with torch.no_grad():
        direct = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(extract_features(model, x, 16, show_progress=False), direct,
                          atol=1e-5)
    pairs = [(x[i:i + 16], torch.zeros(len(x[i:i + 16]))) for i in range(0, 40, 16)]
    assert torch.allclose(extract_features(model, pairs, show_progress=False), direct, atol=1e-5)
    # open_clip: the pooled embedding before the projection
    xc = torch.randn(5, 3, 32, 32)
    proj = clip_model.visual.proj
    with torch.no_grad():
        clip_model.visual.proj = None
        direct_clip = clip_model.visual(xc)
        clip_model.visual.proj = proj
    assert torch.allclose(extract_features(clip_model, xc, show_progress=False), direct_clip,
                          atol=1e-5)


def test_knn_top1_equals_direct_and_sklearn(vit_features):
    from sklearn.neighbors import KNeighborsClassifier

    _, tr_f, tr_y, te_f, te_y, _ = vit_features
    got = knn_top1(tr_f, tr_y, te_f, te_y, k=20, temperature=0.07, chunk=100)
    assert got == pytest.approx(direct_knn(tr_f, tr_y, te_f, te_y, 20, 0.07))
    knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / 0.07))
    knn.fit(tr_f.numpy(), tr_y.numpy())
    assert got == pytest.approx(100 * knn.score(te_f.numpy(), te_y.numpy()))
    assert 10 < got <= 100  # random features of real digits are far above chance


def test_linear_probe_equals_direct(vit_features):
    from sklearn.linear_model import LogisticRegression

    _, tr_f, tr_y, te_f, te_y, _ = vit_features
    got = linear_probe(tr_f, tr_y, te_f, te_y)
    norm = np.linalg.norm
    a, b = tr_f.numpy(), te_f.numpy()
    clf = LogisticRegression(max_iter=1000, random_state=0)
    clf.fit(a / norm(a, axis=1, keepdims=True), tr_y.numpy())
    assert got == pytest.approx(100 * clf.score(b / norm(b, axis=1, keepdims=True),
                                                te_y.numpy()), abs=1e-9)


# ---- zero-shot -----------------------------------------------------------------------------
def test_zero_shot_classification_equals_direct(clip_model, tokenizer, data_root):
    loader, classnames, templates = _clip_classification_loader(clip_model, data_root)
    assert sorted(classnames) == sorted(NAMES) and len(loader.dataset) == 120
    got = zero_shot_classification(clip_model, tokenizer, loader, classnames, templates)
    want = direct_zero_shot(clip_model, tokenizer, loader.dataset, classnames, templates)
    assert got == pytest.approx(want, abs=1e-6)


def test_cached_classifier_matches_fresh(clip_model, tokenizer, data_root, tmp_path):
    loader, classnames, templates = _clip_classification_loader(clip_model, data_root)
    cache = tmp_path / "clf" / "digits.safetensors"
    fresh = zero_shot_classification(clip_model, tokenizer, loader, classnames, templates,
                                     cache_path=cache)
    assert cache.is_file() and not list(cache.parent.glob(".*"))  # atomic, no temp left
    # the second call must read the file: with no tokenizer it could not build one
    cached = zero_shot_classification(clip_model, None, loader, classnames, templates,
                                      cache_path=cache)
    assert cached == fresh
    direct = direct_classifier(clip_model, tokenizer, classnames, templates)
    assert torch.allclose(load_classifier(cache), direct, atol=1e-6)
    # other templates or another text tower: the cache is not reused
    other = text_classifier(clip_model, tokenizer, classnames, TEMPLATES[:1], cache_path=cache)
    assert torch.allclose(other, direct_classifier(clip_model, tokenizer, classnames,
                                                   TEMPLATES[:1]), atol=1e-6)
    torch.manual_seed(5)
    changed = amp.create_model(CLIP_SPEC).eval()
    rebuilt = text_classifier(changed, tokenizer, classnames, TEMPLATES[:1], cache_path=cache)
    assert not torch.allclose(rebuilt, other)


def test_damaged_classifier_cache_is_computed_again(clip_model, tokenizer, data_root,
                                                    tmp_path, caplog):
    """A cache file that is damaged, claims more data than it holds, or holds a tensor of
    another shape or with NaN is only a cache: built again (logged), never used."""
    from safetensors.torch import load_file

    _, classnames, templates = _clip_classification_loader(clip_model, data_root)
    cache = tmp_path / "digits.safetensors"
    want = text_classifier(clip_model, tokenizer, classnames, templates, cache_path=cache)
    good = cache.read_bytes()
    header_len = int.from_bytes(good[:8], "little")

    def nan(t):
        return t.clone().fill_(float("nan"))

    damages = {
        "truncated": lambda: cache.write_bytes(good[:header_len + 12]),
        "huge header": lambda: cache.write_bytes((2**62).to_bytes(8, "little") + good[8:]),
        "other classes": lambda: _rewrite(cache, lambda t: t[:, :3]),
        "nan": lambda: _rewrite(cache, nan),
    }
    for name, damage in damages.items():
        cache.write_bytes(good)
        damage()
        caplog.clear()
        with caplog.at_level("WARNING", logger="amp"):
            got = text_classifier(clip_model, tokenizer, classnames, templates,
                                  cache_path=cache)
        assert torch.allclose(got, want, atol=1e-6), name
        if name != "other classes":  # a readable 2-D classifier of another class count
            assert f"{cache}: not a" in caplog.text and "computing it again" in caplog.text, name
        assert torch.allclose(load_file(str(cache))["classifier"], want.cpu(), atol=1e-6)


def _rewrite(path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, t = f.metadata(), f.get_tensor("classifier").clone()
    save_file({"classifier": edit(t).contiguous()}, str(path), metadata=meta)


@torch.no_grad()
def test_zero_shot_retrieval_equals_direct(clip_model, tokenizer, data_root):
    from amp_plugin.config import RetrievalDataset

    cfg = RetrievalDataset(name="coco", root=str(data_root / "coco"),
                           captions=str(data_root / "captions.json"))
    ds = retrieval_dataset(cfg, clip_transform(clip_model))
    loader = DataLoader(ds, batch_size=10, collate_fn=captions_collate)
    got = zero_shot_retrieval(clip_model, tokenizer, loader)

    images = torch.stack([ds[i][0] for i in range(len(ds))])
    texts, owner = [], []
    for i in range(len(ds)):
        texts += ds[i][1]
        owner += [i] * len(ds[i][1])
    owner = torch.tensor(owner)
    img = F.normalize(clip_model.encode_image(images), dim=-1)
    txt = F.normalize(clip_model.encode_text(tokenizer(texts)), dim=-1)
    s = txt @ img.T  # (texts, images)
    want = {}
    for k in (1, 5, 10):
        # caption -> image: rank of its own image among all images
        rank_t = (s > s[torch.arange(len(texts)), owner][:, None]).sum(1)
        # image -> caption: rank of its best caption among all captions
        best = torch.stack([s[owner == i, i].max() for i in range(len(images))])
        rank_i = (s.T > best[:, None]).sum(1)
        want[f"image_retrieval_recall@{k}"] = 100 * float((rank_t < k).float().mean())
        want[f"text_retrieval_recall@{k}"] = 100 * float((rank_i < k).float().mean())
    assert got == pytest.approx(want)


# ---- throughput ----------------------------------------------------------------------------
def test_measure_throughput_reports_positive_rate_and_device(vit_features):
    model = vit_features[0]
    out = measure_throughput(model, batch_size=8, image_size=32, dtype="float32",
                             device="cpu", warmup=1, runs=3, show_progress=False)
    assert out["images_per_s"] > 0 and len(out["runs_images_per_s"]) == 3
    assert out["images_per_s"] == pytest.approx(float(np.median(out["runs_images_per_s"])))
    assert out["images_per_s"] == pytest.approx(8 / out["seconds_per_batch"])
    assert "threads" in out["device"] and out["batch_size"] == 8
    bf16 = measure_throughput(model, 4, 32, "bf16", "cpu", 0, 1, show_progress=False)
    assert bf16["images_per_s"] > 0 and bf16["dtype"] == "bf16"
    assert next(model.parameters()).dtype == torch.float32  # autocast left weights as they are
    with pytest.raises(ValueError, match="dtype"):
        measure_throughput(model, 4, 32, "int8", "cpu", 0, 1)


# ---- recipes and run directories -----------------------------------------------------------
def _write_recipe(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def test_eval_section_errors_name_the_key_path(tmp_path, data_root):
    base = {"name": "t", "output_dir": str(tmp_path / "run"), "model": VIT_SPEC}
    bad = _write_recipe(tmp_path / "a.yaml", {**base, "eval": {"knn_k": "many", "bogus": 1}})
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert "eval.knn_k" in str(e.value) and "eval.bogus" in str(e.value)
    missing = _write_recipe(tmp_path / "b.yaml", {**base, "eval": {"zeroshot_classification": [
        {"name": "in1k", "root": str(tmp_path / "nowhere")}]}})
    with pytest.raises(RecipeError, match=r"eval\.zeroshot_classification\.0\.root"):
        load_recipe(missing)
    no_sets = _write_recipe(tmp_path / "c.yaml", {**base, "eval": {
        "tasks": ["zeroshot_retrieval"]}})
    with pytest.raises(RecipeError, match="zeroshot_retrieval"):
        load_recipe(no_sets)
    bad_key = _write_recipe(tmp_path / "d.yaml", {**base, "eval": {"zeroshot_classification": [
        {"name": "x", "root": str(data_root / "folder"), "templates": "no_such_set"}]}})
    with pytest.raises(RecipeError, match=r"eval\.zeroshot_classification\.0\.templates"):
        load_recipe(bad_key)
    ok = load_recipe(_write_recipe(tmp_path / "e.yaml", {**base, "eval": {"tasks": ["knn"]}}))
    with pytest.raises(ValueError, match="open_clip"):
        evaluate_run(ok, tmp_path / "run", tasks=["zeroshot_classification"],
                     show_progress=False)


def _make_run(tmp_path: Path, spec: dict, eval_cfg: dict, seed: int) -> tuple[Recipe, Path]:
    """A run directory as `amp run` leaves it: recipe.yaml, the original weights, pruned/."""
    from amp_plugin.core.adapter import vision_tower

    torch.manual_seed(seed)
    model = amp.create_model(spec).eval()
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    body = {"name": "evalrun", "output_dir": str(run), "stages": ["eval", "report"],
            "model": {**spec, "weights": str(weights)},
            "data": {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "eval": eval_cfg}
    run.mkdir()
    recipe = load_recipe(_write_recipe(run / "recipe.yaml", body))
    tower, _ = vision_tower(model)
    keep = {n: torch.arange(v.hidden // 2) for n, v in amp.find_mlps(tower).items()}
    amp.prune_mlps(tower, torch.zeros(1, 3, 32, 32), keep)
    amp.save_pruned(model, run / "pruned")
    return recipe, run


def test_eval_command_on_run_dir_knn_probe_throughput(tmp_path):
    from amp_cli.app import app

    recipe, run = _make_run(tmp_path, VIT_SPEC, {
        "batch_size": 256, "max_train": 400,
        "throughput": {"batch_size": 8, "warmup": 1, "runs": 3, "device": "cpu"}}, seed=3)
    res = CliRunner().invoke(app, ["eval", str(run), "--tasks", "knn,throughput",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "eval.json").read_text())
    splits = get_source("digits").labelled_splits(recipe.data, recipe.seed, max_train=400)
    for role, model in (("teacher", amp.create_model(recipe.model)),
                        ("pruned", amp.load_pruned(run / "pruned"))):
        feats = [extract_features(model, splits[s].images, show_progress=False)
                 for s in ("train", "test")]
        want = direct_knn(feats[0], splits["train"].labels, feats[1], splits["test"].labels,
                          20, 0.07)
        assert ev["accuracy"][role] == pytest.approx(want)
        assert ev["throughput"][role]["images_per_s"] > 0
        assert ev["throughput"][role]["device"]
    cost = ev["models"]
    assert cost["pruned"]["mlp_params"] < cost["teacher"]["mlp_params"]
    gain = ev["throughput"]["pruned_gain"]
    assert gain["flops"] == pytest.approx(cost["teacher"]["flops"] / cost["pruned"]["flops"])
    assert gain["throughput"] == pytest.approx(ev["throughput"]["pruned"]["images_per_s"]
                                               / ev["throughput"]["teacher"]["images_per_s"])
    # timed together, in turns, three runs each; the gain's interval holds the gain
    assert ev["throughput"]["teacher"]["interleaved"] == ["teacher", "pruned"]
    assert len(ev["throughput"]["pruned"]["runs_images_per_s"]) == 3
    assert gain["low"] <= gain["throughput"] <= gain["high"]
    assert "img/s" in res.output and "kNN top-1" in res.output
    report = json.loads((run / "report.json").read_text())
    assert report["accuracy"] == ev["accuracy"]

    # a second task keeps the first one's numbers in eval.json and report.json
    res = CliRunner().invoke(app, ["eval", str(run), "--tasks", "linear_probe",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    ev2 = json.loads((run / "eval.json").read_text())
    assert ev2["accuracy"] == ev["accuracy"] and set(ev2["linear_probe"]) == {"teacher",
                                                                             "pruned"}
    assert ev2["tasks"] == ["knn", "linear_probe", "throughput"]
    report = json.loads((run / "report.json").read_text())
    assert report["linear_probe"] == ev2["linear_probe"] and report["accuracy"]
    bad = CliRunner().invoke(app, ["eval", str(run), "--tasks", "accuracy"])
    assert bad.exit_code != 0 and "unknown task" in bad.output


def test_evaluate_run_zero_shot_on_open_clip(tmp_path, data_root, tokenizer):
    recipe, run = _make_run(tmp_path, CLIP_SPEC, {
        "tasks": ["zeroshot_classification", "zeroshot_retrieval"], "batch_size": 16,
        "workers": 0,
        "zeroshot_classification": [{"name": "digits", "root": str(data_root / "folder"),
                                     "templates": TEMPLATES}],
        "zeroshot_retrieval": [{"name": "coco", "root": str(data_root / "coco"),
                                "captions": str(data_root / "captions.json")}]}, seed=4)
    ev = evaluate_run(recipe, run, show_progress=False)
    assert (run / "classifiers" / "digits.safetensors").is_file()
    for role, model in (("teacher", amp.create_model(recipe.model).eval()),
                        ("pruned", amp.load_pruned(run / "pruned"))):
        loader, classnames, templates = _clip_classification_loader(model, data_root)
        want = direct_zero_shot(model, tokenizer, loader.dataset, classnames, templates)
        assert ev["zeroshot_classification"]["digits"][role] == pytest.approx(want, abs=1e-6)
        r = ev["zeroshot_retrieval"]["coco"][role]
        assert set(r) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                          for k in (1, 5, 10)}
        assert all(0 <= v <= 100 for v in r.values())
    # one text classifier served both models: the pruning left the text tower as it was
    teacher, pruned = amp.create_model(recipe.model), amp.load_pruned(run / "pruned")
    assert count_mlp_params(pruned) < count_mlp_params(teacher)
    assert torch.equal(teacher.token_embedding.weight, pruned.token_embedding.weight)
