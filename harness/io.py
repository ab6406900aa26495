"""Crash-safe files: everything the harness writes goes through here.

A checkpoint, a results row or a state file is either absent or complete, never half-written:
whole files are written to a temp file in the same directory, fsynced and renamed over the target;
JSONL rows are appended with one `write` of a full line followed by fsync, and readers skip a torn
last line left by a kill mid-append.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Collection, Iterator

from omegaconf import OmegaConf

from harness.errors import HarnessError, first_line, require


def text_table(header: list[str], rows: list[list[str]], left: Collection[int] = ()) -> list[str]:
    """Rows of strings as aligned terminal lines: the header, a dashed rule, then the rows. Columns whose
    index is in `left` are left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def cache_root() -> Path:
    """Where the harness caches what it can recompute (Gflops, FID reference statistics):
    $HARNESS_CACHE_DIR, default ~/.cache/dit-harness."""
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "dit-harness")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the rest of the team
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a truncated file at `path`."""
    import torch  # here, so report and notebook code can use this module without importing torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row as a single write + fsync (a kill can only tear the last line)."""
    append_lines(path, (json.dumps(row, default=str) + "\n").encode())


def append_lines(path: str | os.PathLike, lines: bytes) -> None:
    """Append whole lines (`lines` ends with a newline) as a single write + fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        # A torn line from an earlier kill must not swallow these: start them on a fresh line.
        if f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    lines = b"\n" + lines
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a JSONL file, skipping a last line torn by a kill (one the file does not end with a newline);
    any other line that is not a JSON object is skipped with a warning naming the file and line."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for number, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw) if raw.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = "torn"
        if isinstance(row, dict):
            yield row
        elif row is not None and number < len(lines):  # the last piece follows the last newline: torn
            warnings.warn(f"{path}:{number} is not a JSON object row; skipped", stacklevel=2)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path: str | os.PathLike, key: str, kind: str = "file") -> Path:
    """`path` can be written as a `kind` ("file" or "dir"): it is not the other kind, its nearest existing parent is
    a directory, and this process can write there (an existing file: append to it). Checked before any work whose
    result would go there, so an unwritable output costs one line, not the work."""
    path = Path(path).expanduser()
    wrong = path.is_dir() if kind == "file" else path.exists() and not path.is_dir()
    require(not wrong, f"{key}={path} is a {'directory' if kind == 'file' else 'file'}; "
                       f"give {'a file' if kind == 'file' else 'a directory'} path")
    parent = next(p for p in path.parents if p.exists())
    require(parent.is_dir(), f"{key}={path}: {parent} is a file, not a directory")
    where = path if path.is_dir() else parent
    problem = _unwritable(where) or (_unappendable(path) if path.is_file() else None)
    require(problem is None, f"{key}={path}: cannot write {path if path.is_file() else where} ({problem})")
    return path


def _unwritable(directory: Path) -> str | None:
    """Why no file can be created in `directory` (None if one can). The probe is an unnamed temp file
    (O_TMPFILE): nothing appears in the directory. Mode bits alone would not do: root passes them, and an
    immutable directory, a read-only mount or /proc refuse anyway."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def _unappendable(path: Path) -> str | None:
    try:
        with open(path, "ab"):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def staging_dir(target: Path) -> Path:
    """A fresh sibling of `target` to build its new contents in, for `replace_dir`. A previous `replace_dir` killed
    between its two renames is finished first (its old directory is put back), and its leftovers are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    olds = sorted(target.parent.glob(f".{target.name}.old-*"))
    if olds and not target.exists():
        os.rename(olds.pop(), target)
    for leftover in [*olds, *target.parent.glob(f".{target.name}.staging-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    staged = target.parent / f".{target.name}.staging-{os.getpid()}"
    staged.mkdir()
    return staged


def replace_dir(staged: Path, target: Path) -> None:
    """Put the finished directory `staged` in place of `target` with two renames, so a kill never leaves a mix of
    old and new files: the old directory stays whole (as .<name>.old-<pid> for an instant) until the new one is in."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_yaml(path: str | os.PathLike):
    """A YAML file the harness wrote (a run's config.yaml, a sweep's sweep.yaml) as a DictConfig; one error line
    naming the file when it is not readable YAML."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml and OmegaConf raise many types
        raise HarnessError(f"{path} is not readable YAML ({first_line(err)}); restore it or move it aside") from None


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default
