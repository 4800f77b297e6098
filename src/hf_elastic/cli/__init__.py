"""`hf-elastic`: the pipeline from the command line (sparsify, quantize, train, search, export, extract, push, plan,
demo).

Every model argument takes a local folder or a Hub id; data takes a local file or folder or a Hub data set id.
"""

from __future__ import annotations

import sys

from ..utils import quiet_library_output
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; a user error prints one `error:` line and exits with status 1, never a traceback.

    The libraries' known-harmless warnings, notices and progress bars are hidden (`quiet_library_output`) unless
    `--verbose` is given.
    """
    args = build_parser().parse_args(argv)
    try:
        with quiet_library_output(verbose=getattr(args, "verbose", False)):
            args.func(args)
    except (ValueError, OSError, ImportError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
