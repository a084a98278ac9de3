"""The shape shared by ``icl-geometry heads`` and ``icl-geometry flow``: a command of STEP subcommands, each running a
model over ICL prompts (the model loaded from its options) and printing one JSON line."""

from __future__ import annotations

import argparse
import json
from typing import Callable

from extraction.cli import add_model_arguments, add_prompt_arguments, model_kwargs

Options = Callable[[argparse.ArgumentParser], object]


class StepCommand:
    """One command and its STEP subcommands; run without a step, it prints its help and returns 2."""

    def __init__(self, subparsers, name: str, help_text: str, description: str, examples: dict[str, str],
                 options: Options) -> None:
        """``examples``: each step's epilog by step name; ``options``: adds the options every step of this command
        takes after the model and prompt options. The chosen step's name is parsed into ``<name>_command``."""
        parser = subparsers.add_parser(name, help=help_text, description=description,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(func=lambda args: parser.print_help() or 2)
        self._steps = parser.add_subparsers(dest=f"{name}_command", metavar="STEP")
        self._examples = examples
        self._options = options

    def add(self, name: str, help_text: str, func: Callable, *, store: bool = True) -> argparse.ArgumentParser:
        """Step ``name`` running ``func``: a STORE argument (when ``store``), the model, prompt and shared options."""
        parser = self._steps.add_parser(name, help=help_text, description=help_text, epilog=self._examples[name],
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        if store:
            parser.add_argument("store", metavar="STORE", help="Zarr store (created if missing)")
        add_model_arguments(parser)
        add_prompt_arguments(parser)
        self._options(parser)
        parser.set_defaults(func=func)
        return parser


def load(args: argparse.Namespace):
    """The model named by the parsed model options."""
    from extraction.models import load_model

    return load_model(args.model, **model_kwargs(args))


def print_json(payload: dict) -> None:
    """A step's result as one JSON line (paths and other objects as strings)."""
    print(json.dumps(payload, default=str))
