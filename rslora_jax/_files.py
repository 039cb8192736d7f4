"""Atomic writes: the one implementation of "a reader never sees half a save".

Two tools, standard library only (this module imports nothing of ours):

- :func:`write_file`: one file, written under a temporary name in its directory, flushed to disk
  and moved over the target with :func:`os.replace`.
- :func:`staged_directory` / :func:`swap_directory`: a whole directory, written under a temporary
  sibling name and then put in place in one step, so a reader sees either every old file or
  every new one, never a mix and never no directory. On Linux (glibc >= 2.28, a filesystem that
  supports it) ``renameat2(RENAME_EXCHANGE)`` swaps the finished directory with the old one
  atomically. Elsewhere two renames are used (old -> ``.<name>.old``, new -> ``<name>``); a
  crash between them leaves the old directory under ``.<name>.old``, which
  :func:`recover_directory` (called by every reader and writer of such directories) puts back.

A writer killed while it writes leaves its staging directory (``.<name>.tmp-<host>-<pid>-...``)
behind; :func:`clean_staging` removes those of processes that are gone (every staged write does
so first).

New files get the permissions the process's umask gives (``0o666 & ~umask``), not the ``0600``
of :func:`tempfile.mkstemp` or of ``safetensors.numpy.save_file``, so a server running as
another user can read an export.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errno values with which renameat2 says "not available here" (old kernel, filesystem without
# RENAME_EXCHANGE, seccomp filters); the two-rename fallback is used then.
_UNSUPPORTED = frozenset(
    {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
)


# ---------------------------------------------------------------------------- small helpers
def umask() -> int:
    """The process's current umask.

    Read from ``/proc/self/status`` where there is one (Linux 4.7+): setting and restoring it
    with :func:`os.umask` would, for a moment, give files that other threads (orbax's writers)
    create the mode 0666.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)  # the safe value for the moment it is in force
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def fsync(path: str | os.PathLike[str]) -> None:
    """Flushes a file's (or a directory's entries') data to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some filesystems
        pass
    finally:
        os.close(fd)


def check_target(directory: Path, name: str, who: str) -> Path:
    """``directory / name``, refused if it is a symbolic link or exists and is not a plain file.

    Args:
        directory: the resolved directory the file goes into.
        name: the file name.
        who: the caller, named in the error.

    Returns:
        The target path.

    Raises:
        ValueError: the target is a symbolic link, or exists and is not a regular file.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()).resolve()
        >>> check_target(d, "a.json", "save").name
        'a.json'
    """
    target = directory / name
    if target.is_symlink() or (target.exists() and target.resolve().parent != directory):
        raise ValueError(
            f"{who}: {str(target)!r} is a symbolic link (to "
            f"{str(target.resolve())!r}); refusing to write through it"
        )
    if target.exists() and not target.is_file():
        raise ValueError(f"{who}: {str(target)!r} exists and is not a regular file")
    return target


# ---------------------------------------------------------------------------- one file
def write_file(
    path: str | os.PathLike[str], write: Callable[[str], Any], *, who: str = "write_file"
) -> None:
    """Writes one file atomically: ``write(tmp)`` into a temporary file, then ``os.replace``.

    The temporary file lies in the target's directory (same filesystem), gets the umask's
    permissions and is flushed to disk before it replaces the target; on any error it is
    removed and the target is untouched.

    Args:
        path: the target file (its directory must exist).
        write: called with the temporary file's name; writes the content there.
        who: the caller, named in errors.

    Raises:
        ValueError: the target is a symbolic link or not a regular file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_file(p, lambda tmp: Path(tmp).write_text("hi"))
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    directory = path.parent.resolve()
    target = check_target(directory, path.name, who)
    clean_staging(target)
    fd, tmp = tempfile.mkstemp(prefix=staging_prefix(target), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())  # after writing: some writers recreate the file as 0600
        fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync(directory)


# ---------------------------------------------------------------------------- whole directory
def old_sibling(target: Path) -> Path:
    """Where the two-rename fallback keeps the old directory: ``.<name>.old`` next to it."""
    return target.parent / f".{target.name}.old"


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+) through ctypes, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step; False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path, *, ignore_errors: bool = False) -> None:
    """Deletes a directory tree, or a file or symbolic link (never what a link points to)."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except OSError:
        if not ignore_errors:
            raise


def _move_aside(target: Path) -> Path:
    """Fallback step 1: the old directory to ``.<name>.old``."""
    old = old_sibling(target)
    os.replace(target, old)
    return old


def _move_in(new: Path, target: Path) -> None:
    """Fallback step 2: the finished directory to the target name."""
    os.replace(new, target)


def _move_back(target: Path) -> None:
    """Undoes step 1 after an error in step 2 (a crash leaves it to `recover_directory`)."""
    if not os.path.lexists(target):
        with contextlib.suppress(OSError):
            os.replace(old_sibling(target), target)


def recover_directory(target: str | os.PathLike[str]) -> bool:
    """Puts back a directory that a crash left under ``.<name>.old`` (see :func:`swap_directory`).

    Only acts when `target` does not exist and its ``.old`` sibling does: then the crash
    happened between the fallback's two renames and the sibling is the last complete version.

    Args:
        target: the directory path.

    Returns:
        Whether a directory was restored.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "ckpt"
        >>> old_sibling(target).mkdir()
        >>> recover_directory(target), target.is_dir()
        (True, True)
    """
    target = Path(target)
    old = old_sibling(target)
    if os.path.lexists(target) or not old.is_dir():
        return False
    try:
        os.replace(old, target)
    except FileNotFoundError:  # another process restored it first
        return False
    fsync(target.parent)
    return True


def swap_directory(new: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Puts the finished directory `new` at `target`, replacing what is there, then deletes it.

    A reader sees either the complete old directory or the complete new one: with
    ``renameat2(RENAME_EXCHANGE)`` the two are swapped in one step; without it the old one is
    renamed to ``.<name>.old`` and the new one into place (an error between the two renames
    renames the old one back; a crash leaves it for :func:`recover_directory`). `new` and
    `target` must be on the same filesystem (siblings, in practice).

    Args:
        new: the complete new directory.
        target: where it goes; an existing directory there is replaced.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "ckpt").mkdir(); _ = (root / "ckpt" / "a").write_text("old")
        >>> (root / "new").mkdir(); _ = (root / "new" / "b").write_text("new")
        >>> swap_directory(root / "new", root / "ckpt")
        >>> sorted(p.name for p in root.iterdir()), [p.name for p in (root / "ckpt").iterdir()]
        (['ckpt'], ['b'])
    """
    new, target = Path(new), Path(target)
    recover_directory(target)  # finish an earlier interrupted swap first
    old = old_sibling(target)
    if os.path.lexists(old):  # left by a crash after a swap, before the old copy was deleted
        _remove(old)
    if not os.path.lexists(target):
        os.replace(new, target)
    elif _exchange(new, target):
        os.replace(new, old)  # the old version, now at `new`'s name: delete it below
    else:
        _move_aside(target)
        try:
            _move_in(new, target)
        except BaseException:
            _move_back(target)
            raise
    fsync(target.parent)
    _remove(old, ignore_errors=True)


