"""Loading recipes: YAML files validated before any work starts.

The schema is `amp_plugin.config`; here a file is read, `--set` overrides are applied,
the result is validated, and what only the registries know is checked: the data source
exists, it gives what the criterion needs (text, labels), the eval tasks exist and can
be fed, and every file or folder the recipe names exists and is of its kind. Relative
paths written in a recipe resolve against the recipe file's folder. Errors name the file
and key path; nothing is written to the run directory until the recipe is valid. A recipe may
start from another (`extends: other.yaml`) and change only what differs.
"""

from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..config import Recipe
from ..core.criterion import criterion_info
from ..core.models import spec_errors
from ..core.serialization import MANIFEST, is_pruned_dir
from ..data import get_source, list_sources
from ..evaluate import get_task, list_tasks
from ..utils.io import deep_merge

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "demo_digits"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key path."""


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _section(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, optionally, or as list items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section(arg)
        if found is not None:
            return found
    return None


def _keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, str]:
    """{key path: key} of every key of the recipe schema (list sections not entered)."""
    out = {}
    for name, field in model.model_fields.items():
        out[(*prefix, name)] = name
        section = _section(field.annotation)
        if section is not None and typing.get_origin(field.annotation) is not list:
            out.update(_keys(section, (*prefix, name)))
    return out


def did_you_mean(loc: tuple) -> str:
    """' (did you mean amp.threshold?)' for an unknown key close to a known key of its
    section, else to a known key elsewhere (a key put in the wrong section); else ''."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an item of a list section
        field = model.model_fields.get(str(part)) if model else None
        model = _section(field.annotation) if field else None
    leaf = str(loc[-1])
    if model is not None:
        close = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {_key_path((*loc[:-1], close[0]))}?)"
    known = _keys(Recipe)
    close = difflib.get_close_matches(leaf, sorted(set(known.values())), n=1, cutoff=0.8)
    paths = [_key_path(p) for p, name in known.items() if close and name == close[0]]
    return f" (did you mean {' or '.join(paths)}?)" if paths else ""


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    """A path, or the name of a recipe shipped in recipes/ (default: the demo)."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{p.stem}.yaml"
    if p.suffix in ("", ".yaml") and shipped.is_file() and not p.parent.parts:
        return shipped
    raise RecipeError(f"recipe file not found: {recipe}")


def _set_key(obj, dotted: str, value) -> None:
    """Set the value at a key path (`eval.zeroshot_classification.0.root`) of a recipe."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        obj = obj[int(key)] if key.isdigit() else getattr(obj, key)
    setattr(obj, leaf, value)


def _from_command_line(key: str, overrides: dict) -> bool:
    return any(key == o or key.startswith(o + ".") for o in overrides)


def resolve_paths(r: Recipe, folder: Path, overrides: dict) -> dict[str, str]:
    """Make every input path of `r` absolute: relative ones written in the recipe file
    resolve against its folder (so a recipe and the files beside it move together), those
    given with --set against the working directory. Returns {key path: how it was
    resolved} for the paths that were relative, for messages. output_dir and cache
    folders are outputs and stay relative to the working directory."""
    notes = {}
    for key, value in r.input_paths().items():
        p = Path(value).expanduser()
        if not p.is_absolute():
            if _from_command_line(key, overrides):
                base, notes[key] = Path.cwd(), "--set: relative to the working directory"
            else:
                base, notes[key] = folder, ("relative paths in a recipe resolve against its "
                                            f"folder, {folder}")
            p = base / p
        _set_key(r, key, os.path.normpath(p))
    return notes


def _is_file(p: Path) -> bool:
    return p.is_file()


def _is_dir(p: Path) -> bool:
    return p.is_dir()


# What each input must be: (test, what the message says was expected), by the last part
# of its key path; a saved model is a save_pruned folder.
_PATH_KINDS = {
    "weights": (_is_file, "a weights file"),
    "path": (_is_dir, "a model folder"),
    "checkpoint": (is_pruned_dir, f"a saved model folder (with {MANIFEST})"),
    "teacher": (is_pruned_dir, f"a saved model folder (with {MANIFEST})"),
    "student": (is_pruned_dir, f"a saved model folder (with {MANIFEST})"),
    "root": (_is_dir, "a folder"),
    "val_root": (_is_dir, "a folder"),
    "captions": (_is_file, "a file"),
    "classnames": (_is_file, "a file"),
    "templates": (_is_file, "a file"),
}


def path_errors(r: Recipe, notes: dict[str, str] | None = None) -> list[str]:
    """Each input the recipe's stages read that is missing or of the wrong kind, by key
    path, saying where it was looked for."""
    errors = []
    for key, value in r.required_paths().items():
        p = Path(value)
        where = f" ({notes[key]})" if notes and key in notes else ""
        if not p.exists():
            errors.append(f"{key}: {value} does not exist{where}")
            continue
        test, expected = _PATH_KINDS.get(key.rsplit(".", 1)[-1], (Path.exists, ""))
        if not test(p):
            errors.append(f"{key}: {value} is not {expected}{where}")
    return errors


