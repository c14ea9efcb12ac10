"""sdebatch.utils.atomic_write: the file appears whole or not at all, with the permissions of an ordinary file."""
import os

import pytest

from sdebatch.utils import atomic_write


def test_atomic_write_bytes_and_callable_with_ordinary_permissions(tmp_path):
    atomic_write(tmp_path / "a.bin", b"abc")
    atomic_write(tmp_path / "b.bin", lambda f: f.write(b"xyz"))
    with open(tmp_path / "plain.bin", "wb") as f:  # what open() makes under this process's umask
        f.write(b"")
    mode = os.stat(tmp_path / "plain.bin").st_mode & 0o777
    for name, data in (("a.bin", b"abc"), ("b.bin", b"xyz")):
        assert (tmp_path / name).read_bytes() == data
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode  # not mkstemp's private 0600


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    atomic_write(tmp_path / "a.txt", b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "a.txt", boom)
    assert (tmp_path / "a.txt").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
