"""The ``proxyclip`` command: the sub-commands of :mod:`proxyclip.apps`, one module each."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import ProxyCLIPError
from .bench import add_bench_parser
from .demo import add_demo_parser
from .eval import add_eval_parsers
from .options import EXIT_USAGE, apply_image_args
from .segment import add_segment_parser


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyclip",
        description="Training-free open-vocabulary semantic segmentation with ProxyCLIP (ECCV 2024).",
    )
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the log messages of open_clip, timm and huggingface_hub (hidden by default; "
                             "errors are always reported in one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_segment_parser(sub)
    add_eval_parsers(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, without the source line Python would print under them."""
    print(f"proxyclip: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # the libraries log download retries and random-weight notes; our errors say enough
        logging.disable(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            apply_image_args(args)
            return args.func(args)
    except ProxyCLIPError as exc:
        print(f"proxyclip: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("proxyclip: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.disable(logging.NOTSET)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
