"""Atomic file writes and an exclusive lock on an output folder.

A file written through `atomic_path` appears under its final name only when it is complete. The data goes to a
hidden temporary file in the same folder, which is flushed, fsynced and then renamed with `os.replace` (atomic on
POSIX file systems). A crash leaves at most a hidden `.<name>.tmp-<pid>` file, never a truncated file under the
final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from augsvhn.errors import AugsvhnError

logger = logging.getLogger("augsvhn.fsutil")

LOCK_NAME = ".augsvhn.lock"

# errno values that a user fixes by freeing space, changing permissions or choosing another folder.
_WRITE_ERROR_HINTS = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some space or choose another output folder",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.EROFS: "choose a folder on a writable file system",
    errno.EFBIG: "the file exceeds the file size limit (ulimit -f) or the file system's maximum; free space or "
    "raise the limit",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another folder",
}


def temporary_path(final_path: str | Path) -> Path:
    """Return the hidden temporary name used while writing `final_path`: `.<name>.tmp-<pid>` in the same folder."""
    final_path = Path(final_path)
    return final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")


def is_temporary_name(name: str) -> bool:
    """Return whether a file name is a temporary name made by `temporary_path`."""
    return name.startswith(".") and ".tmp-" in name


def write_error(path: str | Path, error: OSError) -> AugsvhnError | OSError:
    """Turn an OSError a user can fix (no space, no permission, read-only file system) into an AugsvhnError.

    Other errors are returned unchanged, so that the caller re-raises them with their traceback.
    """
    hint = _WRITE_ERROR_HINTS.get(error.errno)
    if hint is None:
        return error
    return AugsvhnError(f"cannot write {path}: {error.strerror}; {hint}")


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries to disk, so that a rename inside it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems (certain network mounts) do not support fsync on folders; the rename is still atomic.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success move it to `final_path`, on any exception delete it.

    The temporary file lies in the same folder as `final_path` (so the rename stays on one file system) and has a
    hidden name `.<name>.tmp-<pid>`. After the block, the file is fsynced, renamed over `final_path` with
    `os.replace` and the folder is fsynced. The parent folder is created if missing. An OSError caused by a full
    disk, missing permission or a read-only file system is raised as AugsvhnError naming `final_path`.
    """
    final_path = Path(final_path)
    temporary = temporary_path(final_path)
    try:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary

        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final_path)
        fsync_folder(final_path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            converted = write_error(final_path, error)
            if converted is not error:
                raise converted from error
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`). Returns the path written."""
    path = Path(path)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON with sorted keys to `path` atomically. Returns the path written."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted writers left in `folder` (not recursive).

    Call this only while holding the folder's DirectoryLock, when no other writer can be using them.
    Returns the paths deleted.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if is_temporary_name(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists but belongs to another user
    return True


class DirectoryLock:
    """Exclusive lock on a folder, so that two writers never fill it at the same time.

    The lock is the file `<folder>/.augsvhn.lock`, created with O_CREAT | O_EXCL and held with `fcntl.flock`. It
    stores the holder's pid, host name, command line, purpose and start time as JSON. A second writer gets an
    AugsvhnError at once that names the folder and the holder. A lock file left by a process that died on this
    host (its flock is gone and its pid no longer exists) is taken over with a warning. A lock file from another
    host, or from a live pid that holds no flock, is never taken over, and the error tells how to remove it by hand.

    Use as a context manager: `with DirectoryLock(out_dir, "generate"): ...`.
    """

    def __init__(self, folder: str | Path, purpose: str):
        self.folder = Path(folder)
        self.purpose = purpose
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise AugsvhnError naming the process that holds it."""
        if self.held:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.folder, error) from error

        # A holder that releases the lock deletes the file; retry when we locked a file that was deleted meanwhile.
        for _ in range(10):
            fd, created = self._open_lock_file()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise AugsvhnError(self._in_use_message(holder)) from None
            if not self._still_linked(fd):
                os.close(fd)
                continue
            if not created:
                self._check_stale(fd)
            self._write_holder(fd)
            self._fd = fd
            return
        raise AugsvhnError(f"cannot take the lock {self.path}: other processes keep replacing it; try again")

    def release(self) -> None:
        """Delete the lock file and drop the flock. Does nothing if the lock is not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._still_linked(fd):
                os.unlink(self.path)
        except OSError as error:
            logger.warning("could not delete the lock file %s: %s", self.path, error)
        finally:
            os.close(fd)

    def _open_lock_file(self) -> tuple[int, bool]:
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            pass
        except OSError as error:
            raise write_error(self.path, error) from error
        try:
            return os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:
            # The holder released it between our two calls: create it afresh.
            return self._open_lock_file()
        except OSError as error:
            raise write_error(self.path, error) from error

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read_holder(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        try:
            holder = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _check_stale(self, fd: int) -> None:
        """Raise unless the lock file we now flock was left by a dead process on this host."""
        holder = self._read_holder(fd)
        pid = holder.get("pid")
        host = holder.get("hostname")
        if not holder:
            # The writer died between creating the file and writing to it.
            logger.warning("taking over the empty lock file %s", self.path)
            return
        if host != socket.gethostname():
            os.close(fd)
            raise AugsvhnError(
                self._in_use_message(holder)
                + f" The lock was taken on another host, so its process cannot be checked from here; if no augsvhn"
                f" run is using {self.folder} on {host}, delete {self.path} and try again."
            )
        if isinstance(pid, int) and _pid_alive(pid):
            os.close(fd)
            raise AugsvhnError(
                self._in_use_message(holder)
                + f" If process {pid} is not an augsvhn run, delete {self.path} and try again."
            )
        logger.warning(
            "taking over the lock %s left by process %s (%s), which no longer exists",
            self.path,
            pid,
            holder.get("command", "unknown command"),
        )

    def _write_holder(self, fd: int) -> None:
        holder = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "command": " ".join(sys.argv),
            "purpose": self.purpose,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        data = (json.dumps(holder, indent=2) + "\n").encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, data)
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise write_error(self.path, error) from error

    def _in_use_message(self, holder: dict) -> str:
        who = f"process {holder.get('pid', '?')} on {holder.get('hostname', '?')}"
        if holder.get("started"):
            who += f", started {holder['started']}"
        if holder.get("command"):
            who += f": {holder['command']}"
        return (
            f"{self.folder} is in use by another augsvhn run ({who}). Wait for it to finish or use another folder."
        )
