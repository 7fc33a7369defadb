"""Writing result files atomically: a reader never sees half a file, a crash leaves the old one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    if path.is_dir():
        raise LoupeError(f"{path} is a folder; give a file path to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LoupeError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is untouched") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike[str], flag: str = "output") -> Path:
    """Refuse, before any work, an output file path that cannot be written: an existing folder,
    a parent that is a file, or a folder without write permission."""
    path = Path(path)
    if path.is_dir():
        raise LoupeError(f"{flag} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LoupeError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise LoupeError(f"{flag} {path}: cannot write into {parent}")
    return path


def read_json(path: str | os.PathLike[str], expect: type, what: str = "JSON",
              error: type[LoupeError] = LoupeError) -> Any:
    """A JSON file's value, refused by name (`error`) when it is not valid JSON or UTF-8 or not
    an `expect` (dict, list)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, expect):
        raise error(f"{path} must hold a JSON {'object' if expect is dict else expect.__name__} of {what}, not "
                    f"{type(value).__name__}")
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def folder_atomic(path: str | os.PathLike[str], overwrite: bool = False,
                  error: type[LoupeError] = LoupeError) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block completes it replaces `path`
    whole, and if the block fails it is removed: a reader sees the old folder or the new one."""
    folder = Path(path)
    if folder.exists() and not overwrite:
        raise error(f"{folder} already exists; pass overwrite=True (--overwrite) to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        swap_in(tmp, folder)
    except OSError as e:  # a full disk, a permission: nothing half-written is left, the old folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"cannot write {folder}: {e.strerror or e}; the previous folder, if any, is untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, folder: Path) -> None:
    """`new` becomes `folder`; an existing `folder` is renamed aside first and removed only once
    `new` is in place: at every moment one complete folder is at the path or beside it."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    os.replace(folder, old / folder.name)
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old / folder.name, folder)  # put the old one back
        raise
    finally:
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)


STALE_SECONDS = 24 * 3600


def clean_stale(target: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the hidden temporary files and folders an interrupted write of `target` left
    beside it (`.NAME.*`), once older than `older_than` seconds (a live writer's are younger)."""
    removed = []
    now = time.time()
    for p in target.parent.glob(f".{target.name}.*"):
        try:
            if now - p.stat().st_mtime < older_than:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed
