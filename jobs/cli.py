"""The ``clray`` command line. ``main(argv)`` takes an argv list so tests call it in-process.

User mistakes (config, data, a failed run) end as one clear message and exit code 2;
never a Ray traceback. ``--verbose`` shows worker logs for debugging.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.toml"
QUICKSTART_DATA = Path("data/quickstart")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clray", description="Contrastive representation learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; values are TOML)",
        )

    train = sub.add_parser("train", help="train a dual encoder from a TOML config")
    train.add_argument("config")
    add_set(train)
    train.add_argument("--verbose", action="store_true", help="show Ray worker logs")

    mine = sub.add_parser("mine", help="mine hard-negative batches (B3) and hard negatives into a packed plan")
    mine.add_argument("config")
    add_set(mine)
    mine.add_argument("--overwrite", action="store_true",
                      help="replace a complete plan in output.dir that was mined with other settings")
    mine.add_argument("--verbose", action="store_true", help="show Ray worker logs")

    tune = sub.add_parser("tune", help="search training-config keys (temperature, negatives, ...) with Ray Tune")
    tune.add_argument("config", help="a training config plus a [search] table")
    add_set(tune)
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted search in the run directory: finished trials are kept, "
                      "unfinished and errored ones go on from their last checkpoint")
    tune.add_argument("--verbose", action="store_true", help="show Ray worker logs")

    quick = sub.add_parser("quickstart", help="write the digits corpus (if missing) and train on it")
    quick.add_argument("--data-dir", default=str(QUICKSTART_DATA))
    add_set(quick)
    quick.add_argument("--verbose", action="store_true")

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config with every default")
    show.add_argument("config")
    add_set(show)

    data = sub.add_parser("data", help="corpus utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    qs = data_sub.add_parser("quickstart", help="write the handwritten-digits image-caption corpus")
    qs.add_argument("out_dir")
    qs.add_argument("--shards", type=int, default=4)
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--bad-rows", type=int, default=4, help="deliberately broken rows, to show quarantine")
    qs.add_argument(
        "--hard-negatives", type=int, default=0, metavar="K",
        help="add K hard negatives per training row (captions of the nearest images by pixels, "
        "with ids and teacher scores) for data.negatives",
    )
    cluster = sub.add_parser("cluster", help="cluster launcher YAMLs and KubeRay manifests")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_sub.add_parser(
        "check", help="validate launcher YAMLs (Ray's schema) and KubeRay manifests (a directory: every YAML in it)"
    )
    check.add_argument("files", nargs="+")

    _add_submit_parsers(sub)

    clustered = data_sub.add_parser(
        "clustered", help="write a synthetic clustered text corpus (query, passage, label) where mined batches matter"
    )
    clustered.add_argument("out_dir")
    clustered.add_argument("--rows", type=int, default=8192)
    clustered.add_argument("--clusters", type=int, default=64)
    clustered.add_argument("--eval-rows", type=int, default=1024)
    clustered.add_argument("--shards", type=int, default=4)
    clustered.add_argument("--seed", type=int, default=0)
    return parser


def _add_submit_parsers(sub: Any) -> None:
    """`clray submit` and `clray jobs`: the Jobs API commands (jobs/submit.py)."""

    def add_access(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address", default=None, metavar="URL",
            help="the head's Jobs API (dashboard) URL, e.g. http://HEAD:8265; default: RAY_ADDRESS if it "
            "is an http(s) URL, else the local head `clray submit` started",
        )
        p.add_argument(
            "--token-env", default=None, metavar="NAME",
            help="send the value of environment variable NAME as a bearer token (a TLS proxy's or the "
            "cluster's Ray token)",
        )

    submit = sub.add_parser(
        "submit", help="submit train, tune or mine to a Ray cluster through the Jobs API (no --address: a local head)",
        description="Submit a job. Arguments after `--` are passed to the command unchanged "
        "(e.g. `clray submit tune my.toml -- --resume`).",
    )
    submit.add_argument("job_command", choices=["train", "tune", "mine"], metavar="{train,tune,mine}")
    submit.add_argument("config")
    add_access(submit)
    submit.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, as for `clray train` (repeatable)",
    )
    submit.add_argument(
        "--env", action="append", default=[], metavar="NAME",
        help="forward environment variable NAME (its value here) to the job (repeatable); nothing "
        "else from this environment is sent",
    )
    submit.add_argument("--num-cpus", type=float, default=None,
                        help="CPUs reserved for the job's driver (entrypoint_num_cpus); default none, so "
                        "the driver runs on the head even when the head has CPU: 0")
    submit.add_argument("--num-gpus", type=float, default=None,
                        help="GPUs reserved for the job's driver (entrypoint_num_gpus); the training "
                        "workers ask for their own")
    submit.add_argument("--submission-id", default=None, help="the job's id (default: generated by Ray)")
    submit.add_argument(
        "--deps", choices=["pip", "none"], default=None,
        help="pip: install clray's pinned dependencies into a per-job virtualenv on each node (default "
        "for a given --address); none: use the nodes' Python as it is (default for the local head, "
        "and for images that already have clray's dependencies)",
    )
    submit.add_argument("--local-cpus", type=int, default=None,
                        help="logical CPUs for a local head started now (default: what the job needs, "
                        "at least this machine's cores)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    add_access(jobs_sub.add_parser("list", help="every job on the cluster"))
    status = jobs_sub.add_parser("status", help="a job's status, message and metadata")
    status.add_argument("job_id")
    add_access(status)
    logs = jobs_sub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
    add_access(logs)
    stop = jobs_sub.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    add_access(stop)
    jobs_sub.add_parser("down", help="stop the local Ray head that `clray submit` started (only that one)")


def _submit_command(args: argparse.Namespace) -> int:
    from clray.jobs import submit

    # Plain print, not rich: rich wraps at the terminal width, and ids and commands are
    # meant to be copied whole.
    def say(text: str) -> None:
        print(text, flush=True)

    def warn(text: str) -> None:
        print(f"warning: {text}", file=sys.stderr, flush=True)

    done = submit.submit(args, say, warn)
    say(f"submitted {args.job_command} {args.config} as job {done.submission_id} to {done.address}")
    address_flag = f" --address {done.address}" if args.address else ""
    say(f"  follow:  clray jobs logs {done.submission_id} --follow{address_flag}")
    say(f"  status:  clray jobs status {done.submission_id}{address_flag}")
    say(f"  stop:    clray jobs stop {done.submission_id}{address_flag}")
    if args.follow:
        return _follow(done.address, done.submission_id, args.token_env)
    return 0


def _follow(address: str, job_id: str, token_env: str | None) -> int:
    from clray.jobs import submit

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        status = submit.follow_logs(address, job_id, token_env, write)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`clray jobs stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        return 0
    info = submit.job_info(address, job_id, token_env)
    raise submit.SubmitError(f"job {job_id} ended {status}: {(info.message or '').strip() or 'see its logs above'}")


def _jobs_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from clray.jobs import submit

    console = Console()
    if args.jobs_command == "down":
        return submit.stop_local_head(print)
    address, _ = submit.resolve_jobs_address(args.address)
    if args.jobs_command == "list":
        table = Table(title=f"jobs on {address}", header_style="bold")
        for column in ("submission id", "status", "command", "config", "started"):
            table.add_column(column)
        for job in submit.list_jobs(address, args.token_env):
            meta = job.metadata or {}
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
            table.add_row(job.submission_id or job.job_id or "-", submit._status_name(job.status),
                          meta.get("clray_command", "-"), meta.get("clray_config", "-"), started)
        console.print(table)
        return 0
    if args.jobs_command == "status":
        info = submit.job_info(address, args.job_id, args.token_env)
        rows = {
            "job": args.job_id,
            "status": submit._status_name(info.status),
            "message": (info.message or "").strip() or "-",
            "entrypoint": info.entrypoint,
            "metadata": ", ".join(f"{k}={v}" for k, v in (info.metadata or {}).items()) or "-",
        }
        if info.start_time:
            rows["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))
        if info.end_time:
            rows["ended"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.end_time / 1000))
        for key, value in rows.items():
            print(f"{key:11s} {value}")
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            return _follow(address, args.job_id, args.token_env)
        sys.stdout.write(submit.job_logs(address, args.job_id, args.token_env))
        return 0
    if args.jobs_command == "stop":
        stopped = submit.stop_job(address, args.job_id, args.token_env)
        print(f"job {args.job_id}: " + ("stop requested" if stopped else "already ended, nothing to stop"))
        return 0
    return 1


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    # Plain Text, not markup: messages quote config sections like [model.positive].
    text = Text("error: ", style="bold red") + Text(message)
    Console(stderr=True, soft_wrap=True).print(text, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressView:
    """Renders worker events: a progress bar during training, then nothing else."""

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

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "data":
            plan = event["plan"]
            self.console.print(
                f"data: {plan['num_train_rows']} training rows, {plan['steps_per_epoch']} steps/epoch, "
                f"{plan['total_steps']} steps in all"
            )
            if event["quarantined"]:
                reasons = ", ".join(f"{n} x {r}" for r, n in sorted(event["reasons"].items()))
                self.console.print(
                    f"[yellow]quarantined {event['quarantined']} bad rows[/] ({reasons}) -> {event['quarantine_path']}"
                )
            packed = event.get("packed")
            if packed:
                skipped = sum(packed.get("skipped_batches", []))
                self.console.print(
                    f"packed plan: {len(packed.get('batches_per_plan', []))} epoch plan(s), whole mined batches"
                    + (f"; {skipped} batch(es) skipped to keep steps equal on every rank" if skipped else "")
                    + ("; epochs cycle through the plans" if packed.get("cycles_plans") else "")
                )
            self.total = plan["total_steps"]
            if not self.lines:
                self.progress.start()
                self.task = self.progress.add_task("train", total=self.total, stats="starting workers...")
        elif kind == "resumed":
            self.console.print(f"resumed from checkpoint at step {event['step']} (epoch {event['epoch']})")
            if self.task is not None:
                self.progress.update(self.task, completed=event["step"])
        elif kind == "train":
            stats = (
                f"loss {event['loss']:.4f}  temp {event['temperature']:.4f}  "
                f"acc {event.get('accuracy', 0):.3f}  {event['samples_per_s']:.0f} samples/s  "
                f"data wait {100 * event['data_wait_fraction']:.0f}%"
            )
            if self.task is not None:
                self.progress.update(self.task, completed=event["step"], stats=stats)
            elif self.lines:
                self.console.print(f"step {event['step']}/{self.total}  {stats}", highlight=False)
        elif kind == "remine":
            self.stop()
            self.console.print(f"epoch {event['epoch']}: mining a new plan with the current model ({event['teacher']})")
        elif kind == "remined":
            sim = event["statistics"]["in_batch_negative_similarity"]
            self.console.print(
                f"epoch {event['epoch']}: training on {event['plan']} (in-batch negative similarity "
                f"{sim['mined']:.3f} vs random {sim['random']:.3f})"
            )
        elif kind == "eval" and self.total and event.get("step", self.total) < self.total:
            # a mid-run evaluation (train.eval_every): one line, the bar goes on
            shown = "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(event.items())
                              if k.startswith("eval/") and isinstance(v, float) and "R@5" not in k and "R@10" not in k)
            self.console.print(f"step {event['step']} eval: {shown}", highlight=False)
        elif kind == "eval":
            self.stop()
            self.console.print("evaluating on the held-out split: done")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def _print_summary(console: Any, summary: Any) -> None:
    from rich.table import Table

    from clray.pipelines.storage import join

    table = Table(title=f"clray run: {summary.run_dir}", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{summary.steps} ({summary.steps_per_epoch}/epoch)")
    table.add_row("training rows", str(summary.train_rows))
    for key in ("loss", "temperature", "accuracy", "pos_sim", "neg_sim", "samples_per_s", "data_wait_fraction"):
        if key in summary.final_train:
            table.add_row(f"train {key}", _fmt(summary.final_train[key]))
    for key, value in sorted(summary.eval.items()):
        table.add_row(key, _fmt(value))
    table.add_row("wall time (s)", f"{summary.wall_seconds:.1f}")
    console.print(table)
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
    console.print(paths)


def _train(config_path: str | Path, overrides: list[str], verbose: bool) -> int:
    from rich.console import Console

    from clray.jobs.config import load_config
    from clray.jobs.remine import run_with_remining

    console = Console()
    cfg = load_config(config_path, overrides)
    view = ProgressView(console)
    try:
        summary = run_with_remining(cfg, verbose=verbose, on_event=view)
    finally:
        view.stop()
    _print_summary(console, summary)
    return 0


def _mine_event(console: Any, event: dict[str, Any]) -> None:
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
        console.print(f"graph: {st['graph']['edges']} edges; communities: {st['communities']['count']} "
                      f"(typical size {st['communities']['typical_size']:.1f})")
    elif kind == "written":
        how = "kept from the last run" if event["reused"] else "written"
        console.print(f"plan epoch {event['epoch']}: {event['batches']} batches {how}")


def _print_mine_summary(console: Any, summary: Any) -> None:
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
    table.add_row("in-batch negative sim: mined", _fmt(sim["mined"]))
    table.add_row("in-batch negative sim: random", _fmt(sim["random"]))
    table.add_row("mined / random", "-" if sim["ratio"] is None else f"{sim['ratio']:.2f}x")
    fn = st.get("false_negatives", {})

    def fn_text(entry: dict[str, float]) -> str:
        text = f"teacher>=positive {entry['teacher_above_positive']:.3f}"
        return text + (f", same label {entry['same_label']:.3f}" if "same_label" in entry else "")

    for name, entry in fn.get("in_batch", {}).items():
        table.add_row(f"est. false negatives in batch, {name.replace('_', ' ')}", fn_text(entry))
    for name in ("with_filter", "without_filter"):
        if name in fn:
            table.add_row(f"est. false negatives in mined negatives, {name.replace('_', ' ')}", fn_text(fn[name]))
    for stage, secs in summary.seconds.items():
        table.add_row(f"time {stage} (s)", f"{secs:.1f}")
    console.print(table)
    console.print(f"manifest: {summary.manifest}")
    if summary.quarantine_path:
        console.print(f"quarantine: {summary.quarantine_path}")


def _mine(config_path: str, overrides: list[str], verbose: bool, overwrite: bool) -> int:
    from rich.console import Console

    from clray.jobs.mine import load_mine_config, run_mining

    console = Console()
    cfg = load_mine_config(config_path, overrides)
    summary = run_mining(cfg, verbose=verbose, overwrite=overwrite, on_event=lambda e: _mine_event(console, e))
    _print_mine_summary(console, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `clray submit ... -- ARGS`: ARGS go to the submitted command unchanged.
    extra: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    args.extra = extra

    from clray.jobs.config import ConfigError
    from clray.jobs.mine import MineError
    from clray.jobs.submit import SubmitError
    from clray.jobs.train import TrainingError
    from clray.pipelines.errors import DataError
    from clray.pipelines.plan_format import PlanFormatError

    try:
        if args.command == "train":
            return _train(args.config, args.overrides, args.verbose)
        if args.command == "submit":
            return _submit_command(args)
        if args.command == "jobs":
            return _jobs_command(args)
        if args.command == "cluster":
            from clray.jobs.cluster_check import main_check

            return main_check(args.files)
        if args.command == "tune":
            from clray.jobs.tune import load_tune_config, run_tune

            job = load_tune_config(args.config, args.overrides)
            summary = run_tune(job, resume=args.resume, verbose=args.verbose)
            return 0 if summary.best_config else 1
        if args.command == "mine":
            return _mine(args.config, args.overrides, args.verbose, args.overwrite)
        if args.command == "quickstart":
            from clray.pipelines.quickstart import write_quickstart_corpus

            data_dir = Path(args.data_dir)
            if not (data_dir / "train").is_dir():
                info = write_quickstart_corpus(data_dir)
                print(f"wrote the quickstart corpus to {data_dir} ({info.get('train_rows', '?')} train rows)")
            overrides = [f'data.train="{data_dir / "train"}"', f'data.eval="{data_dir / "eval"}"', *args.overrides]
            return _train(QUICKSTART_CONFIG, overrides, args.verbose)
        if args.command == "config":
            from clray.jobs.config import dump_toml, load_config

            print(dump_toml(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "data" and args.data_command == "clustered":
            from clray.pipelines.synthetic import write_clustered_corpus

            info = write_clustered_corpus(
                args.out_dir, num_rows=args.rows, num_clusters=args.clusters, eval_rows=args.eval_rows,
                num_shards=args.shards, seed=args.seed,
            )
            for key in ("train_rows", "eval_rows", "bad_rows", "num_clusters", "columns"):
                print(f"{key}: {info[key]}")
            return 0
        if args.command == "data":
            from clray.pipelines.quickstart import write_quickstart_corpus

            info = write_quickstart_corpus(
                args.out_dir, num_shards=args.shards, seed=args.seed, bad_rows=args.bad_rows,
                hard_negatives=args.hard_negatives,
            )
            for key, value in info.items():
                print(f"{key}: {value}")
            return 0
    except (ConfigError, DataError, TrainingError, MineError, PlanFormatError, SubmitError,
            FileNotFoundError) as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted; start the same run again to resume from its last checkpoint")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
