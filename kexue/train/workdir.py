"""A run directory's integrity: one writer at a time, checked layout, atomic JSON files.

    check_workdir(workdir, writable=True)    # a file, `checkpoints` a file, read-only: fail now
    with WorkdirLock(workdir):               # a second trainer fails at once, naming the holder
        ...                                  # train; write config.json, metrics, checkpoints
    write_json_atomic(path, payload)         # readers see the old file or the new one
    record = read_json(path)                 # damaged: WorkdirError naming the file and line

`WorkdirLock` holds an exclusive `fcntl.flock` on `<workdir>/writer.lock` (which
records the holder's PID, host and start time) for as long as it is held; the kernel
drops the lock when the process dies, so a `kill -9` never leaves a stale lock. (NFS
maps `flock` to POSIX locks, which work across hosts; on a file system without locks
a warning says the rule is not enforced there.) The
lock file is removed on release, and a workdir the lock itself created is removed
again if it is still empty, so a command that fails its checks leaves no trace. In a
multi-process job process 0 takes the lock and every process learns the outcome.
Readers (`experiments.evaluate`, `Checkpointer(read_only=True)`) take no lock: they
never write into the workdir's checkpoints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["ERROR_LOG", "LOCK_FILE", "WorkdirError", "WorkdirLock", "WorkdirLockedError",
           "check_workdir", "read_json", "report_failure", "write_json_atomic"]

LOCK_FILE = "writer.lock"
ERROR_LOG = "error.log"


class WorkdirError(RuntimeError):
    """A run directory that cannot be used as asked; the message says what to do."""


class WorkdirLockedError(WorkdirError):
    """Another process holds the workdir's writer lock."""


def check_workdir(workdir: str | os.PathLike, *, writable: bool) -> str:
    """The absolute workdir, after checking what can be known before any work starts.

    Args:
      workdir: the run directory (may not exist yet when `writable`).
      writable: a trainer's check (the directory, or its nearest existing parent,
        must be writable); False for readers (the directory must exist).

    Returns:
      `os.path.abspath(workdir)`.

    Raises:
      WorkdirError: the path is empty, is a file, does not exist (readers), is not
        writable (trainers), or its `checkpoints` entry is not a directory.
    """
    text = os.fspath(workdir)
    if not text.strip():
        raise WorkdirError("the workdir is empty: pass --workdir=DIR, the run's directory")
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} is a file, not a directory: pass another "
                           "--workdir (or move the file away)")
    if not writable:
        if not os.path.isdir(path):
            raise WorkdirError(f"workdir {path} does not exist: pass the --workdir of a "
                               "training run")
        return path
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"cannot create workdir {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable ({existing}: read-only file system "
                           "or no permission): pass a writable --workdir")
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise WorkdirError(f"{checkpoints} is a file, not the checkpoint directory: move it "
                           "away or pass another --workdir")
    return path


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"PID {int(holder['pid'])} on host {holder['host']} (since {started})"
    except (ValueError, KeyError, TypeError):
        return "another process (its PID and host are not recorded yet)"


# errno values of file systems without flock support.
_NO_LOCKS = frozenset(code for code in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                        errno.EINVAL) if code)

# Locks this process holds: realpath -> [WorkdirLock, hold count]. flock locks belong to
# an open file description, so a second open+flock in the same process would fail.
_HELD: dict[str, list[Any]] = {}


