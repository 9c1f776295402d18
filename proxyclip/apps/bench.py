"""``proxyclip bench``: parameters, FLOPs, speed and memory of the rows of the paper's Table 5.

Rows (all on CLIP ``--clip``, default ViT-B/16, one ``--window`` x ``--window`` window each):

    METHOD               every method of the registry (:data:`proxyclip.model.methods.METHODS`),
                         e.g. clip, maskclip; methods with a VFM run on ``--vfm`` (METHOD:VFM)
    proxyclip:dino_vitb16  Table 5's second ProxyCLIP row (DINO ViT-B/16 beside --vfm's B/8)
    whole-image          a 500 x 375 image through ``segment``'s path: preprocess + predict_logits,
                         all its sliding windows (ProxyCLIP on ``--vfm``)

What is measured, per row:

- parameters of CLIP (image and text towers) and of the VFM;
- FLOPs per window (per image for whole-image), counted with ``torch.utils.flop_counter``
  (2 FLOPs per multiply-accumulate; Table 5 counts multiply-accumulates, so its "FLOPs" compare
  with our ``gmacs``). PyTorch has no formula for the fused attention kernels that CPU inference
  and ``nn.MultiheadAttention``'s fast path run; :func:`extra_flop_formulas` adds them;
- windows (images) per second at batch 1 and at the best batch of ``--batches``, and latency:
  the median over ``--iters`` timed calls after ``--warmup`` calls, the device synchronised;
- peak memory of one call, after one untimed call: CUDA ``max_memory_allocated`` (``peak_mib``,
  which includes the models of rows measured earlier, kept for reuse; ``extra_mib`` is above what
  was allocated before the call, the call's own). On the CPU: the process's peak
  resident set (VmHWM, reset through /proc/self/clear_refs) and its rise above the resident set
  before the call. Every row's memory is measured before anything is timed, with glibc asked to
  map every block of 64 KiB or more on its own and to trim its heap at once, so that the resident
  set follows the live tensors; the timed calls then run with glibc's usual reusing heap;
- achieved FLOP/s at the best batch, and its fraction of a large matmul's FLOP/s measured in the
  same run, on the same device, in the same dtype (before and after the rows; the better of the two).

Text embeddings are random unit vectors (``--queries`` of them; their values do not change the
cost), made, like the models, outside the timed region.

torch is imported inside the functions, so that building the command line stays light.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ProxyCLIPError

if TYPE_CHECKING:
    import torch

WHOLE_IMAGE_ROW = "whole-image"
TABLE5_EXTRA_ROWS = ("proxyclip:dino_vitb16",)  # Table 5 also has ProxyCLIP with DINO B/16 (besides --vfm's B/8)


def default_rows(vfm: str) -> tuple[str, ...]:
    """Every registered method (those with a VFM on ``vfm``), Table 5's extra rows, the whole image."""
    from ..model.methods import METHODS

    rows = [f"{name}:{vfm}" if spec.needs_vfm else name for name, spec in METHODS.items()]
    return (*rows, *(r for r in TABLE5_EXTRA_ROWS if r not in rows), WHOLE_IMAGE_ROW)


WHOLE_IMAGE = (375, 500)  # H x W: a typical PASCAL VOC photo (500 x 375)
MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # a key of METHODS
    vfm: str | None  # a key of VFM_BUILDERS, for the methods that use one
    whole_image: bool = False  # one whole image (all its windows) instead of a batch of windows


# ---- FLOP counting ----------------------------------------------------------------------------

def _fused_sdpa_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int], *args, out_shape=None, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu``: q, k, v are B x heads x L x d."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _native_mha_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], embed_dim: int, num_heads: int, *args,
    out_shape=None, **kwargs,
) -> int:
    """``aten._native_multi_head_attention`` (nn.MultiheadAttention's inference fast path).

    q: B x Lq x D, k / v: B x Lk x D: in-projections, attention (QK^T and AV), out-projection.
    """
    batch, lq, dim = query[0], query[-2], query[-1]
    lk = key[-2]
    projections = 2 * batch * dim * embed_dim * (lq + 2 * lk) + 2 * batch * lq * embed_dim * embed_dim
    attention = 2 * 2 * batch * lq * lk * embed_dim
    return projections + attention


