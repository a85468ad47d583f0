"""The `kvforge` command: one module per command group (generate, evaluate, bench, serve), the
options and helpers they share in `common.py`."""

from __future__ import annotations

import logging
import sys

from kvforge.cli import bench, evaluate, generate, serve, store, tune
from kvforge.cli.common import OneLineParser


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kvforge", description="KV-cache compression that really holds fewer bytes, measured honestly")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (generate, store, evaluate, tune, bench, serve):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return int(args.func(args))
    except ValueError as err:  # user errors: one line, no traceback
        print(f"kvforge: error: {err}", file=sys.stderr)
        return 2
