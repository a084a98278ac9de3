"""The whole analysis in one call: extraction, geometry, heads, interventions, tables, figures and the report.

Output folder layout::

    config.toml            the effective configuration (re-run it with `icl-geometry study config.toml`)
    stages.json            finished stages (resume marker)
    study.json             setup and timing facts shown in the report
    stores/<task>.zarr     one store per task: icl (and icl_k<k>), zero_shot, ablate_*, inject_*, head_scores
    tables/*.csv           accuracy, measures (tidy), transitions, head_scores, head_sets, placement, flow
                           (edge scan cells, only with [flow] enabled = true)
    figures/<task>/*.png   layer-wise curves, measure changes, k sweep, head-score heat maps, PCA panels
    report.html            everything above on one self-contained page
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from extraction.errors import GroupClashError
from extraction.store import delete_group, open_group
from geometry.plots import default_layers
from icl_geometry.config import ConfigError, StudyConfig, dump_toml
from icl_geometry.report import write_report
from icl_geometry.stages import Manifest, Stage, run_stages

log = logging.getLogger(__name__)

INTERVENTION_GROUPS = ("ablate_pth", "ablate_ih", "ablate_random", "inject_ih", "inject_pth")
TABLES = ("accuracy", "measures", "transitions", "changes", "head_scores", "head_sets", "placement", "flow")


def task_label(task: str) -> str:
    """A task's name in file names and tables: the built-in name, or a data file's stem."""
    return Path(task).stem if Path(task).suffix else task


class Study:
    """A configured study writing into ``folder``; :meth:`run` does (or finishes) it and returns the report path."""

    def __init__(self, config: StudyConfig, folder: str | Path, *, progress: bool = True, restart: bool = False):
        self.config, self.folder, self.progress, self.restart = config, Path(folder), progress, restart
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.folder, config.fingerprint(), restart=restart)
        self._loaded = None
        self._client: Any = None
        self._exits = ExitStack()

    # -- paths and shared state ---------------------------------------------------------------------------------
    @property
    def primary_k(self) -> int:
        """The k of the ``icl`` group: the heads' k, or the largest k when heads are off."""
        return self.config.heads.shots if self.config.heads.enabled else max(self.config.k_values)

    def icl_group(self, k: int) -> str:
        return "icl" if k == self.primary_k else f"icl_k{k}"

    def store(self, task: str) -> Path:
        return self.folder / "stores" / f"{task_label(task)}.zarr"

    def part(self, table: str, task: str) -> Path:
        return self.folder / "tables" / "parts" / f"{task_label(task)}.{table}.csv"

    def figures(self, task: str) -> Path:
        folder = self.folder / "figures" / task_label(task)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def loaded(self):
        """The model, loaded on first use (a resumed study whose model stages are done never loads it)."""
        if self._loaded is None:
            from extraction.models import load_model

            model = self.config.model
            self._loaded = load_model(None if model.spec == "default" else model.spec, **model.load_options())
        return self._loaded

    @property
    def cluster(self) -> dict[str, Any]:
        """``extract``'s cluster options from ``[cluster]``: the study's one Dask client (connected, or its local
        cluster started, on first use and closed when :meth:`run` ends) and the chunk along ``example``."""
        cluster = self.config.cluster
        if self._client is None and (cluster.scheduler or cluster.workers):
            from extraction.distributed import connected

            self._client = self._exits.enter_context(connected(cluster.scheduler or None, cluster.workers or None))
        return dict(client=self._client, example_chunk=cluster.example_chunk or None)

    def prompt_options(self) -> dict:
        data = self.config.data
        return dict(separator=data.separator, sampling=data.sampling, label_mode=data.label_mode)

    # -- stages ---------------------------------------------------------------------------------------------------
    def _extract(self, task: str, k: int, group: str) -> None:
        from extraction.extractor import extract

        data = self.config.data
        extract(self.loaded, self.store(task), task=task, shots=k, n=data.n, seed=data.seed, setting=group,
                batch_size=self.config.model.batch_size, progress=self.progress, **self.cluster,
                **self.prompt_options())

    def _heads(self, task: str) -> None:
        import heads
        from geometry.plots import save

        settings = self.config.heads
        result = heads.study(
            self.loaded, self.store(task), task=task, shots=settings.shots, n=self.config.data.n,
            seed=self.config.data.seed, fraction=settings.fraction, n_score=settings.n_score,
            pth_first_pair=settings.pth_first_pair, mode=settings.mode,
            batch_size=self.config.model.batch_size, measures=False, progress=self.progress, cluster=self.cluster,
            **self.prompt_options(),
        )
        self._write_part("head_scores", task, result.scores.to_dataframe().reset_index())
        self._write_part("head_sets", task, pd.DataFrame([
            {"set": name, "block": block, "head": head} for name, members in result.sets.items()
            for block, head in members
        ]))
        placement = result.placement
        self._write_part("placement", task, pd.DataFrame([{
            "mean_block_ih": placement.mean_a, "mean_block_pth": placement.mean_b,
            "u_statistic": placement.u_statistic, "p_value": placement.p_value,
            "ih_heads": len(result.sets["ih"]), "pth_heads": len(result.sets["pth"]),
        }]))
        save(heads.plot_scores(result.scores, sets=result.sets), self.figures(task), "head_scores")

    def _flow(self, task: str) -> None:
        from geometry.plots import save
        from heads.flow import edge_scan, flow_table
        from heads.flow_plots import plot_flow

        flow = self.config.flow
        ds = edge_scan(self.loaded, task=task, shots=flow.shots, n=flow.n, seed=self.config.data.seed,
                       edges=flow.edges, width=flow.width, batch_size=self.config.model.batch_size,
                       n_boot=self.config.geometry.n_boot, progress=self.progress, **self.prompt_options())
        self._write_part("flow", task, flow_table(ds))
        save(plot_flow(ds), self.figures(task), "flow", ("png", "svg"))

    def knockouts(self) -> dict[str, tuple[str, list[int]]]:
        """The ``[flow] knockouts`` as group name -> (edge, blocks of the window)."""
        from heads.flow import knockout_group, parse_cell

        width, cells = self.config.flow.width, [parse_cell(cell) for cell in self.config.flow.knockouts]
        return {knockout_group(edge, blocks): (edge, blocks)
                for edge, first in cells for blocks in [list(range(first, first + width))]}

    def _knockouts(self, task: str) -> None:
        """Extract the ``icl`` prompts under each ``[flow]`` knockout into its own group."""
        from extraction.edges import EdgeKnockout
        from extraction.extractor import extract

        data = self.config.data
        for group, (edge, blocks) in self.knockouts().items():
            extract(self.loaded, self.store(task), task=task, shots=self.primary_k, n=data.n, seed=data.seed,
                    setting=group, batch_size=self.config.model.batch_size, progress=self.progress,
                    intervention=EdgeKnockout(edge, blocks), **self.cluster, **self.prompt_options())

    def baselines(self) -> dict[str, str]:
        """Each intervention group's baseline: the heads' ablations and injections, the flow knockouts' ``icl``."""
        from heads.pipeline import BASELINES

        flow = dict.fromkeys(self.knockouts() if self.config.flow.enabled else (), "icl")
        return {**(BASELINES if self.config.heads.enabled else {}), **flow}

    def _geometry(self, task: str) -> None:
        """Measure every group, write the measure, transition and accuracy tables, and draw the curves."""
        import geometry
        from geometry.sweep import tidy

        settings, store = self.config.geometry, self.store(task)
        results = geometry.measure_groups(store, self.groups(task), n_boot=settings.n_boot, seed=settings.seed,
                                          n_boot_separability=settings.n_boot_separability, rank=settings.rank,
                                          normalize_variance=settings.normalize_variance, progress=self.progress)
        self._write_part("measures", task, tidy(list(results.values())))
        transitions = [geometry.transition(result, min_rise=settings.min_rise).to_dict() for result in results.values()]
        self._write_part("transitions", task, pd.DataFrame(transitions).rename(columns={"layer": "transition_layer"}))
        self._write_part("accuracy", task, pd.DataFrame([
            {"group": group, "shots": int(result.attrs["shots"]), "accuracy": result.attrs["accuracy"],
             "label_accuracy": result.attrs["label_accuracy"]} for group, result in results.items()
        ]))
        self._draw(task, results)

    def _draw(self, task: str, results: dict) -> None:
        import geometry

        folder, formats, min_rise = self.figures(task), ("png", "svg"), self.config.geometry.min_rise
        main = [results[g] for g in ("icl", "zero_shot", *INTERVENTION_GROUPS) if g in results]
        geometry.plot_measures(main, folder, name="curves", formats=formats, min_rise=min_rise)
        k_groups = [self.icl_group(k) for k in self.config.k_values]
        if len(k_groups) > 1:
            geometry.plot_measures([results["zero_shot"], *(results[g] for g in k_groups)], folder, name="k_sweep",
                                   formats=formats, min_rise=min_rise)
        if self.baselines():
            from geometry.plots import save
            from heads.pipeline import measure_changes
            from heads.plots import plot_changes

            changes = measure_changes(results, self.baselines())
            self._write_part("changes", task, changes)
            save(plot_changes(changes), folder, "changes", formats)
        icl = open_group(self.store(task), "icl")
        geometry.plot_projections(icl, default_layers(icl.sizes["layer"]), folder, methods=("pca",),
                                  name="projections", formats=formats)

    def _tables(self) -> None:
        tables = self.folder / "tables"
        for table in TABLES:
            parts = [pd.read_csv(self.part(table, task)).assign(task=task_label(task))
                     for task in self.config.data.tasks if self.part(table, task).is_file()]
            if parts:
                frame = pd.concat(parts, ignore_index=True)
                frame[["task", *[c for c in frame.columns if c != "task"]]].to_csv(tables / f"{table}.csv", index=False)

    def _report(self) -> None:
        first = open_group(self.store(self.config.data.tasks[0]), "icl")
        provenance = first.attrs.get("provenance", {})
        setup = {
            "model": provenance.get("model_spec"), "model sha256": provenance.get("model_sha256"),
            "dtype": self.config.model.dtype, "tasks": ", ".join(map(task_label, self.config.data.tasks)),
            "k (shots)": ", ".join(map(str, self.config.k_values)), "queries per setting": self.config.data.n,
            "layer convention": first.attrs.get("layer_convention"),
            "libraries": ", ".join(f"{k} {v}" for k, v in provenance.get("libraries", {}).items()),
        }
        meta = {"setup": setup, "tasks": [task_label(t) for t in self.config.data.tasks],
                "seconds": sum(self.manifest.done.values()), "version": _version()}
        (self.folder / "study.json").write_text(json.dumps(meta, indent=1, default=str))
        write_report(self.folder)

    def _write_part(self, table: str, task: str, frame: pd.DataFrame) -> None:
        path = self.part(table, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)

    def groups(self, task: str) -> list[str]:
        """The store groups of one task that the study analyses, in report order."""
        groups = [self.icl_group(k) for k in self.config.k_values] + ["zero_shot"]
        return groups + list(self.baselines())

    def stages(self) -> list[Stage]:
        """Every stage of the study in order, with rough relative costs for the ETA."""
        n, stages = self.config.data.n, []
        for task in self.config.data.tasks:
            name = task_label(task)
            for k in self.config.k_values:
                group = self.icl_group(k)
                stages.append(Stage(f"{name}: extract {group}", n * (0.3 + k / 8),
                                    lambda t=task, k=k, g=group: self._extract(t, k, g)))
            stages.append(Stage(f"{name}: extract zero_shot", n * 0.2, lambda t=task: self._extract(t, 0, "zero_shot")))
            if self.config.heads.enabled:
                stages.append(Stage(f"{name}: heads", n * 4 + self.config.heads.n_score * 2,
                                    lambda t=task: self._heads(t)))
            if self.config.flow.enabled:
                flow = self.config.flow
                cells = len(flow.edges) * flow.n * (0.3 + flow.shots / 8)
                stages.append(Stage(f"{name}: flow", cells, lambda t=task: self._flow(t)))
                if flow.knockouts:
                    stages.append(Stage(f"{name}: flow knockouts", len(flow.knockouts) * n * (0.3 + self.primary_k / 8),
                                        lambda t=task: self._knockouts(t)))
            stages.append(Stage(f"{name}: geometry", len(self.groups(task)) * 10 + 20, lambda t=task: self._geometry(t)))
        stages.append(Stage("tables", 1, self._tables))
        stages.append(Stage("report", 2, self._report))
        return stages

    def check_data(self) -> None:
        """Refuse, before any stage runs, prompts the tasks' pools cannot give: ``[data] n`` (and ``[heads] n_score``)
        may go up to each task's query pool, every k must fit its demonstration pool."""
        from extraction.prompts import PromptConfig, build_prompts
        from extraction.tasks import load_task

        data, heads = self.config.data, self.config.heads
        wanted = {"[data] n": data.n, **({"[heads] n_score": heads.n_score} if heads.enabled else {})}
        for name in data.tasks:
            task = load_task(name)
            pool = len(task.test)
            for key, value in wanted.items():
                if value > pool:
                    raise ConfigError(f"{key} = {value} is more than the {pool} queries in the query pool of task "
                                      f"{task_label(name)!r}; set it to at most {pool}")
            for k in sorted({0, *self.config.k_values}):
                build_prompts(task, PromptConfig(shots=k, n=data.n, seed=data.seed, **self.prompt_options()))

    def _replacing_clashes(self, run: Callable[[], None]) -> Callable[[], None]:
        """``run`` where a store group written with another configuration is replaced when the study restarts
        (``--restart``), and otherwise refused with a message naming that flag."""
        def guarded() -> None:
            replaced: set[tuple[str, str]] = set()
            while True:
                try:
                    return run()
                except GroupClashError as clash:
                    key = (str(clash.path), clash.group)
                    if not self.restart:
                        raise ConfigError(
                            f"group {clash.group!r} in {clash.path} was written with another configuration; re-run "
                            "the study with --restart to replace it, or use another --out folder"
                        ) from clash
                    if key in replaced:
                        raise
                    replaced.add(key)
                    log.warning("replacing group %r of %s, written with another configuration", clash.group,
                                clash.path)
                    delete_group(clash.path, clash.group)

        return guarded

    def run(self) -> Path:
        """Run or resume the study; return the path of ``report.html``."""
        (self.folder / "config.toml").write_text(dump_toml(self.config))
        (self.folder / "tables").mkdir(exist_ok=True)
        started = time.perf_counter()
        if any(stage.name not in self.manifest.done for stage in self.stages()):
            self.check_data()
        stages = [dataclasses.replace(stage, run=self._replacing_clashes(stage.run)) for stage in self.stages()]
        with self._exits:
            run_stages(stages, self.manifest, progress=self.progress)
        self._client = None
        log.info("study finished in %.0f s", time.perf_counter() - started)
        return self.folder / "report.html"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icl-geometry")
    except PackageNotFoundError:
        return "dev"
