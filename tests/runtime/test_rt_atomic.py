"""Atomic folder writes: a staged folder replaces the old one whole, or nothing changes."""

from __future__ import annotations

import os

import pytest
from crc_runtime.atomic import atomic_folder


def test_success_replaces_the_old_folder_and_leaves_no_staging(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_folder(final) as work:
        assert work.parent == tmp_path and work != final
        (work / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # nothing visible changes before the block ends
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_failure_keeps_the_old_folder_and_removes_the_staging(tmp_path):
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as work:
        (work / "half.txt").write_text("half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_folder_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "nested" / "repo") as work:
            (work / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "nested" / "repo").stat().st_mode & 0o777 == 0o777 & ~umask
