"""What the ``clray`` command prints: progress while a run trains, the tables at the end
of a run and of a mining job, jobs on a cluster, and errors. Argument parsing and
dispatch are in ``jobs.cli``; nothing here starts or changes anything.
"""

from __future__ import annotations

import time
from typing import Any

from clray.jobs import events


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    # Plain Text, not markup: messages quote config sections like [model.positive].
    text = Text("error: ", style="bold red") + Text(message)
    Console(stderr=True, soft_wrap=True).print(text, highlight=False)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _data_lines(event: events.DataEvent) -> list[str]:
    plan = event.plan
    lines = [f"data: {plan['num_train_rows']} training rows, {plan['steps_per_epoch']} steps/epoch, "
             f"{plan['total_steps']} steps in all"]
    if plan.get("remainder_rows"):
        batch = (plan["num_train_rows"] - plan["remainder_rows"]) // max(1, plan["steps_per_epoch"])
        lines.append(f"  {plan['remainder_rows']} rows per epoch do not fill a last global batch of {batch} and sit "
                     "that epoch out (which ones changes with each epoch's shuffle)")
    if event.quarantined:
        reasons = ", ".join(f"{n} x {r}" for r, n in sorted(event.reasons.items()))
        lines.append(f"[yellow]quarantined {event.quarantined} bad rows[/] ({reasons}) -> {event.quarantine_path}")
    packed = event.packed
    if packed:
        skipped = sum(packed.get("skipped_batches", []))
        lines.append(
            f"packed plan: {len(packed.get('batches_per_plan', []))} epoch plan(s), whole mined batches"
            + (f"; {skipped} batch(es) skipped to keep steps equal on every rank" if skipped else "")
            + ("; epochs cycle through the plans" if packed.get("cycles_plans") else "")
        )
    return lines


class ProgressView:
    """Renders a run's events: a progress bar during training (one line per log outside a
    terminal), mid-run evaluations and re-mining as lines, then nothing else."""

    def __init__(self, console: Any):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = console
        # Outside a terminal (CI logs, pipes) a redrawn bar is noise: print one line per report.
        self.lines = not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.total = 0

    def __call__(self, record: dict[str, Any]) -> None:
        event = events.parse(record)
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)

    def _on_data(self, event: events.DataEvent) -> None:
        for line in _data_lines(event):
            self.console.print(line)
        self.total = event.plan["total_steps"]
        if not self.lines:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, stats="starting workers...")

    def _on_resumed(self, event: events.ResumedEvent) -> None:
        where = f" {event.checkpoint}" if event.checkpoint else ""
        self.console.print(f"resumed from checkpoint{where} at step {event.step} (epoch {event.epoch})",
                           highlight=False)
        if self.task is not None:
            self.progress.update(self.task, completed=event.step)

    def _on_failure(self, event: events.FailureEvent) -> None:
        what = "died" if event.died else "failed"
        allowed = "no limit" if event.max_failures < 0 else f"train.max_failures = {event.max_failures}"
        then = ("restarting the workers from the last complete checkpoint" if event.retrying
                else "no restarts left")
        from rich.markup import escape

        self.console.print(f"[yellow]worker rank {event.rank} {what}[/] ({escape(event.error)}); {then} "
                           f"(failure {event.failures}, {allowed})", highlight=False)

    def _on_warning(self, event: events.WarningEvent) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/] {escape(event.message)}", highlight=False)

    def _on_end(self, event: events.EndEvent) -> None:
        if event.stopped:
            self.stop()

    def _on_train(self, event: events.TrainEvent) -> None:
        m = event.metrics
        stats = (
            f"loss {m['loss']:.4f}  temp {event.temperature:.4f}  "
            f"acc {m.get('accuracy', 0):.3f}  {m['samples_per_s']:.0f} samples/s  "
            f"data wait {100 * m['data_wait_fraction']:.0f}%"
        )
        if self.task is not None:
            self.progress.update(self.task, completed=event.step, stats=stats)
        elif self.lines:
            self.console.print(f"step {event.step}/{self.total}  {stats}", highlight=False)

    def _on_remine(self, event: events.RemineEvent) -> None:
        if event.overlap:
            self.console.print(f"epoch {event.epoch}: mining a new plan beside the training, with the model "
                               f"as it is now ({event.teacher})", highlight=False)
            return
        self.stop()
        self.console.print(f"epoch {event.epoch}: mining a new plan with the current model ({event.teacher})")

    def _on_remined(self, event: events.ReminedEvent) -> None:
        sim = event.statistics["in_batch_negative_similarity"]
        if event.overlap:
            self.console.print(f"mined the plan for epoch {event.epoch} beside the training: {event.plan} (in-batch "
                               f"negative similarity {sim['mined']:.3f} vs random {sim['random']:.3f})", highlight=False)
            return
        self.console.print(
            f"epoch {event.epoch}: training on {event.plan} (in-batch negative similarity "
            f"{sim['mined']:.3f} vs random {sim['random']:.3f})"
        )

    def _on_plan(self, event: events.PlanEvent) -> None:
        if event.mined_at is None:
            return
        waited = f"; the workers waited {event.waited_s:.1f} s for it" if event.waited_s >= 0.05 else ""
        self.console.print(f"epoch {event.epoch}: training on the plan mined at epoch {event.mined_at} "
                           f"({event.plan}){waited}", highlight=False)

    def _on_eval(self, event: events.EvalEvent) -> None:
        if self.total and event.step < self.total:
            # a mid-run evaluation (train.eval_every): one line, the bar goes on
            shown = "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(event.figures.items())
                              if "R@5" not in k and "R@10" not in k)
            self.console.print(f"step {event.step} eval: {shown}", highlight=False)
            return
        self.stop()
        self.console.print("evaluating on the held-out split: done")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def print_summary(console: Any, summary: Any) -> None:
    from rich.table import Table

    from clray.pipelines.storage import join

    table = Table(title=f"clray run: {summary.run_dir}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{summary.steps} ({summary.steps_per_epoch}/epoch)")
    table.add_row("training rows", str(summary.train_rows))
    for key in ("loss", "temperature", "accuracy", "pos_sim", "neg_sim", "samples_per_s", "data_wait_fraction"):
        if key in summary.final_train:
            table.add_row(f"train {key}", fmt(summary.final_train[key]))
    table.add_row("wall time (s)", f"{summary.wall_seconds:.1f}")
    console.print(table)
    if summary.eval:
        console.print(evaluation_table(summary))
    paths = Table(show_header=False, box=None)
    paths.add_row("checkpoints", "\n".join(summary.checkpoints) or "-")
    paths.add_row("export", summary.export_dir or "-")
    if getattr(summary, "batches", "examples") == "packed":
        # the mining job validated and quarantined the rows it packed; its file is the record
        quarantine = f"{summary.quarantine_path} (written by clray mine)" if summary.quarantine_path else "none"
    else:
        quarantine = (
            f"{summary.quarantine_path} ({summary.quarantined_rows} rows)" if summary.quarantine_path
            else "none (no bad rows)"
        )
    paths.add_row("quarantine", quarantine)
    paths.add_row("metrics", join(summary.run_dir, "metrics.jsonl"))  # run_dir may be s3://
    if getattr(summary, "report", None):
        paths.add_row("report", summary.report)
    console.print(paths)


