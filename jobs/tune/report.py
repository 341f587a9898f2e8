"""What a search shows and leaves behind: the trials table while it runs, and at the end
one row per trial (results.parquet and results.csv), the best trial's config as
best.toml, plots, and the final table.

A trial's status everywhere here is ``trial.trial_status``: judged against the total
steps the trial's own run reported, never against the driver's raw-row estimate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clray.jobs.config import validate
from clray.jobs.config.search import TuneJob
from clray.jobs.tune.trial import TOTAL_STEPS, trial_status


@dataclass
class TuneSummary:
    search_dir: str
    metric: str
    mode: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_trial: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config: str | None = None
    results_parquet: str | None = None
    results_csv: str | None = None
    plots: list[str] = field(default_factory=list)
    total_trial_steps: int = 0
    stopped_early: int = 0
    errored: int = 0
    wall_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def _reported_total(metrics: dict[str, Any], history: Any) -> int | None:
    """The trial's own total steps from its last result, else from any earlier one."""
    total = metrics.get(TOTAL_STEPS)
    if total is None and history is not None and TOTAL_STEPS in history:
        known = history[TOTAL_STEPS].dropna()
        total = known.iloc[-1] if len(known) else None
    return None if total is None else int(total)


def trial_rows(job: TuneJob, grid: Any) -> list[dict[str, Any]]:
    """One row per trial of a finished search (Tune's ``ResultGrid`` or any iterable of
    results with path, config, metrics, metrics_dataframe and error), by trial id."""
    rows = []
    sign = 1 if job.search.mode == "max" else -1
    for result in grid:
        path = Path(result.path) if result.path else None
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        values: list[float] = []
        steps: list[int] = []
        if history is not None and job.search.metric in history:
            frame = history[[c for c in ("step", job.search.metric) if c in history]].dropna()
            values = [float(v) for v in frame[job.search.metric]]
            steps = [int(s) for s in frame["step"]] if "step" in frame else []
        last_step = int(metrics.get("step") or (steps[-1] if steps else 0))
        error = str(result.error).strip().splitlines()[-1] if result.error else None
        row: dict[str, Any] = {
            "trial_id": path.name if path else "?",
            "status": trial_status(error, last_step, _reported_total(metrics, history)),
            "steps": last_step,
            "metric_last": values[-1] if values else None,
            "metric_best": (max(values, key=lambda v: sign * v) if values else None),
            "evaluations": len(values),
            "run_name": metrics.get("run_name"),
            "error": error,
            "curve": json.dumps([[s, v] for s, v in zip(steps, values, strict=False)]),
        }
        for dim in job.dimensions:
            row[dim.key] = (result.config or {}).get(dim.key)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def write_outputs(job: TuneJob, grid: Any) -> TuneSummary:
    """best.toml, results.parquet/csv and plots from the finished search, written into
    ``job.search_dir`` (the summary names those local files; see ``published``)."""
    search_dir = job.search_dir
    rows = trial_rows(job, grid)
    summary = TuneSummary(
        search_dir=str(search_dir), metric=job.search.metric, mode=job.search.mode, trials=rows,
        total_trial_steps=sum(r["steps"] for r in rows),
        stopped_early=sum(r["status"] == "STOPPED" for r in rows),
        errored=sum(r["status"] == "ERROR" for r in rows),
    )
    summary.results_parquet, summary.results_csv = _write_table(rows, search_dir)
    sign = 1 if job.search.mode == "max" else -1
    ranked = [r for r in rows if r["metric_last"] is not None and r["status"] != "ERROR"]
    # The best trial by its last evaluation: a trial ASHA stopped early at a low rung is
    # judged on what it had reached, the others on their final evaluation.
    best = max(ranked, key=lambda r: sign * r["metric_last"]) if ranked else None
    if best is not None:
        params = {d.key: best[d.key] for d in job.dimensions}
        summary.best_config = _write_best(job, best, params)
        summary.best_trial, summary.best_value, summary.best_params = best["trial_id"], best["metric_last"], params
    summary.plots = _plot(job, rows)
    return summary


def published(job: TuneJob, summary: TuneSummary) -> TuneSummary:
    """The summary naming where its files were published (the same files locally)."""
    final = job.staging.final
    summary.search_dir = job.staging.uri if job.staging.remote else summary.search_dir
    summary.best_config = final(summary.best_config)
    summary.results_parquet, summary.results_csv = final(summary.results_parquet), final(summary.results_csv)
    summary.plots = [str(final(p)) for p in summary.plots]
    return summary