def staging_prefix(target: str | os.PathLike[str]) -> str:
    """The name prefix of this process's staging directories for `target`:
    ``.<name>.tmp-<host>-<pid>-`` (host: a short hash of the host name)."""
    return f"{_staging_stem(Path(target).name)}{_host_tag()}-{os.getpid()}-"


def _staging_stem(name: str) -> str:
    return f".{name}.tmp-"


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_staging(target: str | os.PathLike[str], *, everything: bool = False) -> list[Path]:
    """Removes the staging directories a killed writer left next to `target`.

    A staging directory ``.<name>.tmp-<host>-<pid>-...`` is removed when its process, on this
    host, is gone; with `everything`, every ``.<name>.tmp-*`` entry is (for a caller that
    knows no one else writes there, e.g. a command in its own output directory).

    Args:
        target: the directory (or file) the staging was for.
        everything: remove every staging entry, whoever made it.

    Returns:
        The entries removed.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".out.tmp-0123abcd-999999999-x").mkdir()  # a pid that cannot exist
        >>> [p.name for p in clean_staging(root / "out", everything=True)]
        ['.out.tmp-0123abcd-999999999-x']
    """
    target = Path(target)
    stem = _staging_stem(target.name)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(stem):
            continue
        host, _, rest = entry.name[len(stem) :].partition("-")
        pid = rest.partition("-")[0]
        stale = everything or (host == _host_tag() and pid.isdigit() and not _alive(int(pid)))
        if stale:
            _remove(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(entry: Path, dst: Path) -> None:
    """An entry of the old directory into the new one: hard links where possible."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), dst)
    elif entry.is_dir():
        shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(entry), str(dst))


def _resolve_target(directory: str | os.PathLike[str], who: str) -> Path:
    path = Path(directory)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{who}: {str(path)!r} is a dangling symbolic link")
    target = path.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{who}: {str(path)!r} exists and is not a directory")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and (cwd == target or target in cwd.parents):
        raise ValueError(
            f"{who}: {str(path)!r} is (or contains) the current working directory, which a save "
            "cannot replace in one step; write to a directory outside it"
        )
    if target.parent == target:
        raise ValueError(f"{who}: {str(path)!r} is a filesystem root")
    return target


@contextlib.contextmanager
def staged_directory(
    directory: str | os.PathLike[str],
    *,
    carry: Callable[[str], bool] = lambda name: True,
    who: str = "staged_directory",
) -> Iterator[Path]:
    """Yields an empty sibling directory to write into; on success, swaps it in as `directory`.

    On leaving the block without an error: files written get the umask's permissions and are
    flushed to disk; the entries of the old `directory` that the block did not write and for
    which ``carry(name)`` is true are carried over (hard links where possible, so this is
    cheap); the staged directory gets the old one's permissions (or the umask's) and is swapped
    in with :func:`swap_directory`. On an error the staged directory is deleted and `directory`
    is untouched. A symbolic link `directory` is followed: the directory it points to is
    replaced and the link kept.

    Args:
        directory: the target directory (created if missing, parents too).
        carry: which old entries (by name) the new directory keeps when it has none of its own.
        who: the caller, named in errors.

    Yields:
        The staging directory's path.

    Raises:
        ValueError: `directory` is a file, a dangling link, a filesystem root, or the current
            working directory (or one of its parents).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "export"
        >>> with staged_directory(target) as tmp:
        ...     _ = (tmp / "config.json").write_text("{}")
        >>> [p.name for p in target.iterdir()]
        ['config.json']
    """
    target = _resolve_target(directory, who)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    clean_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    try:
        yield staging
        written = set()
        for entry in staging.iterdir():
            written.add(entry.name)
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, new_file_mode())
                fsync(entry)
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            for entry in target.iterdir():
                if entry.name not in written and carry(entry.name):
                    _carry(entry, staging / entry.name)
        else:
            os.chmod(staging, 0o777 & ~umask())
        fsync(staging)
        swap_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "check_target",
    "clean_staging",
    "fsync",
    "new_file_mode",
    "old_sibling",
    "recover_directory",
    "staged_directory",
    "staging_prefix",
    "swap_directory",
    "umask",
    "write_file",
]