def evaluation_table(summary: Any) -> Any:
    """Every evaluation figure at the start (the baseline, when the run had one) and at the
    end, with the change: what the run bought."""
    from rich.table import Table

    baseline = getattr(summary, "baseline", {}) or {}
    table = Table(title="evaluation: start -> end" if baseline else "evaluation", header_style="bold")
    table.add_column("metric")
    if baseline:
        table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    if baseline:
        table.add_column("change", justify="right")
    for key, value in sorted(summary.eval.items()):
        if not baseline:
            table.add_row(key, fmt(value))
            continue
        start = baseline.get(key)
        change = "-" if start is None else f"{value - start:+.4f}"
        table.add_row(key, "-" if start is None else fmt(start), fmt(value), change)
    step = getattr(summary, "export_step", None)
    if step is not None and step != summary.steps:
        table.caption = f"the export holds step {step}, the best evaluation by train.select_by"
    return table


def print_eval(console: Any, summary: Any) -> None:
    """``clray eval``: every figure, then where the numbers and the bad rows went."""
    from pathlib import Path

    from rich.table import Table

    name = Path(summary.model).name + (f" ({summary.checkpoint})" if summary.checkpoint else "")
    table = Table(title=f"clray eval: {name}, {summary.rows} rows", header_style="bold",
                  caption=summary.model)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(summary.figures.items()):
        table.add_row(key, fmt(value))
    console.print(table)
    if summary.quarantined_rows:
        console.print(f"[yellow]quarantined {summary.quarantined_rows} bad rows[/] -> {summary.quarantine_path}")
    console.print(f"eval.json: {summary.output}  ({summary.wall_seconds:.1f} s)")


