"""What every benchmark ends with: a table on stdout and a dated JSON file."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": cpu, "cores": os.cpu_count()}


def print_table(title: str, columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> None:
    """columns: (header, row key, format spec such as '>9.0f' or '<40')."""
    widths = [max(len(h), *(len(format(r[k], f)) for r in rows)) for h, k, f in columns]
    print(f"\n{title}\n")
    print("  ".join(h.ljust(w) if f.startswith("<") else h.rjust(w) for (h, _, f), w in zip(columns, widths,
                                                                                          strict=True)))
    for r in rows:
        print("  ".join(format(r[k], f).ljust(w) if f.startswith("<") else format(r[k], f).rjust(w)
                        for (_, k, f), w in zip(columns, widths, strict=True)))


def settings_of(args: Any) -> dict[str, str]:
    """A benchmark's options as strings, paths inside the checkout relative to it (not this machine's)."""
    root = Path(__file__).resolve().parents[1]
    return {k: str(v.resolve().relative_to(root) if isinstance(v, Path) and v.resolve().is_relative_to(root) else v)
            for k, v in vars(args).items()}


def write_result(path: Path, benchmark: str, **payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": benchmark, "date": date.today().isoformat(), "machine": machine(), **payload}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {path}")
