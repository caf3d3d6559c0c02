"""A folder tree of image files; top-level sub-folders, if all images sit in them, are classes."""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _refuse(error: OSError) -> None:
    # os.walk skips a folder it cannot list by default: a class would silently go missing
    raise error


class ImageFolder:
    kind = "folder"

    def __init__(self, root: Path):
        if not root.is_dir():
            from data_shards.sources.lsun_lmdb import SourceMissing

            raise SourceMissing(f"image folder {root} does not exist")
        self.root = root
        # The listing is the one thing held per image (a relative path): a folder gives no other
        # stable order to split by.
        self.files = sorted(
            str(Path(dirpath, f).relative_to(root))
            for dirpath, _, files in os.walk(root, onerror=_refuse)
            for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        tops = {Path(f).parts[0] for f in self.files if len(Path(f).parts) > 1}
        in_subfolders = all(len(Path(f).parts) > 1 for f in self.files)
        self.classes = sorted(tops) if in_subfolders and tops else []
        self._keys = [self._key(f) for f in self.files]

    @staticmethod
    def _key(relative: str) -> str:
        # WebDataset splits a member name at the first dot of its base name: keep keys dot-free
        return re.sub(r"[^A-Za-z0-9_/-]", "_", str(Path(relative).with_suffix("")))

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.root), "files": len(self.files), "classes": self.classes}

    def scan_keys(self) -> Iterator[str]:
        yield from self._keys

    def read(self, first_key: str, count: int) -> Iterator[tuple[str, bytes, int]]:
        start = bisect.bisect_left(self._keys, first_key)
        for relative, key in zip(self.files[start:start + count], self._keys[start:start + count], strict=True):
            label = self.classes.index(Path(relative).parts[0]) if self.classes else -1
            try:
                data = (self.root / relative).read_bytes()
            except OSError:
                data = b""  # unreadable file: counted as a skipped item downstream
            yield key, data, label
