"""The ``proxyclip`` command: the sub-commands of :mod:`proxyclip.apps`, one module each.

Building the parser imports no torch, open_clip, timm or gradio (``--help`` answers at once); each
command imports what it needs when it runs.

Stopping: Ctrl-C (SIGINT), SIGTERM and SIGHUP all stop a run the same way, by raising
KeyboardInterrupt in the main thread, so that temporary files are removed and progress is saved
on the way out; one line is printed and the exit code is the conventional 128 + signal number
(130, 143, 129).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from ..errors import OutputError, ProxyCLIPError
from .bench import add_bench_parser
from .compare import add_compare_parser
from .demo import add_demo_parser
from .eval import add_eval_parsers
from .options import EXIT_USAGE, EXIT_WRITE, apply_image_args
from .reproduce import add_reproduce_parser
from .segment import add_segment_parser


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyclip",
        description="Training-free open-vocabulary semantic segmentation with ProxyCLIP (ECCV 2024).",
        epilog="Exit codes: 0 done; 1 some inputs failed (the others were processed); 2 bad usage, configuration or "
               "missing weights (nothing processed); 3 an output could not be written (the run stopped); "
               "130 / 143 / 129 stopped by Ctrl-C / SIGTERM / SIGHUP.",
    )
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the log messages of open_clip, timm and huggingface_hub (hidden by default; "
                             "errors are always reported in one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_segment_parser(sub)
    add_eval_parsers(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_reproduce_parser(sub)
    add_compare_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, without the source line Python would print under them."""
    print(f"proxyclip: warning: {message}", file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
    raise Stopped(signum)


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGHUP raise :class:`Stopped` (a KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, _raise_stopped)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # the libraries log download retries and random-weight notes; our errors say enough
        logging.disable(logging.ERROR)
    no_cache = getattr(args, "no_text_cache", False)
    try:
        with warnings.catch_warnings(), stop_signals_as_interrupt():
            warnings.showwarning = _show_warning
            from .. import text_cache

            apply_image_args(args)
            with text_cache.disabled() if no_cache else nullcontext():
                return args.func(args)
    except OutputError as exc:
        print(f"proxyclip: error: {exc}", file=sys.stderr)
        return EXIT_WRITE
    except ProxyCLIPError as exc:
        print(f"proxyclip: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Stopped as exc:
        print(f"proxyclip: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("proxyclip: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.disable(logging.NOTSET)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
