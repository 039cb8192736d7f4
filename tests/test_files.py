"""Atomic writes (rslora_jax._files): whole-directory swaps, crash recovery, file modes.

Crashes are simulated by fault injection: a step function that raises (an error the writer sees)
or one that raises after disabling the roll-back (the process "dies" between the two renames of
the fallback). What is checked is what a reader finds afterwards: the old directory complete or
the new one complete, never a mix, and never nothing once a reader has recovered.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from rslora_jax import _files
from tests._faults import die_between_renames


def _write_generation(directory: Path, gen: int, names=("a", "b", "c")) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text(f"{gen}")


def _generation(directory: Path) -> set[str]:
    """The set of generations the files of `directory` come from (one when consistent)."""
    return {p.read_text() for p in directory.iterdir()}


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def _exchange_works(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    try:
        return _files._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture(params=["exchange", "two_renames"])
def mode(request, tmp_path, monkeypatch):
    """Runs a test with renameat2(RENAME_EXCHANGE) and with the two-rename fallback."""
    if request.param == "exchange":
        if not _exchange_works(tmp_path):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    else:
        monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    return request.param


def test_swap_replaces_whole_directory(tmp_path, mode):
    target = tmp_path / "ckpt"
    _write_generation(target, 1, names=("a", "b", "old_only"))
    new = tmp_path / ".ckpt.new"
    _write_generation(new, 2)
    _files.swap_directory(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["a", "b", "c"]
    assert _generation(target) == {"2"}
    assert _siblings(target) == ["ckpt"]  # nothing left behind


def test_swap_into_missing_target(tmp_path, mode):
    target = tmp_path / "ckpt"
    new = tmp_path / ".ckpt.new"
    _write_generation(new, 1)
    _files.swap_directory(new, target)
    assert _generation(target) == {"1"} and _siblings(target) == ["ckpt"]


def test_error_in_second_rename_keeps_old_directory(tmp_path, monkeypatch):
    """The fallback's second os.replace fails: the old directory is renamed back."""
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    _write_generation(target, 1)
    new = tmp_path / ".ckpt.new"
    _write_generation(new, 2)
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("injected: disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        _files.swap_directory(new, target)
    assert _generation(target) == {"1"}
    assert not _files.old_sibling(target).exists()


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    _write_generation(target, 1)
    new = tmp_path / ".ckpt.new"
    _write_generation(new, 2)
    killed = die_between_renames(monkeypatch)
    with pytest.raises(killed):
        _files.swap_directory(new, target)
    assert not target.exists() and _files.old_sibling(target).is_dir()  # the crash window
    monkeypatch.undo()
    assert _files.recover_directory(target)
    assert _generation(target) == {"1"}
    assert not _files.recover_directory(target)  # nothing more to do


def test_next_swap_recovers_and_cleans_up(tmp_path, monkeypatch):
    """A crash after the swap (old copy not yet deleted), then one before it: the next save wins."""
    target = tmp_path / "ckpt"
    _write_generation(target, 1)
    _write_generation(_files.old_sibling(target), 0)  # left by a crash after a swap
    new = tmp_path / ".ckpt.new"
    _write_generation(new, 2)
    _files.swap_directory(new, target)
    assert _generation(target) == {"2"} and _siblings(target) == ["ckpt"]

    new3 = tmp_path / ".ckpt.new3"
    _write_generation(new3, 3)
    killed = die_between_renames(monkeypatch)
    with pytest.raises(killed):
        _files.swap_directory(new3, target)
    monkeypatch.undo()
    with _files.staged_directory(target) as staging:
        _write_generation(staging, 4)
    assert _generation(target) == {"4"}
    assert _siblings(target) == [".ckpt.new3", "ckpt"]  # the dead writer's staging is its own


def test_reader_never_sees_a_mix_or_nothing(tmp_path):
    """While a writer swaps generations in, the path always opens, and never onto a mix.

    Files read through one opened directory all come from one generation. (A reader still inside
    the old directory while it is deleted finds fewer files, or none: it reads again, as any
    reader of a replaced checkpoint must; what it did read is still one generation.)
    """
    target = tmp_path / "ckpt"
    _write_generation(target, 0)
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    stop = threading.Event()
    reads: list[tuple[set[str], int]] = []
    errors: list[BaseException] = []

    def read_all(fd: int) -> tuple[set[str], int]:
        gens, count = set(), 0
        for name in os.listdir(fd):
            try:
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
            except FileNotFoundError:  # the old generation is being deleted
                continue
            try:
                gens.add(os.read(f, 100).decode())
                count += 1
            finally:
                os.close(f)
        return gens, count

    def reader():
        try:
            while not stop.is_set():
                fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # must never fail
                try:
                    reads.append(read_all(fd))
                finally:
                    os.close(fd)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for gen in range(1, 60):
            with _files.staged_directory(target) as staging:
                _write_generation(staging, gen)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert all(len(gens) <= 1 for gens, _ in reads), [g for g, _ in reads if len(g) > 1][:3]
    complete = {next(iter(gens)) for gens, count in reads if count == 3}
    assert len(complete) >= 2, complete  # the reads overlapped the swaps
    assert _generation(target) == {"59"}


def test_staged_directory_carries_other_files_and_drops_on_error(tmp_path):
    target = tmp_path / "export"
    _write_generation(target, 1, names=("weights", "stale", "keep.txt"))
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("x")
    (target / "link").symlink_to("keep.txt")
    with _files.staged_directory(target, carry=lambda n: n != "stale") as staging:
        (staging / "weights").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "link", "sub", "weights"]
    assert (target / "weights").read_text() == "2" and (target / "keep.txt").read_text() == "1"
    assert (target / "sub" / "x").read_text() == "x" and os.readlink(target / "link") == "keep.txt"

    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    with pytest.raises(RuntimeError, match="half way"), _files.staged_directory(target) as staging:
        (staging / "weights").write_text("3")
        raise RuntimeError("half way")
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert _siblings(target) == ["export"]


