"""harness.io: crash-safe writes and JSONL that survives a torn last line."""

from __future__ import annotations

import subprocess
import warnings

import pytest

from harness import io
from harness.errors import HarnessError


def test_an_atomic_write_cut_short_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_bytes(b"old")

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(io.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_atomic_write_syncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced, fsync = [], io.os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    io.atomic_write_bytes(tmp_path / "a" / "b.bin", b"new")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"new" and len(synced) >= 2


def test_a_row_appended_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{"b": ')  # torn by a kill mid-append
    io.append_jsonl(path, {"c": 3})
    with pytest.warns(UserWarning, match=f"{path}:2 is not a JSON object row"):  # now a middle line
        assert io.read_jsonl(path) == [{"a": 1}, {"c": 3}]


def test_a_broken_line_is_warned_about_unless_a_kill_tore_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n{"c": ')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert io.read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert [str(w.message) for w in caught] == [f"{path}:2 is not a JSON object row; skipped"]
    path.write_text("garbage{{{\n")  # a whole line, newline and all: not torn by a kill
    with pytest.warns(UserWarning, match=f"{path}:1 is not a JSON object row"):
        assert io.read_jsonl(path) == []


def test_an_output_path_that_cannot_be_written_is_one_line_and_nothing_is_left(tmp_path):
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    (sealed / "log.jsonl").write_text("")
    subprocess.run(["chattr", "+i", str(sealed)], check=True)  # root passes mode bits; an immutable dir refuses root
    try:
        for path, kind, where in ((sealed / "new", "dir", sealed), (sealed / "out.json", "file", sealed),
                                  (sealed / "log.jsonl", "file", sealed / "log.jsonl")):
            with pytest.raises(HarnessError) as err:
                io.check_output_path(path, "out", kind=kind)
            assert str(err.value) == f"out={path}: cannot write {where} (Operation not permitted)"
        assert [p.name for p in sealed.iterdir()] == ["log.jsonl"]
    finally:
        subprocess.run(["chattr", "-i", str(sealed)], check=True)
    with pytest.raises(HarnessError, match=r"^-o=/proc/harness-x/y: cannot write /proc \("):
        io.check_output_path("/proc/harness-x/y", "-o", kind="dir")
    assert io.check_output_path(tmp_path / "a" / "b", "out", kind="dir") == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sealed"]  # the probe leaves no file behind
