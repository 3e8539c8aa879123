"""Writing files and output directories, the one way every command does it.

* ``atomic_write(target, write)``: ``write(tmp_path)`` fills a temporary file in the
  target's own directory; it is fsynced, renamed over ``target`` and the directory is
  fsynced, so a crash leaves the old file or the new one, never half of one. The file
  gets the mode a plain ``open(target, "w")`` would give under the umask (``mkstemp``'s
  0600 would make shared model directories unreadable to others).
* ``output_dir(path, ...)``: a context manager for a command's ``--out`` directory. The
  caller validates its inputs first; the directory is created on entry, holds a lock
  file (``.symconvert.lock``, ``flock``) so that a second concurrent writer exits 2, and
  is removed again when the command fails before it wrote its first file. ``keep_partial``
  says whether what a failed run wrote stays: ``False`` (``convert``: all or nothing),
  ``True``, or a function asked at the failure (``finetune``: only once a checkpoint to
  resume from exists). Creating and cleaning up hold SIGINT/SIGTERM back
  (``signals_deferred``), so a signal cannot strand a directory or a lock file.
* ``check_output_file(path, inputs)``: before any measuring or exporting, that a file can
  be written at ``path`` and that ``path`` is none of the inputs.
* ``os_error(exc, path)``: an ``OSError`` (ENOSPC, EACCES, EROFS, ...) as a
  ``SymconvertError`` that names the path and the cause (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from symconvert.errors import SymconvertError
from symconvert.io.signals import signals_deferred

LOCK_NAME = ".symconvert.lock"
#: the files of a model directory
WEIGHTS_NAME = "model.safetensors"
META_NAME = "symconvert.json"
PLAN_NAME = "plan.json"
_umask_lock = threading.Lock()
#: output directories open in this process, innermost last (atomic_write reports to them)
_ACTIVE: list[OutputDir] = []


class OutputError(SymconvertError):
    """An output that cannot be written (full disk, no permission, locked, an input)."""


def check_path_given(path: str | os.PathLike, flag: str = "--out") -> None:
    """An empty path names nothing (``Path("")`` would be the current directory)."""
    if not os.fspath(path).strip():
        raise OutputError(f"{flag} '': an empty path names nothing; give a file or directory "
                          "name.")


def wrote(target: str | os.PathLike) -> None:
    """Tell the open output directories that this run wrote ``target`` (``atomic_write``
    does it itself; a file appended to in place, like a log, is announced once)."""
    for active in _ACTIVE:
        active.wrote(Path(target))


def _umask() -> int:
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def os_error(exc: BaseException, path: str | os.PathLike | None = None) -> OutputError:
    """A clear exit-2 error for a failed write: the path and the cause."""
    where = path if path is not None else getattr(exc, "filename", None)
    cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    detail = getattr(exc, "filename", None)
    if detail is not None and path is not None and str(detail) != str(path):
        cause = f"{cause} ({detail})"
    code = getattr(exc, "errno", None)
    hint = {
        errno.ENOSPC: " Free some space or write elsewhere (--out).",
        errno.EDQUOT: " Free some space or write elsewhere (--out).",
        errno.EACCES: " Choose a directory you can write to (--out).",
        errno.EPERM: " Choose a directory you can write to (--out).",
        errno.EROFS: " The file system is read-only; choose another --out.",
    }.get(code, "")
    return OutputError(f"cannot write {where}: {cause}.{hint}")


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError`` raised anywhere in a command: the path and the cause."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    reason = getattr(exc, "reason", None)  # urllib's URLError
    if reason is not None:
        cause = f"{getattr(reason, 'strerror', None) or reason}"
    where = exc.filename
    if where is not None and exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {cause}" if where is not None else cause


def _disk_full(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize < 1 << 20
    return False


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``target`` atomically: ``write(tmp)`` writes the content to the path ``tmp``.

    ``OSError`` (and a writer's own error on a full disk, e.g. torch's "unexpected pos")
    becomes ``OutputError`` naming ``target``; the temporary file is always removed.
    """
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, file_mode())
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # again: a writer may have replaced the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with signals_deferred():  # renamed and recorded, or neither
            os.replace(tmp, target)
            wrote(target)
    except OSError as exc:
        _unlink(tmp)
        raise os_error(exc, target) from None
    except SymconvertError:
        _unlink(tmp)
        raise
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, Exception) and _disk_full(target.parent):
            raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target) from None
        raise
    _fsync_dir(target.parent)
    return target


