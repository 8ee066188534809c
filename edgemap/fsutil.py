"""Atomic file writes: a crash never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemap.runtime.integrity import sha256_file

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "write_user_file", "sha256_file", "fsync_dir",
           "folder_lock", "FolderBusy"]

TMP_SUFFIX = ".edgemap-tmp"
_OUR_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX) + "$")
LOCK_NAME = ".edgemap.lock"


def size_text(n: float, sign: bool = False) -> str:
    """A byte count in decimal units, as pip and the run's artifact table show sizes: 950 B, 71.5 kB, 13.5 MB.

    One convention everywhere (package said KiB, run and report MB, export's disk errors KiB/MiB).
    ``sign``: "+1.2 kB" / "-0.3 kB" (a difference).
    """
    f, mark = abs(float(n)), ("-" if n < 0 else "+") if sign else ("-" if n < 0 else "")
    for unit in ("B", "kB", "MB", "GB"):
        if f < 1000 or unit == "GB":
            return f"{mark}{f:.0f} {unit}" if unit == "B" else f"{mark}{f:.1f} {unit}"
        f /= 1000
    raise AssertionError("unreachable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success fsync it and ``os.replace`` it in.

    Use for writers that want a filename (safetensors, onnx.save, zip). On any
    exception, the temp file is removed and ``dest`` is left as it was.

    Example:
        >>> with atomic_path(run / "model.onnx") as tmp:
        ...     onnx.save(model, str(tmp))
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        # The name is chosen before the file exists, so a Ctrl-C/SIGTERM landing right after
        # the file is created still finds it in the cleanup below (mkstemp leaves that gap).
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        break
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"cannot create a temp file beside {dest}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.filename is None and e.errno is not None:  # a write (path.write_bytes, a library's file) names no file:
            # the CLI then blamed the temp folder (TMPDIR) for a full run directory
            raise OSError(e.errno, e.strerror or str(e), str(tmp)) from e
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(dest: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``dest`` atomically."""
    atomic_write_bytes(dest, json_text(obj).encode("utf-8"))


def special_file(dest: str | Path) -> bool:
    """True for an existing path that is not a plain file to replace: a device, a pipe, a socket, or anything in
    /dev or /proc (``/dev/stderr``, ``/dev/null``, a FIFO, ``/proc/self/fd/N``)."""
    try:
        mode = os.stat(dest).st_mode  # follows symlinks
    except OSError:
        return False
    return not stat.S_ISREG(mode) or os.path.abspath(dest).startswith(("/dev/", "/proc/"))


def write_user_file(dest: str | Path, data: bytes) -> None:
    """Write a file the user named on the command line.

    A plain (or new) file is written atomically; through a symlink, its target is (the link stays).
    A device, pipe or /dev path (``/dev/null``, a FIFO, ``/dev/fd/3``) is written into, never replaced:
    an atomic rename would put a plain file where ``/dev/null`` was. It is opened for appending, so a
    shell redirection behind ``/dev/fd/N`` is not truncated under the writes of others.
    """
    if special_file(dest):
        with open(dest, "ab") as f:
            f.write(data)
        return
    atomic_write_bytes(os.path.realpath(dest), data)


def json_text(obj: Any) -> str:
    """Indented JSON; \\u escapes only where a string cannot be UTF-8 (a file name that is not)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from undecodable file names
        text = json.dumps(obj, indent=2, ensure_ascii=True, sort_keys=False) + "\n"
    return text


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temp files left by a process killed mid-write; return what was removed. Call it only where no other
    edgemap process can be writing (under the folder's lock, or :func:`writers_lock`)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            if not _OUR_TEMP.match(p.name):  # only names atomic_path makes (.<name>.<12 hex>.edgemap-tmp)
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


WRITERS_LOCK_NAME = ".edgemap-writers.lock"


@contextlib.contextmanager
def writers_lock(folder: str | Path) -> Iterator[None]:
    """Wait for the other edgemap processes writing into ``folder`` (a wheelhouse two ``edgemap package`` commands
    share: one's temp-file cleanup deleted the other's wheel mid-copy). Held only for the short write, so waiting is
    right here (unlike a run directory's lock, which refuses). Without ``fcntl`` (Windows) it does not lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    try:
        fd, _ = _open_own_lock(folder, folder / WRITERS_LOCK_NAME)
    except FolderNotWritable as e:  # the write itself would fail so: said as for any file (exit 74, the folder named)
        raise PermissionError(errno.EACCES, e.why, str(folder)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class FolderBusy(Exception):
    """Another process holds the folder's lock; ``holder`` is what it wrote there (pid, command, since)."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by {holder or 'another process'}")
        self.folder, self.holder = folder, holder


class UnsafeLockFile(Exception):
    """The folder's lock file is a symlink (or not a plain file): edgemap never writes through it."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is a symlink or not a plain file")
        self.path = path


class FolderNotWritable(Exception):
    """The folder's lock file cannot be created: the folder is read-only for this process; ``why`` says how."""

    def __init__(self, folder: Path, why: str):
        super().__init__(f"{folder}: cannot write in this folder ({why})")
        self.folder, self.why = folder, why


#: errno values meaning "this process may not write here" (not a bug, not a missing file)
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def not_writable(folder: str | Path) -> str | None:
    """Why this process cannot create files in ``folder`` ("Permission denied", "Read-only file system"), else None.

    Tried for real (a temporary file), since permission bits do not tell: root ignores them,
    a read-only mount or a dropped capability does not.
    """
    e = write_probe(folder)
    if e is not None and e.errno in NOT_WRITABLE:
        return e.strerror or str(e)
    return None  # writable, or a missing folder and the like: the command reports that itself


def write_probe(folder: str | Path) -> OSError | None:
    """The OSError that creating a (temporary, at once removed) file in ``folder`` raises, else None."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e


# folder -> [open lock file, depth]: re-entrant within a thread. Another thread of the same process is a second
# writer like another process (it gets FolderBusy): a per-process count let it in, and two threads' results were lost.
_held_by_thread = threading.local()


def _held() -> dict[Path, list[Any]]:
    held = getattr(_held_by_thread, "folders", None)
    if held is None:
        held = _held_by_thread.folders = {}
    return held


def _open_own_lock(folder: Path, path: Path) -> tuple[int, bool]:
    """Open ``folder``'s lock file: never through a symlink (a run directory from someone else could point it at
    ~/.bashrc, which locking truncates), never a FIFO or device, and never an inode shared with another folder: a
    copy made with ``cp -al`` would share the original's lock (each blocking the other), so it gets its own file."""
    safe = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags = os.O_RDWR | os.O_CREAT | safe
    for _ in range(3):
        writable = True
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as e:
            fd = -1
            if e.errno == errno.EACCES and path.exists() and os.access(folder, os.W_OK | os.X_OK):
                # a shared run (group-writable folder) whose lock file another user made: flock works on a
                # read-only descriptor too, so lock through it (only the holder line is not written); this said
                # "cannot write in this run directory: chmod -R u+w", which that user cannot do
                with contextlib.suppress(OSError):
                    fd, writable = os.open(path, os.O_RDONLY | safe), False
            if fd < 0:
                if e.errno in NOT_WRITABLE:
                    raise FolderNotWritable(folder, e.strerror or str(e)) from None
                if e.errno == errno.ELOOP:
                    raise UnsafeLockFile(path) from None
                raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device
            os.close(fd)
            raise UnsafeLockFile(path)
        if st.st_nlink == 1 or not writable:
            return fd, writable
        os.close(fd)  # a hard link: replace this folder's name with a fresh file (the other folder keeps its own)
        with atomic_path(path) as tmp:
            tmp.touch()
    raise UnsafeLockFile(path)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the existing ``folder`` (its ``.edgemap.lock``) or raise FolderBusy.

    Never waits: a second writer gets FolderBusy at once, naming the holder. Nested use in
    one process is allowed. The OS drops the lock when the holder dies, even on kill -9,
    so a stale lock file is harmless. Without ``fcntl`` (Windows) it does not lock.

    Example:
        >>> with folder_lock("models/digits", "edgemap export"):
        ...     ...
    """
    folder = Path(folder).absolute()
    held = _held()
    if folder in held:
        held[folder][1] += 1
        try:
            yield
        finally:
            held[folder][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks here
        yield
        return
    path = folder / LOCK_NAME
    fd, writable = _open_own_lock(folder, path)
    f = os.fdopen(fd, "a+" if writable else "r", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            if holder.startswith(f"pid {os.getpid()} "):
                holder += " — another thread of this process"
            raise FolderBusy(folder, holder) from None
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(f.fileno()).st_ino:  # replaced meanwhile (a
            raise FolderBusy(folder, "another edgemap process (it just renewed the lock file)")  # hard-linked copy)
        if writable:
            f.seek(0)
            f.truncate()
            line = f"pid {os.getpid()} ({what}) since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            try:  # unbuffered: a failed write must not stay in a buffer that close() writes again
                os.write(f.fileno(), line.encode("utf-8", "backslashreplace"))
            except OSError as e:  # a full disk: the lock holds without its holder line; the command goes on (eval
                # then shows what it measured, and its save names the folder)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        held[folder] = [f, 1]
        try:
            yield
        finally:
            del held[folder]
            if writable:
                f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
