"""Files: atomic writes (a temporary file or folder beside the target, then os.replace, so
a reader or a killed run never sees half an output), checked for room first and named
when the file system fills, canonical JSON, recursive merges and content fingerprints."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(path: Path) -> str:
    # the writer's pid in the name: leftovers of a killed writer are told from live ones
    return f".{path.name}.{os.getpid()}."


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete temporary files / folders beside `path` left by writers that died (a kill
    inside a save leaves a whole model copy behind); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+(\.old)?$")
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---- room on the file system ---------------------------------------------------------------
# what a write gets when the file system, a quota or the process's file size limit is full
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class NoSpaceError(OSError):
    """A write there is no room for; the message names the folder and the bytes needed.
    The write was atomic: what the folder held before is kept."""


def free_bytes(folder: str | Path) -> int:
    """Free bytes (for this user) on the file system that holds, or would hold, `folder`."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def no_space(folder: str | Path, needed: int | None, what: str,
             reason: str = "no space left on device") -> NoSpaceError:
    need = f"about {needed:,} bytes needed" if needed else "more room needed"
    return NoSpaceError(f"{folder}: cannot write {what}: {reason} ({need}, "
                        f"{free_bytes(folder):,} bytes free); make room and run again: "
                        "what was written before is kept")


# torch.save's zip writer reports a failed or short write without its errno
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos")


def out_of_room(e: BaseException) -> bool:
    """Whether `e` is a write that found no room (or, from torch.save, a write that failed)."""
    if isinstance(e, NoSpaceError):
        return False  # already named
    if isinstance(e, OSError):
        return e.errno in _NO_ROOM
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED)


@contextmanager
def room_for(folder: str | Path, needed: int | None, what: str,
             check: bool = True) -> Iterator[None]:
    """Refuse a write of `needed` bytes into `folder` that the file system has no room for
    before it starts (unless the caller checked: `check` False), and name one that runs out
    of room (or is over the file size limit) on the way."""
    if check and needed and free_bytes(folder) < needed:
        raise no_space(folder, needed, what)
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not out_of_room(e):
            raise
        reason = (os.strerror(e.errno).lower() if isinstance(e, OSError) and e.errno
                  else "a write failed")
        raise no_space(folder, needed, what, reason) from e


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], object]) -> Path:
    """Write bytes, text, or whatever `data(f)` writes to a binary file, atomically."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    with room_for(path.parent, None if callable(payload) else len(payload), path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets, not outputs
            with os.fdopen(fd, "wb") as f:
                if callable(payload):
                    payload(f)
                else:
                    f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file, never through a symbolic link (appending in place is
    the point of a log; a link would carry the line to another file)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def temp_dir_beside(path: str | Path) -> Path:
    """An empty hidden folder next to `path`, to be filled and then `replace_dir`-ed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for secrets, not outputs
    return tmp


def follow_umask(root: str | Path) -> None:
    """Give every file and folder below `root` the mode a plain open / mkdir would under
    the umask (writers such as safetensors and mkstemp make 0600 files; DeepSpeed makes its
    scripts 0744): executables keep their execute bits, links are left alone."""
    mask = _umask()
    for top, _, files in os.walk(root):
        os.chmod(top, 0o777 & ~mask)
        for name in files:
            p = os.path.join(top, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing what was there (a symbolic link
    there is replaced, never followed)."""
    if path.is_symlink():
        path.unlink()
        os.replace(tmp, path)
    elif path.exists():
        old = tmp.with_name(tmp.name + ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_dir(path: str | Path, fill: Callable[[Path], object],
               needed: int | None = None) -> Path:
    """Build folder `path` atomically: `fill(tmp)` writes into a fresh folder first
    (`needed`: about the bytes it writes, checked against the free space first)."""
    path = Path(path)
    with room_for(path.parent, needed, f"{path.name}/"):
        tmp = temp_dir_beside(path)
        try:
            fill(tmp)
            follow_umask(tmp)
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# ---- JSON ----------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Plain JSON data: tensors and numpy values to Python numbers/lists, dataclasses and
    pydantic models to dicts, paths to strings, NaN/inf to None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch / numpy tensors and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def dumps(data: Any) -> str:
    """One canonical form (2-space indent, insertion order, no NaN), so rewriting the same
    data reproduces the same bytes."""
    return json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, dumps(data).encode())


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`, None if there is no such file."""
    path = Path(path)
    return read_json_object(path) if path.is_file() else None


def read_json_object(path: str | Path, key: str = "") -> dict:
    """The JSON object in the file `path`; a file that is not valid JSON, or holds another
    value, is refused naming it (after `key`, the recipe key that named the file)."""
    prefix = f"{key}: " if key else ""
    try:
        data = json.loads(Path(path).read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{prefix}{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{prefix}{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- merging and fingerprints -------------------------------------------------------------
def deep_merge(base: Mapping, override: Mapping) -> dict:
    """`base` with `override` merged in recursively (dicts merge, other values replace);
    neither input is modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models are dumped first)."""
    blob = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[tuple, str] = {}


class HashCache:
    """Content hashes of files kept in a JSON file across processes, keyed by what a
    change of the file would change (size, mtime, ctime, inode), so that an unchanged
    multi-GB weights file is read once, and a file replaced at the same path, even
    with its mtime restored, is hashed again (ctime cannot be set back)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None

    def _load(self) -> dict:
        try:
            data = read_json(self.path) if self.path else None
        except ValueError:
            data = None  # a damaged cache is only a cache
        return data or {}

    def sha256(self, path: Path) -> dict:
        path = path.resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = (str(path), *stamp)
        if key not in _HASHES:
            entry = self._load().get(str(path))
            if isinstance(entry, dict) and entry.get("stamp") == stamp:
                _HASHES[key] = str(entry.get("sha256"))
            else:
                _HASHES[key] = sha256_file(path)
                if self.path:
                    data = self._load()
                    data[str(path)] = {"stamp": stamp, "sha256": _HASHES[key]}
                    write_json(self.path, data)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _HASHES[key]}


def file_fingerprint(path: str | Path, cache: HashCache | None = None) -> dict:
    """What a file holds: size, mtime and a content hash (cached, see `HashCache`)."""
    return (cache or HashCache()).sha256(Path(path))


def content_fingerprint(path: str | Path, cache: HashCache | None = None) -> str:
    """The content of a file or of every file of a folder (names and hashes)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return fingerprint({str(p.relative_to(path)): file_fingerprint(p, cache)["sha256"]
                            for p in files})
    return file_fingerprint(path, cache)["sha256"]
