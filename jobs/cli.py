"""The ``clray`` command line. ``main(argv)`` takes an argv list so tests call it in-process.

User mistakes (config, data, a failed run) end as one clear message and exit code 2;
never a Ray traceback. ``--verbose`` shows worker logs for debugging.
"""

from __future__ import annotations

import argparse
import os
import sys
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
        elif kind == "eval":
            self.stop()
            self.console.print("evaluating on the held-out split: done")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.task = None


def _print_summary(console: Any, summary: Any) -> None:
    from rich.table import Table

    from pipelines.storage import join

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

    from jobs.config import load_config
    from jobs.remine import run_with_remining

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

    from jobs.mine import load_mine_config, run_mining

    console = Console()
    cfg = load_mine_config(config_path, overrides)
    summary = run_mining(cfg, verbose=verbose, overwrite=overwrite, on_event=lambda e: _mine_event(console, e))
    _print_mine_summary(console, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)

    from jobs.config import ConfigError
    from jobs.mine import MineError
    from jobs.train import TrainingError
    from pipelines.errors import DataError
    from pipelines.plan_format import PlanFormatError

    try:
        if args.command == "train":
            return _train(args.config, args.overrides, args.verbose)
        if args.command == "cluster":
            from jobs.cluster_check import main_check

            return main_check(args.files)
        if args.command == "mine":
            return _mine(args.config, args.overrides, args.verbose, args.overwrite)
        if args.command == "quickstart":
            from pipelines.quickstart import write_quickstart_corpus

            data_dir = Path(args.data_dir)
            if not (data_dir / "train").is_dir():
                info = write_quickstart_corpus(data_dir)
                print(f"wrote the quickstart corpus to {data_dir} ({info.get('train_rows', '?')} train rows)")
            overrides = [f'data.train="{data_dir / "train"}"', f'data.eval="{data_dir / "eval"}"', *args.overrides]
            return _train(QUICKSTART_CONFIG, overrides, args.verbose)
        if args.command == "config":
            from jobs.config import dump_toml, load_config

            print(dump_toml(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "data" and args.data_command == "clustered":
            from pipelines.synthetic import write_clustered_corpus

            info = write_clustered_corpus(
                args.out_dir, num_rows=args.rows, num_clusters=args.clusters, eval_rows=args.eval_rows,
                num_shards=args.shards, seed=args.seed,
            )
            for key in ("train_rows", "eval_rows", "bad_rows", "num_clusters", "columns"):
                print(f"{key}: {info[key]}")
            return 0
        if args.command == "data":
            from pipelines.quickstart import write_quickstart_corpus

            info = write_quickstart_corpus(
                args.out_dir, num_shards=args.shards, seed=args.seed, bad_rows=args.bad_rows,
                hard_negatives=args.hard_negatives,
            )
            for key, value in info.items():
                print(f"{key}: {value}")
            return 0
    except (ConfigError, DataError, TrainingError, MineError, PlanFormatError, FileNotFoundError) as exc:
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        _print_error("interrupted; start the same run again to resume from its last checkpoint")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