class WorkdirLock:
    """Exclusive writer lock of a workdir (see the module doc); re-entrant in one process.

    Args:
      workdir: the run directory; created if missing.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self._created_dir = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        """Takes the lock (process 0) and shares the outcome with every process.

        Raises:
          WorkdirLockedError: another process holds it (its PID and host are named).
          WorkdirError: the workdir or the lock file cannot be created.
        """
        key = os.path.realpath(self.workdir)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        error: WorkdirError | None = None
        if jax.process_index() == 0:
            try:
                self._lock()
            except WorkdirError as caught:
                error = caught
        if jax.process_count() > 1:
            failed = multihost_utils.process_allgather(np.array([error is not None], np.int32))
            if np.any(failed) and error is None:
                error = WorkdirError(f"process 0 could not take the writer lock of "
                                     f"{self.workdir} (its log says why)")
        if error is not None:
            raise error
        _HELD[key] = [self, 1]
        return self

    def _lock(self) -> None:
        if not os.path.isdir(self.workdir):
            try:
                os.makedirs(self.workdir)
                self._created_dir = True
            except FileExistsError:
                pass
            except OSError as error:
                raise WorkdirError(f"cannot create workdir {self.workdir}: "
                                   f"{error.strerror or error}") from error
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                self._remove_created_dir()
                raise WorkdirError(f"cannot create the lock file {self.path}: "
                                   f"{error.strerror or error} (is the workdir writable?)"
                                   ) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in _NO_LOCKS:  # e.g. some FUSE mounts: warn, do not refuse
                    print(f"[kexue.train] warning: the file system of {self.workdir} does "
                          f"not support locks ({error.strerror}): one trainer per workdir "
                          "is not enforced there", file=sys.stderr, flush=True)
                    break
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirError(f"cannot lock {self.path}: {error}") from error
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by {_describe_holder(holder)}: one "
                    f"trainer per workdir. Wait for it to finish, stop it, or pass another "
                    f"--workdir ({self.path} names the holder).") from None
            # The holder may have removed the file between our open and flock: then the
            # lock we got is on an unlinked inode, so start again on the new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()}).encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
        except OSError as error:  # a full disk: the lock still holds
            if error.errno != errno.ENOSPC:
                os.close(fd)
                raise WorkdirError(f"cannot write {self.path}: {error}") from error
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while holding it: see the inode check in `_lock`
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self._created_dir:
            try:
                os.rmdir(self.workdir)  # only if still empty
            except OSError:
                pass
            self._created_dir = False

    def release(self) -> None:
        """Releases one hold; the last one unlocks and removes the lock file."""
        key = os.path.realpath(self.workdir)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0]._unlock()

    @property
    def held(self) -> bool:
        """Whether this process holds the lock of this workdir."""
        return os.path.realpath(self.workdir) in _HELD


def write_json_atomic(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Writes `payload` as indented, key-sorted JSON: a reader sees the old or the new file.

    The text goes to a temporary file next to `path` that is flushed to disk and then
    renamed over `path`. Process 0 only.
    """
    if jax.process_index() != 0:
        return
    path = os.fspath(path)
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=2, sort_keys=True, default=str)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    try:
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def read_json(path: str | os.PathLike, *, what: str = "file") -> dict[str, Any]:
    """A JSON object from `path`.

    Raises:
      FileNotFoundError: no such file.
      WorkdirError: the file is not UTF-8, not JSON or not an object; the message
        names the file, the line and `what` it should hold.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise WorkdirError(f"{path} is damaged (not UTF-8 at byte {error.start}); it should "
                           f"hold {what}") from None
    except json.JSONDecodeError as error:
        raise WorkdirError(f"{path}:{error.lineno} is damaged ({error.msg}); it should hold "
                           f"{what}") from None
    if not isinstance(value, dict):
        raise WorkdirError(f"{path} is damaged (a JSON {type(value).__name__}, not an "
                           f"object); it should hold {what}")
    return value


def report_failure(error: BaseException, *, verbose: bool = False,
                   workdir: str | os.PathLike | None = None,
                   stream: TextIO | None = None) -> int:
    """Prints `error: <type>: <message>` for an operator-facing failure; returns 1.

    The traceback is printed only when `verbose`; otherwise, given a `workdir` (a run
    that had started writing there), it is appended to `<workdir>/error.log`, and the
    message says where it went (or why it could not be saved, e.g. a full disk).
    """
    stream = sys.stderr if stream is None else stream
    text = "".join(traceback.format_exception(error))
    if verbose:
        stream.write(text)
        where = ""
    elif workdir is not None:
        path = os.path.join(os.fspath(workdir), ERROR_LOG)
        try:
            with open(path, "a", encoding="utf-8") as file:
                file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text}")
            where = f" (traceback in {path})"
        except OSError as problem:
            where = (f" (traceback not saved to {path}: {problem.strerror or problem}; "
                     "--verbosity=1 prints it)")
    else:
        where = " (--verbosity=1 prints the traceback)"
    stream.write(f"error: {type(error).__name__}: {error}{where}\n")
    stream.flush()
    return 1
