"""Reports of evaluation results: a dataset's Markdown, and the paper's Table 1 over configurations."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .presets import PRESETS, TABLE1_LARGE, TABLE1_MAIN

RESULT_KIND = "proxyclip-eval-result"

def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def result_markdown(result: dict) -> str:
    """A per-dataset report: summary line and per-class IoU / accuracy table."""
    m = result["metrics"]
    lines = [f"# {result['title']}: {result['config_label']}", "",
             f"{result['num_images']} images{'' if result['complete'] else ' (partial: --limit)'}, "
             f"ignore index {result['ignore_index']}", "",
             "| mIoU | aAcc | mAcc |", "|---:|---:|---:|",
             f"| {_fmt(m['mIoU'])} | {_fmt(m['aAcc'])} | {_fmt(m['mAcc'])} |", "",
             "| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {c['class']} | {_fmt(c['IoU'])} | {_fmt(c['Acc'])} |" for c in m["per_class"]]
    return "\n".join(lines) + "\n"


def collect_results(out_dir: str | Path) -> list[dict]:
    """Every result record in a folder (from any configuration)."""
    results = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("kind") == RESULT_KIND:
            results.append(record)
    return results


def table1(results: Sequence[dict]) -> tuple[str, list[dict]]:
    """The paper's Table 1 layout: one row per configuration.

    Columns: VOC21, Context60, Object, VOC20, Context59, Stuff, City, ADE, Avg (mean of those
    eight mIoUs, shown only when all eight are there), ADE847, Context459. A value marked *
    comes from a partial run (--limit).

    Returns:
        The Markdown table and the rows as dicts (label, config_id, {dataset: mIoU}, avg).
    """
    rows: dict[str, dict] = {}
    for r in results:
        if r["dataset"] not in (*TABLE1_MAIN, *TABLE1_LARGE):
            continue  # user datasets have their own result files
        row = rows.setdefault(r["config_id"], {"config_id": r["config_id"], "label": r["config_label"],
                                               "mIoU": {}, "complete": {}})
        row["mIoU"][r["dataset"]] = r["metrics"]["mIoU"]
        row["complete"][r["dataset"]] = r["complete"]
    keys = (*TABLE1_MAIN, "avg", *TABLE1_LARGE)
    titles = [PRESETS[k].title if k in PRESETS else "Avg" for k in keys]
    lines = ["| Configuration | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows.values():
        main = [row["mIoU"].get(k) for k in TABLE1_MAIN]
        row["avg"] = float(np.round(np.mean(main), 2)) if all(v is not None for v in main) else None
        cells = []
        for k in keys:
            if k == "avg":
                cells.append(_fmt(row["avg"]) + ("*" if row["avg"] is not None and not all(
                    row["complete"][d] for d in TABLE1_MAIN) else ""))
            else:
                cells.append(_fmt(row["mIoU"].get(k)) + ("*" if k in row["complete"] and not row["complete"][k] else ""))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", list(rows.values())
