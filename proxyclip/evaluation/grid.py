"""The paper's tables as grids of evaluation runs, next to the published numbers.

A table is a data file (``proxyclip/data/tables/table1.json`` ...; :func:`load_spec` reads a
shipped one by name or any JSON file of the same shape): columns (a dataset each, and optionally
settings of their own, e.g. Table 6's alpha), rows (a label as in the paper, the configuration
as flat settings over the table's ``defaults``, and the published number of every cell), and the
rule of the average column. Rows without a configuration (training-based methods) carry the
published numbers only.

A cell is one evaluation run: a configuration on a dataset (:class:`RunSpec`). Its key hashes
everything that decides the numbers (weights and where they come from, precision, every
inference setting after the dataset's protocol, dataset root and image list, ignore value,
``--limit``), so equal cells of different tables are one run, evaluated once with
:func:`proxyclip.evaluation.runner.evaluate` and recorded in ``RUNS/cells/KEY.json`` next to
the runner's result file; later invocations reuse it. A cell whose method, option value or VFM is
not registered, or whose dataset has no root, is never filled: it says why.

Rendering (:func:`render_table`) gives the table in the paper's layout, every cell
``ours (published, ours - published)``, as Markdown, CSV and JSON.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ProxyCLIPError
from ..model.config import WEIGHT_FIELDS, ProxyCLIPConfig
from ..model.methods import METHODS

TABLES = tuple(f"table{i}" for i in range(1, 9))
FIGURES = ("fig1", "fig4", "fig8")
BUILTIN = (*TABLES, *FIGURES)
KINDS = ("miou", "efficiency", "sweep", "coherence", "similarity")
CELL_KIND = "proxyclip-grid-cell"

# Cell statuses, and how a cell that holds no number of ours reads.
DONE, REFERENCE, UNAVAILABLE, NO_ROOT, FAILED, PENDING = "done", "reference", "unavailable", "no-root", "failed", "pending"
STATUS_TEXT = {REFERENCE: "not reproduced", UNAVAILABLE: "not available", NO_ROOT: "not run, no dataset root",
               FAILED: "failed", PENDING: "not run"}


# ---- specs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A column: a dataset (preset key) and settings of its own, over the row's."""

    key: str
    title: str
    dataset: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Average:
    """The average column: the mean of ``of`` (column keys), shown where all of them are ours."""

    key: str
    title: str
    of: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """A row: the paper's label, its configuration (None: published numbers only) and the
    published number of each column (and of the average), None where the paper has none."""

    label: str
    config: Mapping[str, Any] | None
    published: Mapping[str, float | None]
    group: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    average: Average | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    notes: tuple[str, ...] = ()
    kind: str = "miou"
    row_title: str = "Configuration"  # the heading of the label column
    extra: Mapping[str, Any] = field(default_factory=dict)  # other entries of the file (e.g. Table 5's "bench")

    @property
    def keys(self) -> tuple[str, ...]:
        """Column keys in order, the average's last."""
        return tuple(c.key for c in self.columns) + ((self.average.key,) if self.average else ())


def spec_path(name: str) -> Path:
    return Path(str(resources.files("proxyclip") / "data" / "tables" / f"{name}.json"))


