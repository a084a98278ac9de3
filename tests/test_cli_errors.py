"""Bad input to the command line (issue 9, item 10): every user mistake and fault ends with exit code 2 and one
plain line on stderr that says what to do, never a traceback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from icl_geometry.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tiny_gemma, tmp_path_factory) -> Path:
    """A small complete store of the tiny Gemma (group ``icl``)."""
    from extraction.extractor import extract

    path = tmp_path_factory.mktemp("errors") / "s.zarr"
    extract(tiny_gemma, path, task="sentiment", shots=2, n=6, progress=False)
    return path


@pytest.fixture(scope="module")
def scored_store(tiny_gemma, store, tmp_path_factory) -> Path:
    """The store with head scores of 4 prompts."""
    from heads.scores import score

    path = tmp_path_factory.mktemp("scored") / "s.zarr"
    shutil.copytree(store, path)
    score(tiny_gemma, shots=2, n=4, n_random=2, repeat=5, store=path, progress=False)
    return path


def _write(folder: Path, name: str, content: str | bytes) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _rows(labels: list[str]) -> str:
    return "text,label\n" + "".join(f"example number {i},{label}\n" for i, label in enumerate(labels))


def _case(name: str, tmp: Path, model: str, store: Path, scored: Path | None = None) -> list[str]:
    """The arguments of one mistake; files it needs are written into ``tmp``."""
    extract = ["extract", "--model", model, "--out", str(tmp / "out.zarr")]
    if name == "unknown task":
        return extract + ["--task", "no_such_task"]
    if name == "missing data file":
        return extract + ["--data", str(tmp / "missing.csv")]
    if name == "unreadable data file":
        (tmp / "folder.csv").mkdir()
        return extract + ["--data", str(tmp / "folder.csv")]
    if name == "no label column":
        return extract + ["--data", _write(tmp, "d.csv", "text,kind\n" + "a,b\n" * 40)]
    if name == "one class":
        return extract + ["--data", _write(tmp, "d.csv", _rows(["good"] * 40))]
    if name == "broken JSONL":
        return extract + ["--data", _write(tmp, "d.jsonl", '{"text": "a", "label": "good"}\n{"text": "b", "lab\n')]
    if name == "non-UTF-8 bytes":
        return extract + ["--data", _write(tmp, "d.csv", b"text,label\n\xff\xfe caf\xe9,good\nb,bad\n")]
    if name == "unsupported file type":
        return extract + ["--data", _write(tmp, "d.txt", "hello")]
    if name == "negative shots":
        return extract + ["--shots", "-1"]
    if name == "n of 0":
        return extract + ["--n", "0"]
    if name == "n above the pool":
        return extract + ["--n", "1000000"]
    if name == "template without {label}":
        return extract + ["--template", "{text} Verdict:"]
    if name == "multi-token label word":
        return extract + ["--label-words", "positive,very negative"]
    if name == "miscounted label words":
        return extract + ["--label-words", "positive"]
    if name == "missing model path":
        return ["extract", "--model", str(tmp / "no-model"), "--out", str(tmp / "out.zarr")]
    if name == "folder that is not a model":
        (tmp / "empty").mkdir()
        _write(tmp / "empty", "notes.txt", "not a model")
        return ["extract", "--model", str(tmp / "empty"), "--out", str(tmp / "out.zarr")]
    if name == "prompt longer than the context":
        return extract + ["--shots", "150", "--n", "1"]  # about 2,000 tokens; the tiny model's context is 1,024
    if name == "path that is not a store":
        return ["measure", _write(tmp, "plain.txt", "not a store")]
    if name == "store that does not exist":
        return ["measure", str(tmp / "nowhere.zarr")]
    if name == "missing group":
        return ["measure", str(store), "--group", "no_such_group", "--n-boot", "0"]
    if name == "head out of range":
        return ["heads", "ablate", str(tmp / "h.zarr"), "--model", model, "--set", "99.0", "--n", "2"]
    if name == "broken config file":
        return ["study", _write(tmp, "s.toml", "[data\nn = 3\n"), "--out", str(tmp / "study")]
    if name == "unknown config key":
        return ["study", _write(tmp, "s.toml", "[data]\nqueries = 3\n"), "--out", str(tmp / "study")]
    if name == "missing config file":
        return ["study", str(tmp / "none.toml"), "--out", str(tmp / "study")]
    if name == "configuration clash in a group":
        copy = tmp / "clash.zarr"
        shutil.copytree(store, copy)
        return ["extract", "--model", model, "--out", str(copy), "--shots", "2", "--n", "5"]
    if name == "head scores of another configuration":
        copy = tmp / "scored.zarr"
        shutil.copytree(scored, copy)
        return ["heads", "score", str(copy), "--model", model, "--shots", "2", "--n", "5"]
    if name == "head scores of another configuration, under ablate":
        copy = tmp / "scored.zarr"
        shutil.copytree(scored, copy)
        return ["heads", "ablate", str(copy), "--model", model, "--shots", "2", "--n", "3", "--n-score", "5",
                "--set", "ih"]
    if name.startswith("corrupted store"):
        copy = tmp / "bad.zarr"
        shutil.copytree(store, copy)
        if name == "corrupted store: group metadata deleted":
            (copy / "icl" / "zarr.json").unlink()
        elif name == "corrupted store: group metadata garbled":
            (copy / "icl" / "zarr.json").write_text("{ not json")
        elif name.startswith("corrupted store: root metadata garbled"):
            (copy / "zarr.json").write_text("]]")
        elif name == "corrupted store: chunk garbled":
            # the labels' chunk: read before any progress bar starts (a bad chunk met mid-sweep gives the same line
            # after the bar's partial progress)
            chunk = next(p for p in (copy / "icl" / "label").rglob("*") if p.is_file() and p.name != "zarr.json")
            chunk.write_bytes(b"garbage" * 10)
        elif name == "corrupted store: array metadata garbled":
            (copy / "icl" / "label" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
        if name == "corrupted store: root metadata garbled, as extract's target":
            return extract[:-1] + [str(copy)]
        return ["measure", str(copy), "--group", "icl", "--n-boot", "0"]
    raise AssertionError(name)


CASES = [
    "unknown task", "missing data file", "unreadable data file", "no label column", "one class", "broken JSONL",
    "non-UTF-8 bytes", "unsupported file type", "negative shots", "n of 0", "n above the pool",
    "template without {label}", "multi-token label word", "miscounted label words", "missing model path",
    "folder that is not a model", "prompt longer than the context", "path that is not a store",
    "store that does not exist", "missing group", "head out of range", "broken config file", "unknown config key",
    "missing config file", "configuration clash in a group", "head scores of another configuration",
    "head scores of another configuration, under ablate", "corrupted store: group metadata deleted",
    "corrupted store: group metadata garbled", "corrupted store: root metadata garbled",
    "corrupted store: root metadata garbled, as extract's target",
    "corrupted store: chunk garbled", "corrupted store: array metadata garbled",
]


def _one_plain_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("icl-geometry: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", CASES)
def test_mistake_gives_exit_code_2_and_one_plain_line(name, tiny_gemma_dir, store, scored_store, tmp_path, capsys):
    args = _case(name, tmp_path, str(tiny_gemma_dir), store, scored_store)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines of its own on stderr
        warnings.simplefilter("always")
        assert main(args) == 2, capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, [str(w.message) for w in shown]
    line = _one_plain_line(capsys.readouterr().err)
    assert len(line) > len("icl-geometry: error: ") + 20
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)
    if flags:  # every flag the message names exists in the command it names, or in the one that failed
        named = re.search(r"`icl-geometry ([a-z]+(?: [a-z]+)?)", line)
        command = named.group(1).split() if named else args[:2] if args[0] == "heads" else args[:1]
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        help_text = capsys.readouterr().out
        assert all(flag in help_text for flag in flags), (flags, command)


@pytest.mark.parametrize("name", ["unknown task", "corrupted store: group metadata deleted", "unknown config key"])
def test_mistake_in_a_subprocess(name, tiny_gemma_dir, store, tmp_path):
    """The installed entry point behaves the same (logging, warnings and all)."""
    args = _case(name, tmp_path, str(tiny_gemma_dir), store)
    done = subprocess.run([sys.executable, "-m", "icl_geometry.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    _one_plain_line(done.stderr)
