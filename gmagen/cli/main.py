"""``gmagen <verb>``: check, show, info, tune (``gmagen <verb> --help`` for each)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from gmagen.errors import GMAError

from . import check, info, show, tune

VERBS = (check, show, info, tune)


def build_parser() -> argparse.ArgumentParser:
    from gmagen import __version__

    parser = argparse.ArgumentParser(
        prog="gmagen", description="Gaussian Mixture Attention compiled from one IR; "
        "check backends against the float64 oracle, show generated code, describe this machine.")
    parser.add_argument("--version", action="version", version=f"gmagen {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    for module in VERBS:
        sub = verbs.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status: 0 ok, 1 a check failed (or a requested backend cannot run),
    2 bad usage or a gmagen error."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except GMAError as exc:
        print(f"gmagen {args.verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