def load_spec(name: str | Path) -> dict:
    """A shipped spec by name (``table1`` ... ``fig8``) or a JSON file of the same shape, as a dict."""
    text_name = str(name)
    path = spec_path(text_name) if text_name in BUILTIN else Path(text_name).expanduser()
    if text_name not in BUILTIN and not path.suffix == ".json" and not path.is_file():
        raise ProxyCLIPError(f"unknown table {text_name!r}: use one of {', '.join(BUILTIN)}, all, or a JSON file "
                             "(`proxyclip reproduce table1 --print-spec > mine.json` gives one to edit)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProxyCLIPError(f"table file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProxyCLIPError(f"cannot read table file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ProxyCLIPError(f"table file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ProxyCLIPError(f"table file {path} must hold a JSON object with a \"name\" (see a shipped one: "
                             "`proxyclip reproduce table1 --print-spec`)")
    kind = data.get("kind", "miou")
    if kind not in KINDS:
        raise ProxyCLIPError(f"table file {path}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    data["kind"] = kind
    data.setdefault("_origin", str(path))
    return data


def _fail(origin: str, what: str) -> ProxyCLIPError:
    return ProxyCLIPError(f"table {origin}: {what}")


def table_spec(data: Mapping[str, Any]) -> TableSpec:
    """Check a spec dict (as :func:`load_spec` returns for kinds miou and efficiency) and build it."""
    from .presets import PRESETS

    origin = data.get("_origin", data.get("name", "?"))
    kind = data.get("kind", "miou")
    raw_columns = data.get("columns")
    if not isinstance(raw_columns, list) or not raw_columns:
        raise _fail(origin, "\"columns\" must be a non-empty list")
    columns = []
    for c in raw_columns:
        if isinstance(c, str):
            c = {"key": c, "dataset": c}
        if not isinstance(c, dict) or "key" not in c:
            raise _fail(origin, f"a column must be a dataset key or an object with \"key\", got {c!r}")
        dataset = c.get("dataset")
        if kind != "efficiency":
            if dataset is None:
                raise _fail(origin, f"column {c['key']!r} names no \"dataset\"")
            if dataset not in PRESETS:
                raise _fail(origin, f"column {c['key']!r}: unknown dataset {dataset!r}; use one of {', '.join(PRESETS)}")
        config = c.get("config") or {}
        if not isinstance(config, dict):
            raise _fail(origin, f"column {c['key']!r}: \"config\" must be an object of settings")
        title = c.get("title") or (PRESETS[dataset].title if dataset in PRESETS else c["key"])
        columns.append(Column(str(c["key"]), str(title), dataset, dict(config)))
    keys = [c.key for c in columns]
    if len(set(keys)) != len(keys):
        raise _fail(origin, "column keys must be unique")
    average = None
    if data.get("average"):
        a = data["average"]
        of = tuple(a.get("of") or keys)
        unknown = [k for k in of if k not in keys]
        if unknown:
            raise _fail(origin, f"the average is of unknown column(s) {', '.join(unknown)}")
        average = Average(str(a.get("key", "avg")), str(a.get("title", "Avg.")), of)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise _fail(origin, "\"defaults\" must be an object of settings")
    all_keys = keys + ([average.key] if average else [])
    rows = []
    for r in data.get("rows") or []:
        if not isinstance(r, dict) or "label" not in r:
            raise _fail(origin, f"a row must be an object with a \"label\", got {r!r}")
        published = r.get("published") or {}
        if isinstance(published, list):
            if len(published) != len(all_keys):
                raise _fail(origin, f"row {r['label']!r}: {len(published)} published numbers for {len(all_keys)} columns")
            published = dict(zip(all_keys, published))
        unknown = sorted(set(published) - set(all_keys))
        if unknown:
            raise _fail(origin, f"row {r['label']!r}: published numbers for unknown column(s) {', '.join(unknown)}")
        for k, v in published.items():
            if v is not None and not isinstance(v, (int, float)):
                raise _fail(origin, f"row {r['label']!r}, column {k!r}: a published number must be a number or null")
        config = r.get("config", {})
        if config is not None and not isinstance(config, dict):
            raise _fail(origin, f"row {r['label']!r}: \"config\" must be an object of settings or null")
        rows.append(Row(str(r["label"]), config, {k: published.get(k) for k in all_keys}, r.get("group"), r.get("note")))
    if not rows:
        raise _fail(origin, "\"rows\" must be a non-empty list")
    notes = data.get("notes") or []
    return TableSpec(str(data["name"]), str(data.get("title", data["name"])), tuple(columns), tuple(rows), average,
                     dict(defaults), str(data.get("source", "")), tuple(str(n) for n in notes), kind,
                     str(data.get("row_title", "Configuration")),
                     {k: v for k, v in data.items() if k not in _SPEC_KEYS})


_SPEC_KEYS = {"name", "title", "columns", "rows", "average", "defaults", "source", "notes", "kind", "row_title", "_origin"}


def sweep_specs(data: Mapping[str, Any]) -> list[TableSpec]:
    """A sweep (Fig. 8): one table per swept option, a row per value, the columns' datasets."""
    origin = data.get("_origin", data.get("name", "?"))
    sweeps = data.get("sweeps")
    if not isinstance(sweeps, list) or not sweeps:
        raise _fail(origin, "\"sweeps\" must be a non-empty list of {\"option\", \"values\"}")
    specs = []
    for s in sweeps:
        if not isinstance(s, dict) or "option" not in s or not s.get("values"):
            raise _fail(origin, f"a sweep needs \"option\" and \"values\", got {s!r}")
        rows = [{"label": f"{s['option']} = {v:g}" if isinstance(v, (int, float)) else f"{s['option']} = {v}",
                 "config": {s["option"]: v}, "published": {}} for v in s["values"]]
        specs.append(table_spec({**data, "kind": "miou", "name": f"{data['name']}-{s['option']}",
                                 "title": f"{data.get('title', data['name'])}: {s.get('title', s['option'])}",
                                 "rows": rows}))
    return specs


# ---- planning cells -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: local files by CLIP name / VFM key, else the hub; or random."""

    clip_files: Mapping[str, str] = field(default_factory=dict)
    vfm_files: Mapping[str, str] = field(default_factory=dict)
    random: bool = False

    def clip_file(self, name: str) -> str | None:
        return self.clip_files.get(name)

    def vfm_file(self, key: str) -> str | None:
        return self.vfm_files.get(key)

    def identity(self, kind: str, name: str, tag: str | None = None) -> str:
        """A string that changes when these weights would (a file's path, size and time)."""
        if self.random:
            return "random"
        file = self.clip_file(name) if kind == "clip" else self.vfm_file(name)
        if file is None:
            return f"hub:{name}:{tag}" if tag is not None else f"hub:{name}"
        path = Path(file).expanduser()
        try:
            stat = path.stat()
            return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return f"file:{path}"


@dataclass(frozen=True)
class RunSpec:
    """One evaluation: a configuration (dataset settings applied) on a dataset."""

    key: str
    config: ProxyCLIPConfig
    overrides: Mapping[str, Any]  # general settings forced over the dataset's protocol (recorded by evaluate)
    protocol: str
    dataset: str
    images: int  # images it scores (after --limit)
    ident: Mapping[str, Any]  # what the key hashes

    @property
    def weights(self) -> tuple:
        """The weights the model needs (the VFM only where the method uses one)."""
        w = self.config.weights()
        return w["clip"], w["clip_pretrained"], w["vfm"]


@dataclass
class Cell:
    status: str
    reason: str | None = None
    run: RunSpec | None = None
    result: dict | None = None  # the runner's result record, once done
    value: float | None = None  # our number (mIoU, or a Table 5 measure)
    partial: bool = False  # from a run on part of the images (--limit)
    source: str | None = None  # the file our number comes from


@dataclass
class GridContext:
    """What every cell of an invocation shares."""

    roots: Mapping[str, Path]
    weights: WeightsSource = field(default_factory=WeightsSource)
    dtype: str = "float32"
    limit: int | None = None
    published_ignore: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)  # general settings from the command line
    clip: str | None = None  # replaces every row's CLIP
    clip_pretrained: str | None = None
    datasets: dict = field(default_factory=dict)  # preset key -> SegmentationDataset, or the error text

    def dataset(self, key: str):
        """The dataset of a preset key (listed once), None without a root; raises its error."""
        from .datasets import SegmentationDataset
        from .presets import PRESETS

        if key not in self.roots:
            return None
        if key not in self.datasets:
            try:
                self.datasets[key] = SegmentationDataset(PRESETS[key], self.roots[key], published_ignore=self.published_ignore)
            except ProxyCLIPError as exc:
                self.datasets[key] = str(exc)
        found = self.datasets[key]
        if isinstance(found, str):
            raise ProxyCLIPError(found)
        return found


_CONFIG_FIELDS = {f.name for f in fields(ProxyCLIPConfig)}
_GENERAL = _CONFIG_FIELDS - {*WEIGHT_FIELDS, "method", "options"}


def _flatten(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings: an ``options`` object's entries are lifted (rows may write either)."""
    flat = {k: v for k, v in settings.items() if k != "options"}
    if isinstance(settings.get("options"), dict):
        flat.update(settings["options"])
    return flat


def plan_cell(spec: TableSpec, row: Row, column: Column, ctx: GridContext) -> Cell:
    """What one cell is: a run to do (or done), or why there is none."""
    from ..model.vfm import VFM_BUILDERS
    from .presets import PRESETS
    from .runner import dataset_settings

    if row.config is None:
        return Cell(REFERENCE, row.note or "published numbers only")
    settings = {**_flatten(spec.defaults), **_flatten(row.config), **_flatten(column.config)}
    protocol = settings.pop("protocol", "method")
    if ctx.clip is not None:
        settings["clip"] = ctx.clip
        settings["clip_pretrained"] = ctx.clip_pretrained
    method = settings.get("method", "proxyclip")
    if method not in METHODS:
        return Cell(UNAVAILABLE, f"method {method!r} is not available in this version")
    general = {k: v for k, v in settings.items() if k in _GENERAL}
    named = {k: v for k, v in settings.items() if k not in _GENERAL}
    try:
        base = ProxyCLIPConfig.create(**named)
    except ProxyCLIPError as exc:
        return Cell(UNAVAILABLE, f"{method}: {exc}")
    except TypeError as exc:
        return Cell(UNAVAILABLE, f"{method}: {exc}")
    if base.needs_vfm and base.vfm not in VFM_BUILDERS:
        return Cell(UNAVAILABLE, f"VFM {base.vfm!r} is not available in this installation")
    preset = PRESETS[column.dataset]
    try:
        data = ctx.dataset(preset.key)
    except ProxyCLIPError as exc:
        return Cell(FAILED, str(exc))
    if data is None:
        return Cell(NO_ROOT, f"--roots {preset.key}=PATH")
    overrides = {**general, **ctx.overrides}
    try:
        config = base.updated(**dataset_settings(method, preset, overrides, protocol))
    except ProxyCLIPError as exc:
        return Cell(UNAVAILABLE, f"{method}: {exc}")
    images = len(data) if ctx.limit is None else min(ctx.limit, len(data))
    run_settings = config.settings()
    if not config.needs_vfm:
        run_settings["vfm"] = None
    ident = {
        "weights": {"clip": ctx.weights.identity("clip", config.clip, config.clip_pretrained),
                    "vfm": ctx.weights.identity("vfm", config.vfm) if config.needs_vfm else None},
        "dtype": ctx.dtype, "settings": run_settings, "protocol": protocol,
        "overrides": {k: v for k, v in sorted(overrides.items()) if v is not None},
        "dataset": preset.key, "root": str(data.root.resolve()), "ids": data.ids_digest(),
        "ignore_index": data.ignore_index, "limit": ctx.limit,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Cell(PENDING, None, RunSpec(key, config, overrides, protocol, preset.key, images, ident))


def plan_table(spec: TableSpec, ctx: GridContext) -> list[list[Cell]]:
    """The cells of a table, rows by columns (the average is computed when rendering)."""
    return [[plan_cell(spec, row, column, ctx) for column in spec.columns] for row in spec.rows]


def unique_runs(plans: Iterable[list[list[Cell]]]) -> list[RunSpec]:
    """Every run of the given plans once, in first-seen order."""
    runs: dict[str, RunSpec] = {}
    for plan in plans:
        for row in plan:
            for cell in row:
                if cell.run is not None:
                    runs.setdefault(cell.run.key, cell.run)
    return list(runs.values())


# ---- finished runs ---------------------------------------------------------------------------------

def record_path(runs_dir: Path, key: str) -> Path:
    return Path(runs_dir) / "cells" / f"{key}.json"


def find_result(run: RunSpec, runs_dir: Path) -> dict | None:
    """The runner's result of a finished run, if its record and result file are there and agree."""
    try:
        record = json.loads(record_path(runs_dir, run.key).read_text(encoding="utf-8"))
        result = json.loads((Path(runs_dir) / record["result"]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    settings = dict(result.get("config") or {})
    if not run.config.needs_vfm:
        settings["vfm"] = None
    same = (record.get("kind") == CELL_KIND and record.get("key") == run.key and result.get("dataset") == run.dataset
            and result.get("num_images") == run.images and settings == run.ident["settings"]
            and str(Path(result.get("root", "")).resolve()) == run.ident["root"])
    return result if same else None


def write_record(run: RunSpec, result: dict, runs_dir: Path) -> None:
    from ..images import write_atomically

    record = {"kind": CELL_KIND, "key": run.key, "result": f"{result['dataset']}-{result['config_id']}.json",
              "mIoU": result["metrics"]["mIoU"], "ident": run.ident,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomically({record_path(runs_dir, run.key): json.dumps(record, indent=1, default=str) + "\n"})


def attach_results(plans: Iterable[list[list[Cell]]], results: Mapping[str, dict],
                   failures: Mapping[str, str] | None = None) -> None:
    """Mark cells done (with their result) or failed (with the reason), by run key."""
    failures = failures or {}
    for plan in plans:
        for row in plan:
            for cell in row:
                if cell.run is None:
                    continue
                if cell.run.key in results:
                    result = results[cell.run.key]
                    cell.status, cell.result, cell.value = DONE, result, result["metrics"]["mIoU"]
                    cell.partial = not result.get("complete", True)
                    cell.source = f"{result['dataset']}-{result['config_id']}.json"
                elif cell.run.key in failures:
                    cell.status, cell.reason = FAILED, failures[cell.run.key]


# ---- running -----------------------------------------------------------------------------------------

class Progress:
    """Images done over the whole grid, with an estimate of the time left, as lines on stderr."""

    def __init__(self, total: int, cells: int, enabled: bool = True, every: float = 10.0, stream=None):
        self.total, self.cells, self.enabled, self.every = total, cells, enabled, every
        self.done, self.cell = 0, 0
        self.start = self._last = time.perf_counter()
        self.stream = stream or sys.stderr

    def eta(self) -> float | None:
        """Seconds left, from the rate so far (None before the first image)."""
        elapsed = time.perf_counter() - self.start
        if self.done <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / self.done

    def line(self, what: str = "") -> str:
        eta = self.eta()
        left = "estimating time left" if eta is None else f"~{format_duration(eta)} left"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"reproduce: cell {self.cell}/{self.cells}{' ' + what if what else ''}; grid {self.done}/{self.total} "
                f"images ({pct:.1f}%), {left}")

    def update(self, images: int, what: str = "", force: bool = False) -> None:
        self.done += images
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= self.every):
            self._last = now
            print(self.line(what), file=self.stream, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m"


def weights_groups(runs: Sequence[RunSpec]) -> list[tuple[tuple, list[RunSpec]]]:
    """Runs grouped by the models they need, so that each is built once: by CLIP, then by VFM;
    runs of methods without a VFM join a group of the same CLIP."""
    by_clip: dict[tuple, dict[str | None, list[RunSpec]]] = {}
    for run in runs:
        clip, pretrained, vfm = run.weights
        by_clip.setdefault((clip, pretrained), {}).setdefault(vfm, []).append(run)
    groups = []
    for (clip, pretrained), by_vfm in by_clip.items():
        plain = by_vfm.pop(None, [])
        items = list(by_vfm.items())
        if items:
            items[0] = (items[0][0], [*plain, *items[0][1]])
        else:
            items = [(None, plain)]
        groups += [((clip, pretrained, vfm), group) for vfm, group in items]
    return groups


def switch_config(model, config: ProxyCLIPConfig):
    """``model`` (same weights) with every inference setting of ``config``."""
    changes = {f.name: getattr(config, f.name) for f in fields(ProxyCLIPConfig) if f.name not in WEIGHT_FIELDS}
    return model.with_config(**changes)


def run_grid(
    runs: Sequence[RunSpec],
    ctx: GridContext,
    runs_dir: Path,
    build: Callable[[ProxyCLIPConfig], Any],
    run_options: Any,
    *,
    dist: Any = None,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Evaluate every run not finished before; reuse the others.

    Args:
        runs: the unique runs of every table asked for.
        build: config -> a ProxyCLIP with that config's weights (called once per weights group).
        run_options: :class:`~proxyclip.evaluation.runner.RunOptions` (``out_dir`` and ``limit`` are set here).
        dist: :class:`~proxyclip.evaluation.distributed.DistInfo` (rank 0 writes the records).

    Returns:
        (results by run key, failure reasons by run key).
    """
    from dataclasses import replace

    from .distributed import DistInfo
    from .runner import evaluate

    dist = dist or DistInfo()
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    todo = []
    for run in runs:
        found = None if restart else find_result(run, runs_dir)
        if found is not None:
            results[run.key] = found
        else:
            todo.append(run)
    rank0 = dist.rank == 0
    if rank0:
        log(f"reproduce: {len(runs)} cells, {len(runs) - len(todo)} done before, {len(todo)} to run "
            f"({sum(r.images for r in todo)} images)")
    meter = Progress(sum(r.images for r in todo), len(todo), enabled=progress and rank0)
    options = replace(run_options, out_dir=Path(runs_dir), limit=ctx.limit, resume=not restart, progress=False)
    for (clip, pretrained, vfm), group in weights_groups(todo):
        model = None
        try:
            model = build(group[-1].config if vfm is not None else group[0].config)
        except ProxyCLIPError as exc:  # weights missing (WeightsError), unknown CLIP, ...
            for run in group:
                failures[run.key] = str(exc)
            if rank0:
                log(f"reproduce: {clip} ({pretrained}){' + ' + vfm if vfm else ''}: {exc}")
            meter.cell += len(group)
            meter.update(sum(r.images for r in group))
            continue
        for run in sorted(group, key=lambda r: r.dataset):
            meter.cell += 1
            what = f"{run.dataset} | {_short_label(run.config)}"
            seen = [0]

            def on_image(count: int, seen=seen, what=what) -> None:
                meter.update((count - seen[0]) * dist.world, what)
                seen[0] = count

            try:
                data = ctx.dataset(run.dataset)
                result = evaluate(switch_config(model, run.config), data, options, dist=dist,
                                  overrides=run.overrides, protocol=run.protocol, on_image=on_image)
            except ProxyCLIPError as exc:
                failures[run.key] = str(exc)
                if rank0:
                    log(f"reproduce: {what}: failed: {exc}")
                meter.update(run.images - seen[0] * dist.world)
                continue
            meter.update(max(0, run.images - seen[0] * dist.world), what, force=True)
            results[run.key] = result
            if rank0:
                write_record(run, result, runs_dir)
                log(f"reproduce: {what}: mIoU {result['metrics']['mIoU']} ({result['num_images']} images)")
        del model
    return results, failures


def _short_label(config: ProxyCLIPConfig) -> str:
    spec = METHODS[config.method]
    what = f"{spec.title} + {config.vfm}" if config.needs_vfm else spec.title
    options = config.settings()
    defaults = ProxyCLIPConfig.create(method=config.method).settings()
    changed = [f"{k} {v}" for k, v in options.items()
               if k not in (*WEIGHT_FIELDS, "method", "window", "stride", "short_side", "long_side", "bg_threshold")
               and v != defaults.get(k)]
    return f"{config.clip} {what}" + (f" [{', '.join(changed)}]" if changed else "")


# ---- rendering ------------------------------------------------------------------------------------------

def _round2(x: float) -> float:
    return float(round(x + 0.0, 2))


def cell_value(cell: Cell) -> float | None:
    return cell.value if cell.status == DONE else None


def difference(ours: float | None, published: float | None) -> float | None:
    """ours - published, rounded to two decimals (None if either is missing)."""
    if ours is None or published is None:
        return None
    return _round2(ours - published)


def format_cell(ours: float | None, published: float | None, status: str, partial: bool = False) -> str:
    """``ours (published, difference)``; a cell without a number of ours says why, never shows the
    published number alone."""
    pub = "-" if published is None else f"{published:g}"
    if status == DONE and ours is not None:
        star = "*" if partial else ""
        if published is None:
            return f"{ours:.2f}{star} (-)"
        return f"{ours:.2f}{star} ({pub}, {difference(ours, published):+.2f})"
    text = STATUS_TEXT.get(status, status)
    return text if published is None else f"{text} (published {pub})"


@dataclass
class RenderedTable:
    markdown: str
    csv: str
    record: dict


def render_table(spec: TableSpec, plan: list[list[Cell]], *, limit: int | None = None,
                 extra_notes: Sequence[str] = ()) -> RenderedTable:
    """The table in the paper's layout: Markdown, CSV (same cells) and a JSON record of every number."""
    header = [spec.row_title, *(c.title for c in spec.columns)] + ([spec.average.title] if spec.average else [])
    body: list[list[str]] = []
    record_rows = []
    reasons: dict[str, list[str]] = {}
    partial_any = False
    group = None
    for row, cells in zip(spec.rows, plan):
        if row.group and row.group != group:
            group = row.group
            body.append([f"**{group}**"] + [""] * (len(header) - 1))
        out_cells, rec_cells = [], {}
        for column, cell in zip(spec.columns, cells):
            ours = cell_value(cell)
            partial = cell.partial
            partial_any |= partial
            published = row.published.get(column.key)
            out_cells.append(format_cell(ours, published, cell.status, partial))
            if cell.status not in (DONE, PENDING) and cell.reason:
                reasons.setdefault(f"{STATUS_TEXT[cell.status]}: {cell.reason}", []).append(row.label)
            rec_cells[column.key] = {
                "status": cell.status, "ours": ours, "published": published, "difference": difference(ours, published),
                "partial": partial, "reason": cell.reason,
                "result": cell.source,
                "config_label": cell.result.get("config_label") if cell.result else None,
                "run_key": cell.run.key if cell.run else None,
            }
        if spec.average:
            parts = [rec_cells[k] for k in spec.average.of]
            published = row.published.get(spec.average.key)
            if all(p["status"] == DONE and p["ours"] is not None for p in parts):
                ours = _round2(math.fsum(p["ours"] for p in parts) / len(parts))
                partial = any(p["partial"] for p in parts)
                out_cells.append(format_cell(ours, published, DONE, partial))
                rec_cells[spec.average.key] = {"status": DONE, "ours": ours, "published": published,
                                               "difference": difference(ours, published), "partial": partial}
            else:
                statuses = {p["status"] for p in parts}
                status = REFERENCE if statuses == {REFERENCE} else UNAVAILABLE if statuses == {UNAVAILABLE} else PENDING
                out_cells.append(format_cell(None, published, status))
                rec_cells[spec.average.key] = {"status": status, "ours": None, "published": published,
                                               "difference": None, "partial": False}
        body.append([row.label, *out_cells])
        record_rows.append({"label": row.label, "group": row.group, "config": row.config, "note": row.note,
                            "cells": rec_cells})
    notes = ["Each cell: ours (published, ours - published), mIoU in %." if spec.kind == "miou"
             else "Each cell: ours (published, ours - published)."]
    if partial_any or limit is not None:
        notes.append(f"* only the first {limit} images of each dataset (--limit {limit}): not comparable with the "
                     "published numbers." if limit is not None else "* a partial run (not every image).")
    notes += [*spec.notes, *extra_notes]
    notes += [f"{reason} ({', '.join(dict.fromkeys(labels))})" for reason, labels in reasons.items()]
    lines = [f"# {spec.title}", ""]
    if spec.source:
        lines += [f"Published numbers: {spec.source}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += [""] + [f"- {n}" for n in notes]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(body)
    record = {"name": spec.name, "title": spec.title, "source": spec.source, "limit": limit,
              "columns": [{"key": c.key, "title": c.title, "dataset": c.dataset} for c in spec.columns],
              "average": {"key": spec.average.key, "of": list(spec.average.of)} if spec.average else None,
              "rows": record_rows, "notes": notes}
    return RenderedTable("\n".join(lines) + "\n", buf.getvalue(), record)


def write_table(out_dir: Path, rendered: RenderedTable, name: str) -> list[Path]:
    from ..images import write_atomically

    paths = {Path(out_dir) / f"{name}.md": rendered.markdown, Path(out_dir) / f"{name}.csv": rendered.csv,
             Path(out_dir) / f"{name}.json": json.dumps(rendered.record, indent=1, default=str) + "\n"}
    write_atomically(paths)
    return list(paths)
