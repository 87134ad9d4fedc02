"""Loading recipes: YAML files validated before any work starts.

The schema is `amp_plugin.config`; here a file is read, `--set` overrides are applied,
the result is validated, and what only the registries know is checked: the data source
exists, it gives what the criterion needs (text, labels), the eval tasks exist and can
be fed, and every file or folder the recipe names exists. Errors name the file and key
path; nothing is written to the run directory until the recipe is valid.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from ..config import Recipe
from ..core.criterion import criterion_info
from ..data import get_source, list_sources
from ..evaluate import get_task, list_tasks

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "demo_digits"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key path."""


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


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


def _anchor_shipped_teacher(r: Recipe, path: Path) -> None:
    """A shipped recipe's relative `train.checkpoint` names a file committed next to it
    (the demo's teacher): read from the repository wherever the command runs, so the demo
    gives its numbers without training from any working directory."""
    if r.train is None or Path(r.train.checkpoint).is_absolute():
        return
    shipped = RECIPES_DIR.parent / r.train.checkpoint
    if path.resolve().parent == RECIPES_DIR and not Path(r.train.checkpoint).exists() \
            and shipped.exists():
        r.train.checkpoint = str(shipped)


def registry_errors(r: Recipe) -> list[str]:
    """What the schema cannot see: registered names and what they need of each other."""
    errors = []
    if r.data.kind not in list_sources():
        return [f"data.kind: unknown data source {r.data.kind!r}; expected one of "
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


def load_recipe(recipe: str | Path | None = None, overrides: dict | None = None,
                check_paths: bool = True) -> Recipe:
    """Read and validate a recipe; raises RecipeError naming the file and key path."""
    path = resolve_recipe_path(recipe)
    try:
        raw = parse_yaml(_read_text(path))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
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
            lines.append(f"  {_key_path(err['loc'])}: {err['msg']}"
                         + (f" (got {err['input']!r})" if err["type"] != "missing" else ""))
        raise RecipeError("\n".join(lines)) from None
    _anchor_shipped_teacher(parsed, path)
    errors = registry_errors(parsed)
    if errors:
        raise RecipeError(f"{path}: invalid recipe\n" + "\n".join(f"  {e}" for e in errors))
    if check_paths:
        missing = {k: v for k, v in parsed.required_paths().items() if not Path(v).exists()}
        if missing:
            raise RecipeError(f"{path}: missing files or folders:\n" + "\n".join(
                f"  {k}: {v} does not exist" for k, v in missing.items()))
    parsed._source = path
    return parsed
