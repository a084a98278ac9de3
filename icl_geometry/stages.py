"""Resumable stages: each finished stage is recorded in a manifest, so a re-run skips it and does only the rest.

A stage is recorded only after its function returns, and its outputs are written before that (atomically where it
matters), so an interruption at any point loses at most the stage in progress, and the long stages (extraction)
resume inside themselves. The manifest is tied to the configuration's fingerprint: a different configuration in
the same folder starts over rather than mixing results.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from icl_geometry.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One unit of work: a unique name, a rough relative cost (for the ETA) and the function that does it."""

    name: str
    cost: float
    run: Callable[[], None]


class Manifest:
    """``stages.json`` in the output folder: the configuration fingerprint and the finished stages with timings."""

    def __init__(self, folder: Path, fingerprint: str, *, restart: bool = False):
        self.path = folder / "stages.json"
        self.fingerprint = fingerprint
        self.done: dict[str, float] = {}
        if self.path.is_file() and not restart:
            saved = json.loads(self.path.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{folder} holds a study run with another configuration; use another --out folder or --restart"
                )
            self.done = saved.get("done", {})

    def finish(self, name: str, seconds: float) -> None:
        self.done[name] = seconds
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}, indent=1))
        staging.replace(self.path)


def run_stages(stages: list[Stage], manifest: Manifest, *, progress: bool = True) -> float:
    """Run the unfinished stages in order with a cost-weighted progress bar; return the seconds of all stages."""
    pending = [stage for stage in stages if stage.name not in manifest.done]
    if len(pending) < len(stages):
        log.info("resuming: %d of %d stages already finished", len(stages) - len(pending), len(stages))
    bar = tqdm(total=sum(s.cost for s in stages), initial=sum(s.cost for s in stages if s not in pending),
               desc="study", unit="cost", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| stage {postfix} [{elapsed}<{remaining}]")
    for stage in pending:
        bar.set_postfix_str(stage.name)
        started = time.perf_counter()
        stage.run()
        manifest.finish(stage.name, time.perf_counter() - started)
        bar.update(stage.cost)
    bar.close()
    return sum(manifest.done.values())