def atomic_directory(target: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``atomic_write`` for a directory: ``write(tmp)`` fills an empty temporary directory,
    which then replaces ``target`` (an existing one is removed first); removed on failure."""
    target = Path(target)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        write(tmp)
        with signals_deferred():
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp, target)
            wrote(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(exc, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda p: Path(p).write_text(text))


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def refuse_inputs(out: Path, inputs: Iterable[str | os.PathLike | None], flag: str = "--out") -> None:
    """``out`` must not be (or, for a directory input, replace a file of) an input."""
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if _same(out, item):
            raise OutputError(f"{flag} {out} is an input of this command; writing it would "
                              "destroy what is being read. Choose another path.")
        if item.is_dir():
            for name in (WEIGHTS_NAME, META_NAME):
                if _same(out, item / name):
                    raise OutputError(f"{flag} {out} is {name} of the input directory {item}; "
                                      "writing it would replace the model being read. Choose "
                                      "another path.")


def existing_parent(path: Path) -> Path:
    """The nearest ancestor of ``path`` (or itself) that exists."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def probe_dir(directory: Path, target: Path) -> None:
    """os.access says yes to root everywhere; only a real write proves a directory usable."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".symconvert-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise os_error(exc, target) from None


def check_output_file(path: str | os.PathLike, inputs: Iterable = (), *, flag: str = "--out",
                      overwrite: bool = True) -> Path:
    """Fail now (before measuring or exporting) if ``path`` cannot be written as a file."""
    check_path_given(path, flag)
    path = Path(path)
    refuse_inputs(path, inputs, flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file name.")
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} exists; pass --overwrite or choose another path.")
    parent = path.absolute().parent
    if not parent.is_dir():
        existing = existing_parent(parent)
        if not existing.is_dir():
            raise OutputError(f"{flag} {path}: {existing} is a file, not a folder.")
        raise OutputError(f"{flag} {path}: the folder {parent} does not exist; create it or "
                          "choose another path.")
    probe_dir(parent, path)
    return path


class OutputDir:
    """The state of one ``output_dir`` (see the module docstring)."""

    def __init__(self, path: Path, keep_partial: bool | Callable[[], bool]) -> None:
        self.path = path
        self.keep_partial = keep_partial
        self.created: list[Path] = []  # directories this run made, outermost first
        self.written: list[Path] = []
        self._lock_fd: int | None = None

    def wrote(self, target: Path) -> None:
        if (target.parent == self.path or self.path in target.parents) \
                and target not in self.written:
            self.written.append(target)

    # --------------------------------------------------------------------- lifecycle
    def open(self) -> None:
        missing = []
        p = self.path.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise OutputError(f"cannot create {self.path}: {p} is a file, not a folder.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, self.path) from None
        self.created = list(reversed(missing))
        try:
            self._lock()
        except BaseException:
            self._remove_created(force=False)
            raise

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise os_error(exc, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(
                f"{self.path} is being written by another symconvert process (lock "
                f"{lock} is held). Wait for it to finish, or choose another --out.") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_created(self, force: bool) -> None:
        """Remove the directories this run created: only if empty, or (``force``) with
        the files this run wrote in them."""
        if not self.created:
            return
        top = self.created[0]
        if force:
            shutil.rmtree(top, ignore_errors=True)
            return
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def close(self, failed: bool) -> None:
        self._unlock()
        if not failed:
            return
        keep = self.keep_partial() if callable(self.keep_partial) else self.keep_partial
        if self.created and not keep:
            self._remove_created(force=True)
        elif not self.written:
            self._remove_created(force=False)
        elif not keep:
            for path in self.written:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._remove_emptied()

    def _remove_emptied(self) -> None:
        """The sub-directories the removed files leave empty (``converted/`` of a run)."""
        folders = {p.parent for p in self.written if p.parent != self.path}
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.path and self.path in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, inputs: Iterable = (),
               keep_partial: bool | Callable[[], bool] = True,
               enabled: bool = True) -> Iterator[Path]:
    """Create and lock the output directory ``path`` for the ``with`` block.

    Validate the command's inputs BEFORE entering. On a failure (any exception, a signal
    included) the directory is removed again if this run created it and wrote nothing in
    it; with ``keep_partial=False`` (``convert``: a model directory is all or nothing), or a
    ``keep_partial()`` that answers False then, the files this run wrote (and the directories
    it created) are removed too. ``enabled=False`` (non-zero torchrun ranks) does nothing.
    """
    check_path_given(path)
    path = Path(path)
    if not enabled:
        yield path
        return
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} exists and is not a directory; choose another --out.")
    refuse_inputs(path, inputs)
    state = OutputDir(path, keep_partial)
    with signals_deferred():
        state.open()
        _ACTIVE.append(state)
    failed = True
    try:
        yield path
        failed = False
    finally:
        with signals_deferred():
            _ACTIVE.remove(state)
            state.close(failed)


__all__ = ["LOCK_NAME", "META_NAME", "PLAN_NAME", "WEIGHTS_NAME", "OutputError", "atomic_write",
           "atomic_write_text", "check_output_file", "check_path_given", "describe_os_error",
           "existing_parent", "file_mode", "os_error", "output_dir", "probe_dir",
           "refuse_inputs", "wrote"]
