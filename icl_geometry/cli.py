"""The ``icl-geometry`` command: one entry point whose subcommands come from the packages that own them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from extraction.errors import GroupClashError, ICLGeometryError

#: Modules that contribute subcommands through a ``register(subparsers)`` function, in help order.
COMMAND_MODULES = ("icl_geometry.study_cli", "extraction.cli", "geometry.cli", "heads.cli", "heads.flow_cli",
                   "training_lab.cli")

DESCRIPTION = """Hidden-state geometry of in-context learning, layer by layer.

Start with `icl-geometry study --quick` (a few minutes on a laptop CPU): it extracts ICL and zero-shot query states
of the bundled Gemma 3 270M, measures separability and alignment at every layer, scores previous-token and induction
heads, ablates them and injects task vectors, and writes an HTML report. Each step is also a command of its own.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-geometry", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def clash_remedy(args: argparse.Namespace, clash: GroupClashError) -> str:
    """What the user of this command can do about a store group written with another configuration: the
    command's own flag where it has one, else another store or removing the group."""
    flag = "--overwrite-scores" if clash.group == "head_scores" else "--overwrite"
    if hasattr(args, flag[2:].replace("-", "_")):
        return f"pass {flag} to replace it" + (" or choose another --setting name" if hasattr(args, "setting") else "")
    return (f"write to another store, or remove group {clash.group!r} first (`icl-geometry heads score STORE "
            "--overwrite-scores ...` replaces head scores; extraction.store.delete_group(STORE, GROUP) removes any "
            "group)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ICLGeometryError as error:
        message = f"{error.problem}; {clash_remedy(args, error)}" if isinstance(error, GroupClashError) else error
        print(f"icl-geometry: error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        print("icl-geometry: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
