"""The output folder of a run belongs to the user: the program touches only what it made there.

Layout (DESIGN.md section 11)::

    <root>/<adapter name>/         a saved adapter, one per adapter of the run config
    <root>/_mlora/                 everything else the program writes (its bookkeeping)
        manifest.json              every path under <root> this program created, relative
        lock                       held while a command works in <root>; names the holder
        checkpoints/step-N/        resumable snapshots of an unfinished run
        logs/<name>.jsonl          metrics, one file per adapter
        tensorboard/<name>/        TensorBoard events (when tensorboard is installed)
        eval_results*.json / .csv  scores
        eval_results*.png          charts (accuracy per configuration); loss_curves.png
        tmp/                       folders being written (atomic writes); emptied at start

An adapter name starts with a letter or a digit (`mlora.config.adapter_name_problem`), so it
can never be ``_mlora``: bookkeeping and adapters cannot collide, whatever the names.

The rule: a path is deleted or replaced only when the manifest says this program created it
(or created a folder holding it). Anything else that is in the way is reported, never
removed, ``--overwrite`` or not. Only one command works in a folder at a time: `open_run_folder`
takes an exclusive lock (released by the operating system if the holder dies) and refuses a
second command with a message naming the first.

This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from mlora.errors import MloraError

try:  # POSIX; elsewhere the folder is used without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

BOOKKEEPING = "_mlora"
MANIFEST = "manifest.json"
LOCK = "lock"
_TMP = "tmp"


class FolderError(MloraError):
    """The output folder cannot be used as asked (in use, a file, holds files not ours)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a kill leaves the old
    file or the new one, never half of one. The caller decides whether `path` may be replaced."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (an image, say)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class RunFolder:
    """An output folder opened by `open_run_folder` (locked, with its manifest loaded).

    The manifest maps each created path to its file-system identity when the program last
    wrote it: device, inode and modification time, so a path the program made that the user
    then replaced (a new file or folder may reuse the inode number) or changed (a file added to
    an adapter folder) is no longer taken for the program's. A `growing` path (a metrics log
    appended to step by step, a TensorBoard folder) is identified by device and inode alone;
    such paths live only inside the program's own ``_mlora`` folder.

    Attributes:
        root: the folder the user named (``--output_dir``).
        meta: ``root/_mlora``, the program's bookkeeping folder.
    """

    def __init__(self, root: Path, created: dict[str, str]):
        self.root = Path(root)
        self.meta = self.root / BOOKKEEPING
        self._created = created

    # ----------------------------------------------------------------------- places
    @property
    def checkpoints(self) -> Path:
        return self.meta / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.meta / "logs"

    @property
    def tensorboard(self) -> Path:
        return self.meta / "tensorboard"

    def adapter(self, name: str) -> Path:
        return self.root / name

    def outputs_of(self, name: str) -> list[Path]:
        """Every path a run writes for adapter `name`: its folder, its log, its TensorBoard events."""
        return [self.adapter(name), self.logs / f"{name}.jsonl", self.tensorboard / name]

    # ----------------------------------------------------------------------- ownership
    def _key(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            raise FolderError(f"{path} is outside the output folder {self.root}") from None

    def owns(self, path: Path) -> bool:
        """True when this program created `path`, or a folder holding it, and it is still that one."""
        parts = self._key(path).split("/")
        for i in range(1, len(parts) + 1):
            key = "/".join(parts[:i])
            recorded = self._created.get(key)
            if recorded is not None and _identity(self.root / key, growing=recorded.count(":") == 1) == recorded:
                return True
        return False

    def check_replaceable(self, path: Path) -> None:
        """Raise `FolderError` when `path` exists and this program did not create it."""
        path = Path(path)
        if _identity(path) is not None and not self.owns(path):
            raise FolderError(f"{path} exists and was not written by mlora, or was changed since (see "
                              f"{self.meta / MANIFEST}); mlora never replaces what it did not create: move it away "
                              "or choose another output folder")

    def created(self, path: Path, growing: bool = False) -> Path:
        """Record `path`, just created, replaced or last written by this program, in the manifest
        (`growing`: the program appends to it later; see the class docstring)."""
        path = Path(path)
        if growing and self.meta not in path.parents:
            raise ValueError(f"{path}: only paths inside {self.meta} can be recorded as growing")
        identity = _identity(path, growing)
        key = self._key(path)
        if identity is not None and self._created.get(key) != identity:
            self._created[key] = identity
            self._save_manifest()
        return path

    def remove(self, path: Path) -> bool:
        """Delete `path` if this program created it; returns whether anything was deleted.

        Raises `FolderError` (deleting nothing) when `path` exists and is not the program's."""
        path = Path(path)
        if _identity(path) is None:
            return False
        self.check_replaceable(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        if self._created.pop(self._key(path), None) is not None:
            self._save_manifest()
        return True

    def write_text(self, path: Path, text: str) -> Path:
        """Create or replace the file `path` (only if the program's) atomically."""
        return self.write_bytes(path, text.encode("utf-8"))

    def write_bytes(self, path: Path, data: bytes) -> Path:
        """Create or replace the file `path` (only if the program's) atomically."""
        path = Path(path)
        self.check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return self.created(path)

    @contextlib.contextmanager
    def replace_dir(self, target: Path) -> Iterator[Path]:
        """Yield an empty temporary folder; on success it takes the place of `target`.

        `target` may be replaced only if this program created it (checked before anything is
        written). On an exception the temporary folder is removed and `target` is untouched;
        a kill leaves either the old `target` or the new one, never half of one.
        """
        target = Path(target)
        self.check_replaceable(target)
        tmp_root = self.meta / _TMP
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"new-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.check_replaceable(target)  # still ours after the (possibly long) write
        target.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if _identity(target) is not None:
            old = tmp_root / f"old-{target.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        self.created(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------------------- manifest
    def _save_manifest(self) -> None:
        doc = {"format": 1, "note": "paths (relative to the folder above) that mlora created and may replace, "
               "with their device:inode", "created": dict(sorted(self._created.items()))}
        atomic_write_text(self.meta / MANIFEST, json.dumps(doc, indent=1) + "\n")


def _identity(path: Path, growing: bool = False) -> str | None:
    """``device:inode:mtime`` of `path` (``device:inode`` when `growing`; of a link itself, not
    its target), or None when nothing is there."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return f"{st.st_dev}:{st.st_ino}" if growing else f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def _read_manifest(meta: Path) -> dict[str, str]:
    path = meta / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        created = doc["created"]
        if not isinstance(created, dict) or not all(isinstance(v, str) for v in created.values()):
            raise TypeError
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise FolderError(f"{path} is damaged; mlora cannot tell which files it created there. Restore it, "
                          "or move the output folder away and choose another one") from None
    return dict(created)


def _holder() -> str:
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv)) or "python"
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


@contextlib.contextmanager
def _locked(meta: Path, root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = meta / LOCK
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderError(f"{root} is in use by another mlora command ({holder}); wait for it to end, "
                              "or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(_holder() + "\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def open_run_folder(root) -> Iterator[RunFolder]:
    """Open (creating if needed) and lock the output folder `root` for one command.

    Raises:
        FolderError: `root` is a file or cannot be created, is in use by another command, or
            holds a ``_mlora`` entry that this program did not make.
    """
    root = Path(root)
    meta = root / BOOKKEEPING
    if root.exists() and not root.is_dir():
        raise FolderError(f"output folder {root} is a file; give a folder (it is created if missing)")
    if meta.exists() and not meta.is_dir():
        raise FolderError(f"{meta} is a file, not mlora's bookkeeping folder; move it away or choose another "
                          "output folder")
    if meta.is_dir() and not (meta / MANIFEST).exists() and any(meta.iterdir()):
        raise FolderError(f"{meta} exists and was not made by mlora (no {MANIFEST}); move it away or choose "
                          "another output folder")
    try:
        if not (meta / MANIFEST).exists():
            meta.mkdir(parents=True, exist_ok=True)
            RunFolder(root, {})._save_manifest()  # first: it marks the folder as mlora's
    except OSError as err:
        raise FolderError(f"cannot create the output folder {root}: {err.strerror}; choose a folder you can "
                          "write to") from None
    with _locked(meta, root):
        folder = RunFolder(root, _read_manifest(meta))
        shutil.rmtree(meta / _TMP, ignore_errors=True)  # left by a killed command; ours by construction
        yield folder