def extra_flop_formulas() -> dict:
    """FLOP formulas for the fused attention ops that ``torch.utils.flop_counter`` does not know."""
    import torch

    return {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _fused_sdpa_flops,
        torch.ops.aten._native_multi_head_attention: _native_mha_flops,
    }


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-accumulate) of the matmul-like ops ``fn`` runs (it runs once)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- timing and memory ------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of one call of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float | str]:
    """Peak memory of one call of ``fn``: absolute and above the level before the call (MiB)."""
    fn()  # once first: one-time allocations (kernel caches, library workspaces) are not the call's
    if device.type == "cuda":
        import torch

        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": peak / MIB, "extra_mib": (peak - base) / MIB, "memory_kind": "cuda max_memory_allocated"}
    base = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        resettable = base is not None
    except OSError:
        resettable = False
    if resettable:
        fn()
        peak = _proc_status_kib("VmHWM")
        return {"peak_mib": peak / 1024, "extra_mib": (peak - base) / 1024, "memory_kind": "cpu VmHWM (reset)"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss cannot be reset: the rise is a lower bound on the call's extra memory.
    return {"peak_mib": after / 1024, "extra_mib": (after - before) / 1024, "memory_kind": "cpu ru_maxrss (lower bound)"}


def matmul_throughput(device: torch.device, dtype: torch.dtype, n: int, warmup: int = 2, iters: int = 5) -> float:
    """FLOP/s of an n x n by n x n matmul in ``dtype`` on ``device`` (the machine's practical peak)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = time_calls(lambda: torch.mm(a, b), device, warmup, iters)
    return 2 * n**3 / seconds


# ---- models ------------------------------------------------------------------------------------

def count_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class ModelPool:
    """CLIP built once, each VFM once; a ProxyCLIP per row shares them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        from ..model.config import ProxyCLIPConfig
        from ..model.segmenter import ProxyCLIP

        self.args, self.device, self.dtype = args, device, dtype
        self.base = ProxyCLIPConfig.create(
            clip=args.clip, clip_pretrained=args.clip_pretrained, method="clip", window=args.window,
            stride=min(args.stride, args.window), short_side=args.window,
        )
        self.clip = ProxyCLIP.build(
            self.base, clip_weights=args.clip_weights, random_weights=args.random_weights, device=device, dtype=dtype
        )
        self.vfms: dict[str, torch.nn.Module] = {}

    def model(self, row: Row):
        from dataclasses import replace

        from ..model.segmenter import ProxyCLIP
        from ..model.vfm import VFM_BUILDERS

        vfm = None
        if row.vfm is not None:
            if row.vfm not in self.vfms:
                built = VFM_BUILDERS[row.vfm](random_weights=self.args.random_weights)
                self.vfms[row.vfm] = built.to(self.device, self.dtype)
            vfm = self.vfms[row.vfm]
        config = replace(self.base.updated(method=row.method), vfm=row.vfm or self.base.vfm)
        return ProxyCLIP(self.clip.clip_model, self.clip.tokenizer, vfm, config).to(self.device)


# ---- the benchmark -------------------------------------------------------------------------------

def parse_row(name: str, vfm: str) -> Row:
    """A row from its name: ``METHOD``, ``METHOD:VFM`` or ``whole-image`` (ProxyCLIP with ``vfm``)."""
    from ..model.methods import METHODS
    from ..model.vfm import VFM_BUILDERS

    if name == WHOLE_IMAGE_ROW:
        return Row(name, "proxyclip", vfm, whole_image=True)
    method, _, row_vfm = name.partition(":")
    if method not in METHODS:
        raise ProxyCLIPError(f"unknown method {method!r} in row {name!r}; rows are METHOD, METHOD:VFM or "
                             f"{WHOLE_IMAGE_ROW}, methods: {', '.join(METHODS)}")
    if not METHODS[method].needs_vfm:
        if row_vfm:
            raise ProxyCLIPError(f"row {name!r}: method {method!r} uses no VFM; write {method}")
        return Row(name, method, None)
    row_vfm = row_vfm or vfm
    if row_vfm not in VFM_BUILDERS:
        raise ProxyCLIPError(f"row {name!r}: unknown VFM {row_vfm!r}; choose one of {', '.join(VFM_BUILDERS)}")
    return Row(f"{method}:{row_vfm}", method, row_vfm)


def _rows(args: argparse.Namespace) -> list[Row]:
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows else list(default_rows(args.vfm))
    if not names:
        raise ProxyCLIPError(f"--rows names no row; e.g. {','.join(default_rows(args.vfm))}")
    return [parse_row(n, args.vfm) for n in names]


def _parse_batches(text: str) -> list[int]:
    try:
        batches = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise ProxyCLIPError(f"--batches takes comma-separated positive integers, e.g. 1,2,4,8; got {text!r}") from None
    if not batches or batches[0] <= 0:
        raise ProxyCLIPError(f"--batches takes comma-separated positive integers, e.g. 1,2,4,8; got {text!r}")
    return batches if 1 in batches else [1, *batches]


def measure_row(
    row: Row, pool: ModelPool, text: torch.Tensor, batches: list[int], args: argparse.Namespace
) -> tuple[dict, dict[int, Callable[[], None]]]:
    """Parameters, FLOPs and peak memory of one row, and its calls per batch for :func:`time_row`."""
    import numpy as np
    import torch

    from ..images import rescaled_size
    from ..model.sliding import window_boxes

    model = pool.model(row)
    device, window = pool.device, args.window
    out: dict = {
        "row": row.name, "method": row.method, "vfm": row.vfm,
        "params_clip_m": count_params(model.clip_model) / 1e6,
        "params_clip_visual_m": count_params(model.clip_model.visual) / 1e6,
        "params_vfm_m": count_params(model.vfm) / 1e6,
    }
    out["params_total_m"] = out["params_clip_m"] + out["params_vfm_m"]
    if row.whole_image:
        pixels = np.random.default_rng(0).integers(0, 256, (*WHOLE_IMAGE, 3), dtype=np.uint8)  # H x W x 3
        cfg = model.config
        resized = rescaled_size(*WHOLE_IMAGE, cfg.short_side, cfg.long_side)
        out.update(unit="images", image_hw=list(WHOLE_IMAGE), resized_hw=list(resized),
                   windows_per_image=len(window_boxes(*resized, window, model.config.stride)))

        def call() -> None:
            model.predict_logits(model.preprocess(pixels), text, out_size=WHOLE_IMAGE)  # Q x H x W

        calls = {1: call}
    else:
        out["unit"] = "windows"
        generator = torch.Generator().manual_seed(0)
        windows = torch.randn(max(batches), 3, window, window, generator=generator).to(device, model.dtype)

        def make_call(b: int) -> Callable[[], None]:
            def call() -> None:
                with torch.inference_mode():
                    model.window_logits(windows[:b], text)  # b x Q x window x window
            return call

        calls = {b: make_call(b) for b in batches}
    out["memory"] = {b: peak_memory(calls[b], device) for b in calls}
    out["flops"] = count_flops(calls[1])
    out["gflops"] = out["flops"] / 1e9
    out["gmacs"] = out["flops"] / 2e9  # Table 5's "FLOPs" unit
    return out, calls


def time_row(out: dict, calls: dict[int, Callable[[], None]], device: torch.device, args: argparse.Namespace) -> dict:
    """Add the speed at every batch of ``calls`` to a row measured by :func:`measure_row`."""
    memory = out.pop("memory")
    per_batch = []
    for b, call in calls.items():
        seconds = time_calls(call, device, args.warmup, args.iters)
        per_batch.append({"batch": b, "latency_ms": seconds * 1e3, "per_s": b / seconds, **memory[b]})
    best = max(per_batch, key=lambda r: r["per_s"])
    out.update(per_batch=per_batch, batch1=per_batch[0], best=best)
    out["achieved_tflops"] = out["flops"] * best["per_s"] / 1e12
    return out


def run_bench(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from .options import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    if args.window <= 0 or args.stride <= 0 or args.iters <= 0 or args.warmup < 0 or args.queries <= 0:
        raise ProxyCLIPError("--window, --stride, --iters and --queries must be positive, --warmup not negative")
    rows, batches = _rows(args), _parse_batches(args.batches)
    torch.manual_seed(0)
    pool = ModelPool(args, device, dtype)
    embed_dim = pool.clip.clip_model.visual.proj.shape[1]
    text = F.normalize(torch.randn(args.queries, embed_dim), dim=-1).to(device, dtype)  # Q x E
    measured = []
    for row in rows:  # memory of every row first, then the timings
        print(f"proxyclip bench: {row.name}: FLOPs, memory ...", file=sys.stderr, flush=True)
        measured.append(measure_row(row, pool, text, batches, args))
    with torch.inference_mode():
        peak = matmul_throughput(device, dtype, args.matmul_size)
    results = []
    for row, (out, calls) in zip(rows, measured):
        print(f"proxyclip bench: {row.name}: speed ...", file=sys.stderr, flush=True)
        results.append(time_row(out, calls, device, args))
    with torch.inference_mode():  # again: on a busy machine one of the two measurements is low
        peak = max(peak, matmul_throughput(device, dtype, args.matmul_size))
    for result in results:
        result["fraction_of_matmul"] = result["achieved_tflops"] * 1e12 / peak
    return {
        "meta": {
            "device": str(device), "device_name": device_name(device), "precision": args.precision,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "clip": args.clip,
            "random_weights": args.random_weights, "window": args.window, "stride": min(args.stride, args.window),
            "queries": args.queries, "warmup": args.warmup, "iters": args.iters, "batches": batches,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "matmul": {"n": args.matmul_size, "dtype": args.precision, "tflops": peak / 1e12},
        "rows": results,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(result: dict) -> str:
    meta, matmul = result["meta"], result["matmul"]
    lines = [
        f"{meta['device_name']} ({meta['device']}), {meta['precision']}, torch {meta['torch']}, "
        f"{meta['threads']} threads; window {meta['window']}, {meta['queries']} queries"
        + (", RANDOM weights" if meta["random_weights"] else ""),
        f"matmul {matmul['n']}x{matmul['n']} {matmul['dtype']}: {matmul['tflops'] * 1e3:.1f} GFLOP/s",
        "",
        f"{'row':<20} {'params M':>9} {'GMACs':>8} {'/s b=1':>8} {'ms b=1':>9} {'best b':>6} {'/s best':>8} "
        f"{'peak MiB':>9} {'+MiB':>7} {'GFLOP/s':>8} {'of mm':>6}",
    ]
    for r in result["rows"]:
        b1, best = r["batch1"], r["best"]
        unit = "img" if r["unit"] == "images" else "win"
        lines.append(
            f"{r['row']:<20} {r['params_total_m']:>9.1f} {r['gmacs']:>8.1f} {b1['per_s']:>8.2f} {b1['latency_ms']:>9.1f} "
            f"{best['batch']:>6d} {best['per_s']:>8.2f} {b1['peak_mib']:>9.0f} {b1['extra_mib']:>7.0f} "
            f"{r['achieved_tflops'] * 1e3:>8.1f} {r['fraction_of_matmul']:>6.1%}  ({unit})"
        )
    lines.append("GMACs per window (whole-image: per image) = Table 5's FLOPs; /s = windows (images) per second; "
                 "peak and +MiB at batch 1")
    return "\n".join(lines)


def write_json_atomically(data: dict, path: Path) -> None:
    """Write ``data`` as JSON to ``path``, whole or not at all."""
    from ..images import write_atomically

    write_atomically({Path(path): json.dumps(data, indent=2) + "\n"})


def run_bench_command(args: argparse.Namespace) -> int:
    if args.quick:
        args.window, args.stride, args.warmup, args.iters = 56, 28, 0, 1
        args.batches, args.matmul_size = "1,2", 1024
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProxyCLIPError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    result = run_bench(args)
    print(format_table(result))
    if args.out is not None:
        try:
            write_json_atomically(result, args.out)
        except OSError as exc:
            raise ProxyCLIPError(f"cannot write {args.out}: {exc.strerror or exc}") from None
        print(f"saved {args.out}", file=sys.stderr)
    return 0


def add_bench_parser(sub) -> None:
    """Register ``proxyclip bench`` on the CLI's sub-parsers."""
    from ..model.config import ProxyCLIPConfig
    from .options import PRECISIONS, vfm_key

    p = sub.add_parser(
        "bench",
        help="parameters, FLOPs, speed and memory of every method (the rows of Table 5)",
        description="Benchmark every method on one window (Table 5: CLIP, MaskCLIP, ProxyCLIP with DINO-B/16 and "
                    "B/8, ...), and a whole 500x375 image through segment's path. Prints a table; --out saves every number as "
                    "JSON. Offline (no downloadable weights) pass --random-weights: cost does not depend on "
                    "the weights' values.",
    )
    p.add_argument("--rows", default=None, metavar="LIST",
                   help="comma-separated rows: METHOD (a VFM method on --vfm), METHOD:VFM, or whole-image "
                        f"(default: every method, then Table 5's extra rows and the whole image: "
                        f"{','.join(default_rows(ProxyCLIPConfig().vfm))})")
    p.add_argument("--batches", default="1,2,4,8,16", metavar="LIST",
                   help="window batch sizes to time; 1 is always included (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported (default: %(default)s)")
    p.add_argument("--window", type=int, default=ProxyCLIPConfig().window, help="window size in pixels (default: %(default)s)")
    p.add_argument("--stride", type=int, default=ProxyCLIPConfig().stride,
                   help="sliding-window stride of the whole-image row (default: %(default)s)")
    p.add_argument("--queries", type=int, default=21, help="number of text queries (default: %(default)s, VOC21)")
    p.add_argument("--matmul-size", type=int, default=4096,
                   help="n of the n x n matmul giving the device's practical peak FLOP/s (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of seconds (numbers not meaningful): window 56, stride 28, batches 1,2, "
                        "one timed call, no warm-up")
    p.add_argument("--out", "-o", type=Path, default=None, metavar="FILE", help="save the results as JSON here")
    g = p.add_argument_group("models and device")
    g.add_argument("--clip", default="ViT-B-16", metavar="NAME", help="open_clip ViT architecture (default: %(default)s)")
    g.add_argument("--clip-pretrained", default=None, metavar="TAG",
                   help="open_clip pretrained tag (default: the paper's for --clip, e.g. openai)")
    g.add_argument("--clip-weights", default=None, metavar="FILE", help="local CLIP checkpoint instead of the hub")
    g.add_argument("--vfm", default=ProxyCLIPConfig().vfm, type=vfm_key, metavar="NAME",
                   help="VFM of the rows that name none, and of the whole-image row (default: %(default)s)")
    g.add_argument("--random-weights", action="store_true",
                   help="RANDOM weights of the real architectures; required offline (the hub cannot be reached), "
                        "and harmless here: speed, memory and FLOPs do not depend on the weights' values")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="model and matmul dtype; fp16 needs CUDA (default: %(default)s)")
    p.set_defaults(func=run_bench_command)
