"""The STEP-command shape shared by ``icl-geometry heads`` and ``icl-geometry flow``."""

import argparse

from heads.step_cli import StepCommand


def build(options=lambda parser: parser.add_argument("--width", type=int, default=3)):
    parser = argparse.ArgumentParser(prog="icl-geometry")
    command = StepCommand(parser.add_subparsers(dest="command"), "demo", "a demo command", "The demo command.",
                          {"run": "examples:\n  icl-geometry demo run STORE\n", "scan": "examples: none\n"}, options)
    return parser, command


def test_a_step_has_the_store_model_prompt_and_shared_options_and_its_examples(capsys):
    parser, command = build()
    step = command.add("run", "run it", func=len)
    args = parser.parse_args(["demo", "run", "s.zarr", "--model", "m", "--shots", "2", "--width", "5"])
    assert (args.store, args.model, args.shots, args.width, args.func, args.demo_command) == ("s.zarr", "m", 2, 5,
                                                                                               len, "run")
    assert "icl-geometry demo run STORE" in step.format_help() and step.description == "run it"


def test_a_step_without_a_store_takes_no_positional():
    parser, command = build()
    command.add("scan", "scan it", func=len, store=False)
    args = parser.parse_args(["demo", "scan", "--n", "3"])
    assert args.n == 3 and not hasattr(args, "store")


def test_the_command_without_a_step_prints_its_help_and_returns_2(capsys):
    parser, command = build()
    command.add("run", "run it", func=len)
    args = parser.parse_args(["demo"])
    assert args.func(args) == 2
    text = capsys.readouterr().out
    assert "The demo command." in text and "run it" in text