def registry_errors(r: Recipe) -> list[str]:
    """What the schema cannot see: registered names and what they need of each other."""
    # the model spec as the builder will check it (hub names, remote code, unknown
    # library); whether model.path is a folder is path_errors' part
    errors = [f"model.{e}" for e in spec_errors(r.model, check_folder=False)]
    if r.data.kind not in list_sources():
        return errors + [f"data.kind: unknown data source {r.data.kind!r}; expected one of "
                f"{list_sources()}"]
    source = get_source(r.data.kind)
    for key in source.required_keys:
        if getattr(r.data, key) is None:
            errors.append(f"data.{key}: data.kind {r.data.kind!r} needs it")
    if r.data.transform not in source.transforms:
        errors.append(f"data.transform: data.kind {r.data.kind!r} applies "
                      f"{' or '.join(source.transforms)}, not {r.data.transform!r}")
    if r.data.val_from == "val_root" and not source.separate_val:
        errors.append(f"data.val_from: data.kind {r.data.kind!r} validates on images of "
                      "data.root only")
    info = criterion_info(r.amp.criterion)
    if not info.accepts(set(source.gives)):
        gives = ", ".join(sorted(source.gives)) or "images only"
        errors.append(f"amp.criterion: {r.amp.criterion!r} needs {info.needs.replace('_', ' ')}"
                      f" with each batch, but data.kind {r.data.kind!r} gives {gives}")
    n = r.amp.search.curve_images
    if n is not None and n < r.data.batch_size:
        errors.append(f"amp.search.curve_images: {n} is fewer than one batch (data.batch_size "
                      f"{r.data.batch_size})")
    if n is not None and r.data.val_images != "all" and n > r.data.val_images:
        errors.append(f"amp.search.curve_images: {n} is more than data.val_images "
                      f"{r.data.val_images}")
    for i, name in enumerate((r.eval.tasks or []) if r.eval else []):
        if name not in list_tasks():
            errors.append(f"eval.tasks.{i}: unknown task {name!r}; expected one of "
                          f"{list_tasks()}")
        elif get_task(name).needs_labels and "labels" not in source.gives:
            errors.append(f"eval.tasks.{i}: {name} needs labelled images, but data.kind "
                          f"{r.data.kind!r} gives none (use digits or imagefolder)")
    return errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the
    last silently, so a stray duplicate would override an earlier setting)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """A YAML document as plain data: safe tags only, no duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


# A recipe is a page of settings: these bound what reading one may cost.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # after YAML aliases are expanded (an alias bomb: billions)


def expanded_size(data) -> int:
    """How many values `data` holds with every YAML alias expanded (a value an alias names
    n times counts n times), computed without expanding; ValueError for a value that holds
    itself."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(obj) -> int:
        if not isinstance(obj, (dict, list)):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise ValueError("a value holds itself (a YAML alias inside its own anchor)")
        busy.add(key)
        items = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
        sizes[key] = 1 + sum(size(v) for v in items)
        busy.discard(key)
        return sizes[key]

    return size(data)


def _check_size(path: Path, raw) -> None:
    try:
        n = expanded_size(raw)
    except ValueError as e:
        raise RecipeError(f"{path}: {e}") from None
    if n > MAX_RECIPE_VALUES:
        raise RecipeError(f"{path}: holds {n:,} values once its YAML aliases are expanded, "
                          f"more than a recipe's {MAX_RECIPE_VALUES:,}")


def _read_text(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: more than {MAX_RECIPE_BYTES:,} bytes, too large for a "
                          "recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})"
                          ) from None


def _read_mapping(path: Path) -> dict:
    try:
        raw = parse_yaml(_read_text(path))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_size(path, raw)  # before anything walks it: merges, validation, fingerprints
    return raw


def read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file as plain data, with `extends: OTHER.yaml` resolved: the other recipe
    (a path relative to this file, or a shipped name) with this file's keys merged over it
    (sections merge key by key; lists and values replace)."""
    raw = _read_mapping(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{path}: extends: expected a recipe file name, got {base!r}")
    local = path.parent / base
    try:
        base_path = local if local.is_file() else resolve_recipe_path(base)
    except RecipeError:
        raise RecipeError(f"{path}: extends: recipe file not found: {base}") from None
    if base_path.resolve() in seen + (path.resolve(),):
        raise RecipeError(f"{path}: extends: {base} extends this file again (a cycle)")
    inherited = _anchor_inputs(read_raw(base_path, seen + (path.resolve(),)),
                               base_path.resolve().parent)
    return deep_merge(inherited, raw)


def _anchor_inputs(raw: dict, folder: Path) -> dict:
    """The relative input paths of a base recipe made absolute against the base's own
    folder, so a recipe extending it from elsewhere reads the same files (a partial base,
    one that does not validate alone, is taken as written)."""
    try:
        paths = Recipe.model_validate(copy.deepcopy(raw)).input_paths()
    except ValidationError:
        return raw
    for key, value in paths.items():
        if Path(value).expanduser().is_absolute():
            continue
        node = raw
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(leaf) if isinstance(node, list) else leaf] = os.path.normpath(folder / value)
    return raw


def load_recipe(recipe: str | Path | None = None, overrides: dict | None = None,
                check_paths: bool = True) -> Recipe:
    """Read and validate a recipe; raises RecipeError naming the file and key path."""
    path = resolve_recipe_path(recipe)
    raw = read_raw(path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:i + 1])
                raise RecipeError(f"--set {dotted}: {where} is {node!r}, not a section with "
                                  "keys")
        node[leaf] = value
    _check_size(path, raw)  # before anything walks it: validation, dumps, fingerprints
    try:
        parsed = Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid recipe"]
        for err in e.errors():
            hint = did_you_mean(err["loc"]) if err["type"] == "extra_forbidden" else ""
            lines.append(f"  {_key_path(err['loc'])}: {err['msg']}"
                         + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
                         + hint)
        raise RecipeError("\n".join(lines)) from None
    notes = resolve_paths(parsed, path.resolve().parent, overrides or {})
    errors = registry_errors(parsed)
    if errors:
        raise RecipeError(f"{path}: invalid recipe\n" + "\n".join(f"  {e}" for e in errors))
    if check_paths:
        errors = path_errors(parsed, notes)
        if errors:
            raise RecipeError(f"{path}: missing or unusable files or folders:\n"
                              + "\n".join(f"  {e}" for e in errors))
    parsed._source = path
    return parsed
