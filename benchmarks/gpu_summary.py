"""One table from what benchmarks/gpu_check.sh left in a folder, and the same as summary.json there.

Reads whichever of these are present (a part that failed or timed out leaves its file missing or
partial, and the rest is still summarised): parts.jsonl (each part's status), machine.txt,
matmul_ceiling.json, train_throughput*.json, kernels*.json, loader_throughput.json. The step's
achieved TFLOP/s is set against the measured matmul ceiling of its precision; a value the
benchmark did not record shows as "-".

    python benchmarks/gpu_summary.py RESULTS_DIR
    python benchmarks/gpu_summary.py --step-rate RESULTS_DIR   # the fastest bf16 step's img/s, for the loaders
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import print_table  # noqa: E402

MISSING = "-"
PRECISIONS = ("bf16", "fp16", "fp32")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:{spec}}{unit}"


def _row(section: str, item: str, value: str, detail: str = "") -> dict[str, str]:
    return {"section": section, "item": item, "value": value, "detail": detail}


def _load_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: unreadable ({e.__class__.__name__}: {e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: not a JSON object")
        return None
    return data


def _rows_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = data.get("rows")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def read_parts(folder: Path, problems: list[str]) -> list[dict[str, Any]]:
    path = folder / "parts.jsonl"
    if not path.is_file():
        return []
    parts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"parts.jsonl line {number}: not JSON")
            continue
        if isinstance(record, dict):
            parts.append(record)
    return parts


def read_machine(folder: Path) -> dict[str, str]:
    """machine.txt holds `key: value` lines."""
    path = folder / "machine.txt"
    if not path.is_file():
        return {}
    machine = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            machine[key.strip()] = value.strip()
    return machine


def read_ceilings(folder: Path, problems: list[str]) -> dict[str, Any]:
    path = folder / "matmul_ceiling.json"
    data = _load_json(path, problems) if path.is_file() else None
    if data is None:
        return {}
    ceilings = data.get("ceilings_tflops")
    if not isinstance(ceilings, dict):  # older or partial files: the best row per precision
        ceilings = {}
        for r in _rows_of(data):
            tflops = _number(r.get("tflops"))
            if tflops is not None and isinstance(r.get("precision"), str):
                ceilings[r["precision"]] = max(tflops, ceilings.get(r["precision"], 0.0))
    sizes = sorted({r["size"] for r in _rows_of(data) if isinstance(r.get("size"), int)})
    return {"device": data.get("device"), "sizes": sizes,
            "tflops": {k: v for k, v in ceilings.items() if _number(v) is not None}}


def _precision_of(row: dict[str, Any]) -> str | None:
    if isinstance(row.get("precision"), str):
        return row["precision"]
    # rows from before the benchmark recorded it name the precision in the method
    words = str(row.get("method", "")).replace("-", " ").split()
    return next((p for p in PRECISIONS if p in words), None)


def read_train(folder: Path, ceilings: dict[str, float], problems: list[str]) -> list[dict[str, Any]]:
    steps = []
    for path in sorted(folder.glob("train_throughput*.json")):
        data = _load_json(path, problems)
        if data is None:
            continue
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        rows = _rows_of(data)
        if not rows and isinstance(data.get("img_per_s_median"), dict):  # files from before `rows`
            batch = settings.get("batch")
            rows = [{"method": m, "img_per_s": v,
                     "ms_per_step": 1000 * batch / v if isinstance(batch, int) and _number(v) else None}
                    for m, v in data["img_per_s_median"].items()]
        for r in rows:
            ms = _number(r.get("ms_per_step"))
            flops = _number(r.get("flops_per_step", data.get("flops_per_step")))
            tflops = _number(r.get("tflops"))
            if tflops is None and flops is not None and ms:
                tflops = flops / (ms / 1e3) / 1e12
            precision = _precision_of(r)
            ceiling = _number(ceilings.get(precision or ""))
            batch = r.get("batch", settings.get("batch"))
            steps.append({"file": path.name, "method": str(r.get("method", MISSING)), "precision": precision,
                          "batch": batch if isinstance(batch, int) else None,
                          "img_per_s": _number(r.get("img_per_s")), "ms_per_step": ms, "tflops": tflops,
                          "vs_plain": _number(r.get("vs_plain")),
                          "pct_of_ceiling": 100 * tflops / ceiling if tflops is not None and ceiling else None,
                          # fp32 steps run their convolutions in TF32 (cuDNN's default): the honest bound
                          "pct_of_tf32_ceiling": 100 * tflops / ceilings["tf32"]
                          if precision == "fp32" and tflops is not None and _number(ceilings.get("tf32")) else None})
    return steps


def read_kernels(folder: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Each method against eager over a whole generator: the blocks' times summed, per ngf, batch and pass."""
    ratios = []
    for path in sorted(folder.glob("kernels*.json")):
        data = _load_json(path, problems)
        if data is None:
            continue
        groups: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for r in _rows_of(data):
            ms = _number(r.get("ms"))
            if ms is None or not isinstance(r.get("method"), str):
                continue
            key = (r.get("ngf"), r.get("batch"), r.get("direction"))
            groups[key][r["method"]][str(r.get("block"))] = ms
        for (ngf, batch, direction), methods in groups.items():
            eager = methods.get("eager", {})
            for method, blocks in methods.items():
                common = [b for b in blocks if b in eager]
                if method == "eager" or not common or sum(blocks[b] for b in common) <= 0:
                    continue
                per_block = [eager[b] / blocks[b] for b in common if blocks[b] > 0]
                ratios.append({"file": path.name, "method": method, "ngf": ngf, "batch": batch,
                               "direction": direction, "blocks": len(common),
                               "vs_eager": sum(eager[b] for b in common) / sum(blocks[b] for b in common),
                               "block_min": min(per_block, default=None), "block_max": max(per_block, default=None)})
    return ratios


