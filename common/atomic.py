"""Files written atomically: a temp file beside the final one, renamed into place, so a reader, a
crash or a full disk never leaves a partial file under the final name. A full disk raises
OSError(ENOSPC) naming the final file (a failed write() through a file object names none), and
the temp file is removed, so the space it took is free again."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


def out_of_space(error: BaseException) -> bool:
    """A write that failed because the disk or the user's quota is full."""
    return isinstance(error, OSError) and error.errno in _OUT_OF_SPACE


def naming(error: OSError, path: str | Path) -> OSError:
    """`error` with `path` as its file name where it has none: writes through a file object raise
    ENOSPC without one, and the one line a user gets must say which file did not fit."""
    return error if error.filename is not None else OSError(error.errno, error.strerror, str(path))


def write_atomically(final: Path, write: Callable[[Path], T], tmp: Path | None = None) -> T:
    """`write(tmp)`, then rename tmp to `final` (tmp: a fresh hidden name beside `final` unless given)."""
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        result = write(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if out_of_space(e):
            raise naming(e, final) from None
        raise
    return result


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` into `path`, flushed to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(Path(path), write)
