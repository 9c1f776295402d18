"""``proxyclip reproduce``: the paper's tables and figures by one command, next to the published numbers.

Tables and figures are data files (:mod:`proxyclip.evaluation.grid`); the cells of every target
asked for are planned together, each distinct run evaluated once (and reused by later
invocations), then every table is written as OUT/NAME.md, .csv and .json, every figure as
OUT/NAME.png with its numbers beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ProxyCLIPError
from ..evaluation import grid
from .options import EXIT_OK, EXIT_PARTIAL, GENERAL_SETTINGS, PRECISIONS

OVERRIDABLE = ("window", "stride", "short_side", "long_side", "bg_threshold", "logit_scale")


def add_reproduce_parser(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="regenerate the paper's tables and figures, next to the published numbers",
        description="Evaluate every configuration of the paper's tables (table1 ... table8) and figures (fig1, fig4, "
                    "fig8) on the datasets given by --roots-file, and write OUT/NAME.md and .csv in the paper's layout, "
                    "each cell 'ours (published, ours - published)', and OUT/NAME.json with every number. A cell that "
                    "is not run (no dataset root, a method or VFM not available here, a training-based row) says so. "
                    "Each configuration is evaluated once per dataset and reused by every table that holds it, also "
                    "across invocations (OUT/runs); killed runs resume. A table is a JSON file: --print-spec shows one "
                    "to copy and edit, then pass the file as TARGET. Under torchrun the images are sharded like eval's.",
    )
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help=f"{', '.join(grid.BUILTIN)}, all, or a table JSON file")
    p.add_argument("--print-spec", action="store_true", help="print the TARGET's JSON (to copy and edit) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells: to run, done before, or why not run; load no model")
    p.add_argument("--roots", nargs="+", default=[], metavar="KEY=PATH", help="dataset roots, e.g. voc21=data/VOCdevkit/VOC2012")
    p.add_argument("--roots-file", type=Path, metavar="FILE",
                   help='a JSON object {"voc21": "PATH", ...} or lines "voc21 = PATH" (as for eval)')
    p.add_argument("--out", "-o", type=Path, default=Path("proxyclip_reproduce"),
                   help="output folder: tables, figures, and the runs under OUT/runs (default: %(default)s)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="only the first N images of each dataset (a quick look; marked * in the tables)")
    p.add_argument("--published-ignore", action="store_true",
                   help="ADE847 / Context459: ignore label 255 as the published runs did (see eval --help)")
    p.add_argument("--restart", action="store_true", help="evaluate every cell again, ignoring finished and saved runs")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that load and resize images (default: min(4, CPUs))")
    p.add_argument("--batch-images", type=int, default=1, metavar="N", help="run the windows of N images together")
    p.add_argument("--checkpoint-every", type=int, default=20, metavar="N", help="save progress every N images")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    g = p.add_argument_group("models and weights (the tables name the models; these say where the weights are)")
    g.add_argument("--clip-weights", nargs="+", default=[], metavar="NAME=FILE",
                   help="local CLIP checkpoints by open_clip name, e.g. ViT-B-16=clip-b16.safetensors")
    g.add_argument("--vfm-weights", nargs="+", default=[], metavar="KEY=FILE",
                   help="local VFM checkpoints by VFM key, e.g. dino_vitb8=dino.safetensors sd15=sd-v1-5/")
    g.add_argument("--clip", default=None, metavar="NAME",
                   help="replace every row's CLIP by this open_clip model (the tables say so in a note)")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG", help="with --clip: its pretrained tag")
    g.add_argument("--random-weights", action="store_true",
                   help="RANDOM weights of the real architectures (tests only: every number is meaningless)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS, help="model precision (default: %(default)s)")
    s = p.add_argument_group("settings forced over every dataset's protocol (recorded in each run; the published "
                             "numbers used the protocol's)")
    for name in OVERRIDABLE:
        kind, text = GENERAL_SETTINGS[name]
        s.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.set_defaults(func=run_reproduce)


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ProxyCLIPError(f"{option} takes NAME=FILE pairs, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _targets(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for target in (grid.BUILTIN if name == "all" else (name,)):
            if target not in out:
                out.append(target)
    return out


def run_reproduce(args: argparse.Namespace) -> int:
    from .eval import _read_roots

    targets = _targets(args.targets)
    if args.print_spec:
        if len(targets) != 1:
            raise ProxyCLIPError("--print-spec prints one TARGET")
        data = grid.load_spec(targets[0])
        data.pop("_origin", None)
        path = grid.spec_path(targets[0])
        print(path.read_text(encoding="utf-8") if targets[0] in grid.BUILTIN else json.dumps(data, indent=2, ensure_ascii=False),
              end="" if targets[0] in grid.BUILTIN else "\n")
        return EXIT_OK
    if args.limit is not None and args.limit < 1:
        raise ProxyCLIPError("--limit must be at least 1")
    specs = [grid.load_spec(t) for t in targets]  # check every file before any work
    tables: list[tuple[str, grid.TableSpec]] = []
    for data in specs:
        if data["kind"] in ("miou", "efficiency"):
            tables.append((data["name"], grid.table_spec(data)))
        elif data["kind"] == "sweep":
            tables += [(s.name, s) for s in grid.sweep_specs(data)]
    ctx = grid.GridContext(
        roots=_read_roots(args),
        weights=grid.WeightsSource(_pairs(args.clip_weights, "--clip-weights"), _pairs(args.vfm_weights, "--vfm-weights"),
                                   args.random_weights),
        dtype={"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[args.precision],
        limit=args.limit, published_ignore=args.published_ignore,
        overrides={k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None},
        clip=args.clip, clip_pretrained=args.clip_pretrained if args.clip else None,
    )
    if args.clip_pretrained is not None and args.clip is None:
        raise ProxyCLIPError("--clip-pretrained goes with --clip (the tables name each row's CLIP)")
    miou_tables = [(name, spec) for name, spec in tables if spec.kind == "miou"]
    plans = {name: grid.plan_table(spec, ctx) for name, spec in miou_tables}
    runs = grid.unique_runs(plans.values())
    out = args.out
    runs_dir = out / "runs" if args.limit is None else out / f"runs-limit{args.limit}"
    if args.dry_run:
        return _dry_run(miou_tables, plans, runs, runs_dir, args)

    from ..evaluation.distributed import init_distributed
    from ..evaluation.runner import RunOptions, default_workers
    from .options import ensure_writable_dir, resolve_device

    ensure_writable_dir(out)
    device = resolve_device(args.device)
    dist = init_distributed(device.type)
    if dist.world > 1 and device.type == "cuda":
        args.device = f"cuda:{dist.local_rank}"
    partial = False
    try:
        options = RunOptions(workers=default_workers() if args.workers is None else args.workers,
                             checkpoint_every=args.checkpoint_every, batch_images=args.batch_images)
        results, failures = {}, {}
        if miou_tables:
            results, failures = grid.run_grid(runs, ctx, runs_dir, lambda config: _build(args, ctx, config), options,
                                              dist=dist, restart=args.restart, progress=not args.no_progress)
        partial |= bool(failures)
        grid.attach_results(plans.values(), results, failures)
        if dist.rank == 0:
            notes = _notes(args)
            for name, spec in miou_tables:
                rendered = grid.render_table(spec, plans[name], limit=args.limit, extra_notes=notes)
                grid.write_table(out, rendered, name)
                print(rendered.markdown)
            for data in specs:
                if data["kind"] == "sweep":
                    from ..evaluation import figures

                    records = [grid.render_table(spec, plans[name], limit=args.limit).record
                               for name, spec in miou_tables if name.startswith(data["name"] + "-")]
                    paths = figures.write_sweep_figure(out, data, records)
                    print(f"{data['name']}: {', '.join(str(p) for p in paths)}", file=sys.stderr)
        for name, spec in tables:
            if spec.kind == "efficiency" and dist.rank == 0:
                rendered, failed = _efficiency(args, ctx, spec, out)
                partial |= failed
                grid.write_table(out, rendered, name)
                print(rendered.markdown)
        for data in specs:
            if data["kind"] in ("coherence", "similarity") and dist.rank == 0:
                partial |= _figure(args, ctx, data, out)
    finally:
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return EXIT_PARTIAL if partial else EXIT_OK


def _notes(args: argparse.Namespace) -> list[str]:
    notes = []
    if args.clip:
        notes.append(f"Every row's CLIP replaced by {args.clip} ({args.clip_pretrained or 'its default tag'}) "
                     "(--clip): not the paper's configurations.")
    if args.random_weights:
        notes.append("RANDOM weights (--random-weights): every number of ours is meaningless.")
    forced = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None}
    if forced:
        notes.append("Settings forced over the protocol: " + ", ".join(f"{k} {v}" for k, v in forced.items()) + ".")
    if args.published_ignore:
        notes.append("ADE847 / Context459 scored with the published runs' ignore label 255 (--published-ignore).")
    if args.precision != "fp32":
        notes.append(f"Models in {args.precision}.")
    return notes


def _build(args: argparse.Namespace, ctx: grid.GridContext, config):
    from ..model.segmenter import ProxyCLIP
    from .options import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return ProxyCLIP.build(
        config,
        clip_weights=ctx.weights.clip_file(config.clip),
        vfm_weights=ctx.weights.vfm_file(config.vfm) if config.needs_vfm else None,
        random_weights=args.random_weights,
        device=device,
        dtype=resolve_dtype(args.precision, device),
    )


def _dry_run(tables, plans, runs, runs_dir: Path, args) -> int:
    done = {run.key for run in runs if grid.find_result(run, runs_dir) is not None}
    todo = [run for run in runs if run.key not in done]
    print(f"{len(runs)} distinct runs: {len(done)} done before, {len(todo)} to run "
          f"({sum(r.images for r in todo)} images)")
    for name, spec in tables:
        print(f"\n{name}: {spec.title}")
        for row, cells in zip(spec.rows, plans[name]):
            states: dict[str, list[str]] = {}
            for column, cell in zip(spec.columns, cells):
                if cell.run is not None:
                    state = "done" if cell.run.key in done else "to run"
                elif cell.status == grid.NO_ROOT:
                    state = grid.STATUS_TEXT[cell.status]
                else:
                    state = f"{grid.STATUS_TEXT[cell.status]} ({cell.reason})"
                states.setdefault(state, []).append(column.title)
            parts = [state if len(cols) == len(spec.columns) else f"{state}: {', '.join(cols)}"
                     for state, cols in states.items()]
            print(f"  {row.label}: " + "; ".join(parts))
    return EXIT_OK


# ---- Table 5: efficiency through `proxyclip bench` ---------------------------------------------------

EFFICIENCY_MEASURES = {  # Table 5's columns -> the bench's numbers
    "params_m": lambda r: r["params_total_m"],
    "speed_ips": lambda r: r["batch1"]["per_s"],
    "memory_mib": lambda r: r["batch1"]["peak_mib"],
    "flops_g": lambda r: r["gmacs"],
}


def spec_bench_settings(spec: grid.TableSpec) -> dict:
    """The bench settings a Table 5 spec sets (its "bench" object: window, queries, warmup, iters, matmul_size)."""
    return dict(spec.extra.get("bench", {}))


def _efficiency(args: argparse.Namespace, ctx: grid.GridContext, spec: grid.TableSpec, out: Path):
    from ..images import write_atomically
    from ..model.methods import METHODS
    from ..model.vfm import VFM_BUILDERS
    from .bench import run_bench

    defaults = grid._flatten(spec.defaults)
    clip = ctx.clip or defaults.get("clip", "ViT-B-16")
    plan: list[list[grid.Cell]] = []
    names: dict[int, str] = {}
    for i, row in enumerate(spec.rows):
        if row.config is None:
            plan.append([grid.Cell(grid.REFERENCE, row.note or "published numbers only") for _ in spec.columns])
            continue
        settings = {**defaults, **grid._flatten(row.config)}
        method, vfm = settings.get("method", "proxyclip"), settings.get("vfm")
        reason = None
        if method not in METHODS:
            reason = f"method {method!r} is not available in this version"
        elif METHODS[method].needs_vfm and vfm not in VFM_BUILDERS:
            reason = f"VFM {vfm!r} is not available in this installation"
        if reason:
            plan.append([grid.Cell(grid.UNAVAILABLE, reason) for _ in spec.columns])
            continue
        names[i] = f"{method}:{vfm}" if METHODS[method].needs_vfm else method
        plan.append([grid.Cell(grid.PENDING) for _ in spec.columns])
    bench_file = out / f"{spec.name}-bench.json"
    wanted = {"rows": sorted(set(names.values())), "clip": clip, "precision": args.precision,
              "random_weights": args.random_weights, "device": args.device, "bench": spec_bench_settings(spec)}
    result = None
    if not args.restart and bench_file.exists():
        try:
            saved = json.loads(bench_file.read_text(encoding="utf-8"))
            result = saved["result"] if saved.get("wanted") == wanted else None
        except (OSError, ValueError, KeyError):
            result = None
    failed = False
    if result is None and names:
        bench = {"window": 336, "queries": 21, "warmup": 2, "iters": 10, "matmul_size": 4096,
                 **spec_bench_settings(spec)}  # Table 5: one 336 x 336 image, batch 1
        ns = argparse.Namespace(
            rows=",".join(dict.fromkeys(names.values())), batches="1", warmup=bench["warmup"], iters=bench["iters"],
            window=bench["window"], stride=112, queries=bench["queries"], matmul_size=bench["matmul_size"],
            clip=clip, clip_pretrained=ctx.clip_pretrained,
            clip_weights=ctx.weights.clip_file(clip), vfm=defaults.get("vfm", "dino_vitb8"),
            random_weights=args.random_weights, device=args.device, precision=args.precision)
        try:
            result = run_bench(ns)
            write_atomically({bench_file: json.dumps({"wanted": wanted, "result": result}, indent=1) + "\n"})
        except ProxyCLIPError as exc:
            failed = True
            for i in names:
                for cell in plan[i]:
                    cell.status, cell.reason = grid.FAILED, str(exc)
    if result is not None:
        by_row = {r["row"]: r for r in result["rows"]}
        for i, name in names.items():
            measured = by_row.get(name)
            for column, cell in zip(spec.columns, plan[i]):
                if measured is None:
                    cell.status, cell.reason = grid.FAILED, f"the bench has no row {name}"
                    continue
                cell.status, cell.value, cell.source = grid.DONE, float(round(EFFICIENCY_MEASURES[column.key](measured), 2)), bench_file.name
        meta = result["meta"]
        device_note = f"Measured on {meta['device_name']} ({meta['device']}, {meta['precision']})."
    else:
        device_note = "Not measured."
    return grid.render_table(spec, plan, extra_notes=[device_note, *_notes(args)]), failed


# ---- Figs. 1 and 4 ---------------------------------------------------------------------------------------

def _figure(args: argparse.Namespace, ctx: grid.GridContext, data: dict, out: Path) -> bool:
    """Fig. 1 or Fig. 4; True if it could not be made."""
    from ..evaluation import figures

    key = data.get("dataset", "coco_stuff")
    try:
        dataset = ctx.dataset(key)
    except ProxyCLIPError as exc:
        print(f"{data['name']}: not made: {exc}", file=sys.stderr)
        return True
    if dataset is None:
        print(f"{data['name']}: not made: no root given for {key} (--roots {key}=PATH)", file=sys.stderr)
        return True
    from .options import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    make = figures.make_fig1 if data["kind"] == "coherence" else figures.make_fig4
    try:
        paths = make(data, dataset, ctx, out, device=device, dtype=resolve_dtype(args.precision, device),
                     random_weights=args.random_weights)
    except ProxyCLIPError as exc:
        print(f"{data['name']}: not made: {exc}", file=sys.stderr)
        return True
    print(f"{data['name']}: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return False