def read_loaders(folder: Path, problems: list[str]) -> list[dict[str, Any]]:
    path = folder / "loader_throughput.json"
    data = _load_json(path, problems) if path.is_file() else None
    if data is None:
        return []
    return [{"method": str(r.get("method", MISSING)), "encoding": r.get("encoding"),
             "img_per_s": _number(r.get("img_per_s")), "vs_lmdb": _number(r.get("vs_lmdb"))} for r in _rows_of(data)]


def fastest_step(steps: list[dict[str, Any]], precision: str = "bf16", batch: int = 128) -> float | None:
    """What the fastest step of `precision` consumes, in images/s: the rate a loader has to keep up with."""
    rates = [s["img_per_s"] for s in steps if s["precision"] == precision and s["img_per_s"] is not None
             and s["batch"] in (batch, None)]
    return max(rates, default=None)


def summarise(folder: Path) -> dict[str, Any]:
    problems: list[str] = []
    machine = read_machine(folder)
    parts = read_parts(folder, problems)
    ceiling = read_ceilings(folder, problems)
    steps = read_train(folder, ceiling.get("tflops", {}), problems)
    return {"folder": str(folder), "machine": machine, "parts": parts, "matmul_ceiling": ceiling, "train": steps,
            "kernels": read_kernels(folder, problems), "loaders": read_loaders(folder, problems),
            "problems": problems}


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    rows = [_row("machine", k, "", v) for k, v in summary["machine"].items()]
    for p in summary["parts"]:
        seconds, limit = _fmt(p.get("seconds"), ".0f", " s"), _fmt(p.get("limit_s"), ".0f", " s")
        detail = f"{seconds} of {limit}" if p.get("status") != "skipped" else ""
        note = str(p.get("note") or "")
        rows.append(_row("part", str(p.get("part", MISSING)), str(p.get("status", MISSING)),
                         "; ".join(x for x in (detail, note) if x)))
    ceiling = summary["matmul_ceiling"]
    for precision, tflops in ceiling.get("tflops", {}).items():
        sizes = ", ".join(str(n) for n in ceiling.get("sizes", []))
        rows.append(_row("matmul ceiling", precision, _fmt(tflops, ".4g", " TFLOP/s"),
                         f"best of n = {sizes}" if sizes else ""))
    for s in summary["train"]:
        batch = MISSING if s["batch"] is None else str(s["batch"])
        precision = s["precision"] or MISSING
        detail = (f"{_fmt(s['ms_per_step'], '.2f')} ms/step, {_fmt(s['tflops'], '.4g')} TFLOP/s = "
                  f"{_fmt(s['pct_of_ceiling'], '.1f')} % of the {precision} ceiling")
        if s["pct_of_tf32_ceiling"] is not None:
            detail += f", {s['pct_of_tf32_ceiling']:.1f} % of tf32"
        if s["vs_plain"] is not None and s["method"] != "plain":
            detail += f"; {s['vs_plain']:.2f}x plain PyTorch"
        rows.append(_row("train step", f"{s['method']} | {precision} | batch {batch}",
                         _fmt(s["img_per_s"], ".0f", " img/s"), detail))
    for k in summary["kernels"]:
        spread = (f"blocks {k['block_min']:.2f}-{k['block_max']:.2f}x" if k["block_min"] is not None
                  else "")
        rows.append(_row("kernels", f"{k['method']} vs eager | ngf {k['ngf']} | batch {k['batch']} | {k['direction']}",
                         _fmt(k["vs_eager"], ".2f", "x"), f"{spread} ({k['blocks']} blocks, {k['file']})"))
    for loader in summary["loaders"]:
        encoding = f" | {loader['encoding']}" if loader["encoding"] else ""
        rows.append(_row("loader", f"{loader['method']}{encoding}", _fmt(loader["img_per_s"], ".0f", " img/s"),
                         _fmt(loader["vs_lmdb"], ".1f", "x the LMDB reader")))
    rows += [_row("problem", "", p) for p in summary["problems"]]
    if not rows:
        rows.append(_row("-", "nothing to summarise", MISSING, f"no results in {summary['folder']}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="what gpu_check.sh wrote (OUT_DIR)")
    parser.add_argument("--step-rate", action="store_true", help="print only the fastest bf16 step's img/s at "
                                                                 "batch 128 (nothing if there is none) and exit")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    summary = summarise(args.folder)
    if args.step_rate:
        rate = fastest_step(summary["train"])
        if rate is not None:
            print(f"{rate:.1f}")
        return 0
    rows = table_rows(summary)
    print_table(f"GPU check: {args.folder}", [("section", "section", "<14"), ("item", "item", "<20"),
                                              ("value", "value", ">14"), ("detail", "detail", "<40")], rows)
    out = args.folder / "summary.json"
    out.write_text(json.dumps({**summary, "table": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