def print_mine_event(console: Any, event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == "complete":
        console.print(f"already complete: {event['path']} (same corpus, teacher and settings); nothing to do")
    elif kind == "quarantine":
        console.print(f"data: {event['valid']} valid rows")
        if event["quarantined"]:
            reasons = ", ".join(f"{n} x {r}" for r, n in sorted(event["reasons"].items()))
            console.print(f"[yellow]quarantined {event['quarantined']} bad rows[/] ({reasons}) -> {event['path']}")
    elif kind == "embedded":
        how = "reused from the last run" if event["reused"] else ("on GPU" if event["gpu"] else "on CPU")
        console.print(f"embed: {event['rows']} rows x {event['dim']} dims ({how})")
    elif kind == "searched":
        extra = f", recall@10 {event['recall_at_10']:.3f}" if "recall_at_10" in event else ""
        console.print(f"search: {event['index']} k={event['k']}, {event['chunks_searched']} of {event['chunks']} "
                      f"chunks searched now{extra}")
    elif kind == "planned":
        st = event["statistics"]
        console.print(f"graph: {st['graph']['edges']} edges; {_partition_text(st)}")
    elif kind == "written":
        how = "kept from the last run" if event["reused"] else "written"
        console.print(f"plan epoch {event['epoch']}: {event['batches']} batches {how}")


def _partition_text(st: dict[str, Any]) -> str:
    """How the graph became batches: METIS parts of one batch, or Leiden communities."""
    part = st.get("partition", {})
    if part.get("method") == "metis":
        return f"METIS: {part['parts']} parts of one batch (METIS sizes {part['metis_sizes']}, {part['moved']} rows moved)"
    comm = st.get("communities") or part
    return f"communities: {comm['count']} (typical size {comm['typical_size']:.1f})"


def _false_negative_text(entry: dict[str, float]) -> str:
    text = f"teacher>=positive {entry['teacher_above_positive']:.3f}"
    return text + (f", same label {entry['same_label']:.3f}" if "same_label" in entry else "")


def print_mine_summary(console: Any, summary: Any) -> None:
    from rich.table import Table

    st = summary.statistics
    table = Table(title=f"clray mine: {summary.out_dir}", show_header=True, header_style="bold")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    table.add_row("rows mined", str(summary.rows))
    table.add_row("quarantined rows", str(summary.quarantined_rows))
    table.add_row("epoch plans", f"{summary.epochs} x {summary.batches_per_epoch} batches")
    table.add_row("remainder rows per plan", ", ".join(map(str, summary.remainder_per_epoch)))
    sim = st["in_batch_negative_similarity"]
    table.add_row("in-batch negative sim: mined", fmt(sim["mined"]))
    table.add_row("in-batch negative sim: random", fmt(sim["random"]))
    table.add_row("mined / random", "-" if sim["ratio"] is None else f"{sim['ratio']:.2f}x")
    for index, plan in enumerate(st.get("plans", [])):
        mined, rand = plan["mined"], plan["random"]
        table.add_row(f"plan {index}, global batch: negative sim / teacher>=positive / mutual top-30",
                      f"{mined['negative_similarity']:.3f} / {mined['teacher_above_positive']:.4f} / "
                      f"{mined['mutual_top30']:.4f} (random {rand['negative_similarity']:.3f} / "
                      f"{rand['teacher_above_positive']:.4f} / {rand['mutual_top30']:.4f})")
    fn = st.get("false_negatives", {})
    for name, entry in fn.get("in_batch", {}).items():
        table.add_row(f"est. false negatives in batch, {name.replace('_', ' ')}", _false_negative_text(entry))
    for name in ("with_filter", "without_filter"):
        if name in fn:
            table.add_row(f"est. false negatives in mined negatives, {name.replace('_', ' ')}",
                          _false_negative_text(fn[name]))
    for stage, secs in summary.seconds.items():
        table.add_row(f"time {stage} (s)", f"{secs:.1f}")
    console.print(table)
    console.print(f"manifest: {summary.manifest}")
    if summary.quarantine_path:
        console.print(f"quarantine: {summary.quarantine_path}")


def _clock(millis: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(millis / 1000)) if millis else "-"


def print_jobs(console: Any, address: str, jobs: list[Any], status_name: Any) -> None:
    """``clray jobs list``: one row per job."""
    from rich.table import Table

    table = Table(title=f"jobs on {address}", header_style="bold")
    for column in ("submission id", "status", "command", "config", "after", "started"):
        table.add_column(column, overflow="fold")
    status_of = {job.submission_id: status_name(job.status) for job in jobs if job.submission_id}
    for job in jobs:
        meta = job.metadata or {}
        status = status_name(job.status)
        after = [a for a in meta.get("clray_after", "").split(",") if a]
        if status in ("PENDING", "RUNNING") and any(status_of.get(a) != "SUCCEEDED" for a in after):
            status += " (waiting)"
        table.add_row(job.submission_id or job.job_id or "-", status, meta.get("clray_command", "-"),
                      meta.get("clray_config", "-"), ", ".join(after) or "-", _clock(job.start_time))
    console.print(table)


def print_job(job_id: str, info: Any, status_name: Any) -> None:
    """``clray jobs status``: one job, a line per field."""
    rows = {
        "job": job_id,
        "status": status_name(info.status),
        "message": (info.message or "").strip() or "-",
        "entrypoint": info.entrypoint,
        "metadata": ", ".join(f"{k}={v}" for k, v in (info.metadata or {}).items()) or "-",
    }
    if info.start_time:
        rows["started"] = _clock(info.start_time)
    if info.end_time:
        rows["ended"] = _clock(info.end_time)
    for key, value in rows.items():
        print(f"{key:11s} {value}")