def test_staged_directory_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    _write_generation(real, 1)
    link = tmp_path / "link"
    link.symlink_to(real)
    with _files.staged_directory(link) as staging:
        _write_generation(staging, 2)
    assert link.is_symlink() and _generation(real) == {"2"}


def test_staged_directory_refusals(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(ValueError, match="not a directory"),
        _files.staged_directory(tmp_path / "file"),
    ):
        pass
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with (
        pytest.raises(ValueError, match="dangling"),
        _files.staged_directory(tmp_path / "dangling"),
    ):
        pass
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path in (".", str(tmp_path)):
        with (
            pytest.raises(ValueError, match="current working directory"),
            _files.staged_directory(path),
        ):
            pass
    assert work.is_dir()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask(tmp_path, mask):
    """New files and directories get 0o666/0o777 & ~umask, whatever wrote them (mkstemp: 0600)."""
    old = os.umask(mask)
    try:
        _files.write_file(tmp_path / "one.json", lambda tmp: Path(tmp).write_text("{}"))

        def write_0600(tmp):  # a writer that recreates its file as 0600 (safetensors does)
            if os.path.exists(tmp):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)

        _files.write_file(tmp_path / "two.bin", write_0600)
        with _files.staged_directory(tmp_path / "new_dir") as staging:
            (staging / "f").write_text("x")
            write_0600(str(staging / "g"))
    finally:
        os.umask(old)
    for name in ("one.json", "two.bin", "new_dir/f", "new_dir/g"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "new_dir").stat().st_mode) == 0o777 & ~mask


def test_existing_directory_keeps_its_mode(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    os.chmod(target, 0o750)
    with _files.staged_directory(target) as staging:
        (staging / "f").write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_write_file_is_atomic_and_refuses_links(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError("injected: no space left on device")

    with pytest.raises(OSError, match="no space"):
        _files.write_file(target, broken)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["run.json"]
    (tmp_path / "outside").write_text("keep")
    (tmp_path / "link.json").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="symbolic link"):
        _files.write_file(tmp_path / "link.json", lambda tmp: Path(tmp).write_text("x"))
    assert (tmp_path / "outside").read_text() == "keep"


def test_swap_over_a_symlink_leaves_nothing_behind(tmp_path, mode):
    """swap_directory replaces the entry at `target` (a link too) and never deletes through it."""
    real = tmp_path / "real"
    _write_generation(real, 1)
    target = tmp_path / "ckpt"
    target.symlink_to(real)
    for gen in (2, 3):
        new = tmp_path / f".ckpt.new{gen}"
        _write_generation(new, gen)
        _files.swap_directory(new, target)
        assert not target.is_symlink() and _generation(target) == {str(gen)}
    assert _generation(real) == {"1"}  # what the link pointed to is untouched
    assert _siblings(target) == ["ckpt", "real"]