def _write_table(rows: list[dict[str, Any]], out_dir: Path) -> tuple[str, str]:
    """results.parquet and results.csv: one column per row key, numbers as numbers."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    columns = list(rows[0]) if rows else ["trial_id"]
    arrays = {}
    for column in columns:
        values = [r.get(column) for r in rows]
        if all(isinstance(v, (int, float)) or v is None for v in values) and any(v is not None for v in values):
            values = [None if v is None else float(v) for v in values] if any(
                isinstance(v, float) for v in values) else values
        else:
            values = [None if v is None else str(v) for v in values]
        arrays[column] = values
    table = pa.table(arrays)
    pq.write_table(table, out_dir / "results.parquet")
    pacsv.write_csv(table, out_dir / "results.csv")
    return str(out_dir / "results.parquet"), str(out_dir / "results.csv")


def _write_best(job: TuneJob, best: dict[str, Any], params: dict[str, Any]) -> str:
    """best.toml: the best trial's training config, ready for ``clray train``."""
    import tomli_w

    raw = job.trial_raw(params)
    raw.setdefault("run", {})["name"] = f"{job.base.run.name}-best"
    validate(raw, "best config")  # what we write must load as a training config
    header = (f"# Best trial {best['trial_id']} of the search in {job.search_uri}\n"
              f"# {job.search.metric} = {best['metric_last']:.6g} ({job.search.mode}) at step {best['steps']}\n"
              f"# searched: {', '.join(f'{k} = {v!r}' for k, v in params.items())}\n"
              "# Train it with: clray train THIS_FILE\n")
    path = job.search_dir / "best.toml"
    path.write_text(header + tomli_w.dumps(raw))
    return str(path)


def _plot(job: TuneJob, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = job.search_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    metric = job.search.metric
    colours = {"COMPLETE": "tab:blue", "STOPPED": "tab:orange", "ERROR": "tab:red"}
    for dim in job.dimensions:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for status, colour in colours.items():
            points = [(r[dim.key], r["metric_last"]) for r in rows
                      if r["status"] == status and r["metric_last"] is not None and r[dim.key] is not None]
            if points and all(isinstance(x, (int, float)) for x, _ in points):
                ax.scatter([p[0] for p in points], [p[1] for p in points], c=colour, label=status.lower())
            elif points:
                ax.scatter([str(p[0]) for p in points], [p[1] for p in points], c=colour, label=status.lower())
        if dim.log or (dim.kind in ("grid", "choice") and all(isinstance(v, (int, float)) and v > 0 for v in dim.values)
                       and max(dim.values) / min(dim.values) >= 10):
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{metric} (last evaluation)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"metric_vs_{dim.key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        curve = json.loads(row["curve"])
        if curve:
            label = ", ".join(f"{d.key.split('.')[-1]}={row[d.key]:.3g}" if isinstance(row[d.key], float)
                              else f"{d.key.split('.')[-1]}={row[d.key]}" for d in job.dimensions)
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    return written


def live_status(trial: Any, result: dict[str, Any]) -> str:
    """A Tune trial's status for the live table: Tune's own, except that a TERMINATED
    trial is COMPLETE or STOPPED by ``trial_status`` on its latest result."""
    if trial.status != "TERMINATED":
        return trial.status
    step = result.get("step")
    return trial_status(None, int(step or 0), result.get(TOTAL_STEPS))


def print_trials(console: Any, job: TuneJob, trials: list[Any], last: dict[str, dict[str, Any]]) -> None:
    """The live table: one line per trial with its latest result (``last``: by trial id,
    from the callback; else Tune's last_result)."""
    from rich.table import Table

    table = Table(title=f"clray tune: {job.base.run.name}", header_style="bold")
    table.add_column("trial")
    table.add_column("status")
    for dim in job.dimensions:
        table.add_column(dim.key.split(".")[-1], justify="right")
    table.add_column("step", justify="right")
    table.add_column(job.search.metric, justify="right")
    for trial in trials:
        result = last.get(trial.trial_id) or trial.last_result or {}
        row = [trial.trial_id, live_status(trial, result)]
        for dim in job.dimensions:
            value = trial.config.get(dim.key)
            row.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        metric = result.get(job.search.metric)
        row.append(str(result.get("step", "-")))
        row.append(f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
        table.add_row(*row)
    console.print(table)


def print_final(console: Any, job: TuneJob, summary: TuneSummary) -> None:
    from rich.table import Table

    table = Table(title=f"clray tune: {summary.search_dir}", header_style="bold")
    for column in ("trial", "status", *[d.key for d in job.dimensions], "steps", job.search.metric):
        table.add_column(column)
    for row in summary.trials:
        marker = " *" if row["trial_id"] == summary.best_trial else ""
        values = [f"{row[d.key]:.4g}" if isinstance(row[d.key], float) else str(row[d.key]) for d in job.dimensions]
        metric = f"{row['metric_last']:.4f}" if row["metric_last"] is not None else "-"
        table.add_row(row["trial_id"] + marker, row["status"], *values, str(row["steps"]), metric)
    console.print(table)
    console.print(f"trial-steps in all: {summary.total_trial_steps}; stopped early: {summary.stopped_early}; "
                  f"errored: {summary.errored}")
    if summary.best_config:
        console.print(f"best: {summary.best_trial} ({job.search.metric} = {summary.best_value:.4f}) -> {summary.best_config}")
    console.print(f"results: {summary.results_parquet}, {summary.results_csv}")
    console.print(f"plots: {', '.join(summary.plots)}")
