"""Two small helpers shared across the package: atomic file writes, and one-thread sections."""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
_UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) and put it back at once
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Any], None]) -> None:
    """Write ``data`` (bytes, or a function given the open binary file) to a temp file in the same folder, then
    rename it over ``path``: readers never see a half-written file, and a crash leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); a written file is an ordinary one
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def single_threaded(fn: F) -> F:
    """Run ``fn`` with one torch intra-op thread (restored afterwards): for tiny tensors extra threads only contend,
    which costs 10x or more on a busy machine. The setting is process-wide while ``fn`` runs."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper  # type: ignore[return-value]
