"""The ``clray`` command line: argument parsing and dispatch. ``main(argv)`` takes an argv
list so tests call it in-process. What it prints is in ``jobs.views``.

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
"""The clray package's directory (the repository root in a checkout)."""
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.toml"
QUICKSTART_DATA = Path("data/quickstart")


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; values are TOML)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clray", description="Contrastive representation learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parsers(sub)
    _add_data_parsers(sub)
    cluster = sub.add_parser("cluster", help="cluster launcher YAMLs and KubeRay manifests")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    check = cluster_sub.add_parser(
        "check", help="validate launcher YAMLs (Ray's schema) and KubeRay manifests (a directory: every YAML in it)"
    )
    check.add_argument("files", nargs="+")
    _add_submit_parsers(sub)
    evaluate = sub.add_parser(
        "eval", help="evaluate a model (a clray export, a run's checkpoint, a local Hugging Face text model) on a split")
    evaluate.add_argument("model", help="an export directory, a run directory, or a saved Hugging Face model")
    evaluate.add_argument("--config", default=None,
                          help="a TOML whose [data] names the split in data.eval (default: a run's own config.toml);"
                          " [eval] sets batch_size, num_actors, pooling, max_length")
    evaluate.add_argument("--checkpoint", default=None, help="for a run: the checkpoint directory (default: the newest)")
    evaluate.add_argument("--out", default=None, help="where eval.json goes (default: in the model or run directory)")
    add_set(evaluate)
    evaluate.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    report = sub.add_parser("report", help="(re)build report.html of a run or search directory")
    report.add_argument("directory", help="a run directory (run.output_dir/run.name) or a `clray tune` search directory")
    return parser


def _add_run_parsers(sub: Any) -> None:
    """train, mine, tune, quickstart and config: the commands that read a config."""

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
    show = config_sub.add_parser(
        "show", help="print the resolved config with every default (training, mining or search config)")
    show.add_argument("config")
    add_set(show)


def _add_data_parsers(sub: Any) -> None:
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
    clustered = data_sub.add_parser(
        "clustered", help="write a synthetic clustered text corpus (query, passage, label) where mined batches matter"
    )
    clustered.add_argument("out_dir")
    clustered.add_argument("--rows", type=int, default=8192)
    clustered.add_argument("--clusters", type=int, default=64)
    clustered.add_argument("--eval-rows", type=int, default=1024)
    clustered.add_argument("--shards", type=int, default=4)
    clustered.add_argument("--seed", type=int, default=0)


def _add_submit_parsers(sub: Any) -> None:
    """`clray submit` and `clray jobs`: the Jobs API commands (jobs/submit/)."""

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
    submit.add_argument(
        "--after", action="append", default=[], metavar="ID",
        help="start the command only once job ID has SUCCEEDED (repeatable); the job is submitted now and "
        "waits on the cluster; it fails without running if ID ends FAILED or STOPPED",
    )

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
    up = jobs_sub.add_parser(
        "up", help="start a local Ray head for `clray submit` (with --simulate: an autoscaling cluster on this machine)")
    up.add_argument("--cpus", type=int, default=None, help="logical CPUs of a plain local head (default: the cores)")
    up.add_argument("--simulate", type=Path, default=None, metavar="LAUNCHER_YAML",
                    help="simulate the cluster a launcher file describes (e.g. cluster/aws.yaml): its node types "
                    "scale from their min_workers as jobs need them, as raylets on this machine")
    up.add_argument("--node-cpus", type=int, default=2, help="CPUs of each simulated node (default 2)")
    up.add_argument("--max-nodes", type=int, default=2, help="most simulated nodes per node type (default 2)")
    up.add_argument("--idle-s", type=float, default=10.0, help="seconds before an idle simulated node goes (default 10)")




def _submit(args: argparse.Namespace) -> int:
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


def _jobs(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clray.jobs import submit, views

    if args.jobs_command == "down":
        return submit.stop_local_head(print)
    if args.jobs_command == "up":
        submit.start_recorded_head(lambda text: print(text, flush=True), args.cpus or os.cpu_count() or 1,
                                   args.simulate, args.node_cpus, args.max_nodes, args.idle_s)
        return 0
    address, _ = submit.resolve_jobs_address(args.address)
    if args.jobs_command == "list":
        views.print_jobs(Console(), address, submit.list_jobs(address, args.token_env), submit.status_name)
    elif args.jobs_command == "status":
        views.print_job(args.job_id, submit.job_info(address, args.job_id, args.token_env), submit.status_name)
    elif args.jobs_command == "logs":
        if args.follow:
            return _follow(address, args.job_id, args.token_env)
        sys.stdout.write(submit.job_logs(address, args.job_id, args.token_env))
    elif args.jobs_command == "stop":
        stopped = submit.stop_job(address, args.job_id, args.token_env)
        print(f"job {args.job_id}: " + ("stop requested" if stopped else "already ended, nothing to stop"))
    return 0


def _train_config(config_path: str | Path, overrides: list[str], verbose: bool) -> int:
    from rich.console import Console

    from clray.jobs import views
    from clray.jobs.config import load_config
    from clray.jobs.run import train

    console = Console()
    cfg = load_config(config_path, overrides)
    view = views.ProgressView(console)
    try:
        summary = train(cfg, verbose=verbose, on_event=view)
    finally:
        view.stop()
    views.print_summary(console, summary)
    return 0


def _train(args: argparse.Namespace) -> int:
    return _train_config(args.config, args.overrides, args.verbose)


def _quickstart(args: argparse.Namespace) -> int:
    from clray.pipelines.quickstart import write_quickstart_corpus

    data_dir = Path(args.data_dir)
    if not (data_dir / "train").is_dir():
        info = write_quickstart_corpus(data_dir)
        print(f"wrote the quickstart corpus to {data_dir} ({info.get('train_rows', '?')} train rows)")
    overrides = [f'data.train="{data_dir / "train"}"', f'data.eval="{data_dir / "eval"}"', *args.overrides]
    return _train_config(QUICKSTART_CONFIG, overrides, args.verbose)


def _mine(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clray.jobs import views
    from clray.jobs.mine import load_mine_config, run_mining

    console = Console()
    cfg = load_mine_config(args.config, args.overrides)
    summary = run_mining(cfg, verbose=args.verbose, overwrite=args.overwrite,
                         on_event=lambda e: views.print_mine_event(console, e))
    views.print_mine_summary(console, summary)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from clray.jobs.tune import load_tune_config, run_tune

    job = load_tune_config(args.config, args.overrides)
    summary = run_tune(job, resume=args.resume, verbose=args.verbose)
    return 0 if summary.best_config else 1


def _config(args: argparse.Namespace) -> int:
    """The resolved config with every default: a training, mining or search config (told
    apart by their tables: [search], or [teacher] and [mining])."""
    import tomli_w

    from clray.jobs.config import dump_toml, load_config, read_toml

    raw = read_toml(args.config)
    if "search" in raw:
        from clray.jobs.config.search import load_tune_config

        job = load_tune_config(args.config, args.overrides)
        print(dump_toml(job.base), end="")
        print(tomli_w.dumps({"search": job.search.model_dump(mode="json", exclude_none=True)}), end="")
    elif "teacher" in raw or "mining" in raw:
        from clray.jobs.config.mine import load_mine_config

        print(tomli_w.dumps(load_mine_config(args.config, args.overrides).model_dump(mode="json", exclude_none=True)),
              end="")
    else:
        print(dump_toml(load_config(args.config, args.overrides)), end="")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from clray.jobs.clustercheck import main_check

    return main_check(args.files)


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "clustered":
        from clray.pipelines.synthetic import write_clustered_corpus

        info = write_clustered_corpus(
            args.out_dir, num_rows=args.rows, num_clusters=args.clusters, eval_rows=args.eval_rows,
            num_shards=args.shards, seed=args.seed,
        )
        for key in ("train_rows", "eval_rows", "bad_rows", "num_clusters", "columns"):
            print(f"{key}: {info[key]}")
        return 0
    from clray.pipelines.quickstart import write_quickstart_corpus

    info = write_quickstart_corpus(
        args.out_dir, num_shards=args.shards, seed=args.seed, bad_rows=args.bad_rows,
        hard_negatives=args.hard_negatives,
    )
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from clray.jobs import views
    from clray.jobs.config.eval import load_eval_config
    from clray.jobs.eval import run_eval

    cfg = load_eval_config(args.model, args.config, args.overrides, checkpoint=args.checkpoint, output=args.out)
    views.print_eval(Console(), run_eval(cfg, verbose=args.verbose))
    return 0


def _report(args: argparse.Namespace) -> int:
    from clray.jobs import report, views

    try:
        path = report.build(args.directory)
    except report.ReportError as exc:
        views.print_error(str(exc))
        return 2
    print(f"report: {path}")
    return 0


COMMANDS = {
    "train": _train, "quickstart": _quickstart, "mine": _mine, "tune": _tune, "config": _config,
    "cluster": _cluster, "data": _data, "submit": _submit, "jobs": _jobs, "report": _report, "eval": _eval,
}


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

    from clray.jobs import views
    from clray.jobs.config import ConfigError
    from clray.jobs.eval import EvalError
    from clray.jobs.run import RunError, RunStopped
    from clray.jobs.submit import SubmitError
    from clray.pipelines.errors import DataError, MineError
    from clray.pipelines.plan_format import PlanFormatError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, RunError, MineError, PlanFormatError, SubmitError, EvalError,
            FileNotFoundError) as exc:
        views.print_error(str(exc))
        return 2
    except RunStopped as stop:
        views.print_error(str(stop))
        return stop.exit_code
    except KeyboardInterrupt:
        views.print_error("interrupted; start the same run again to resume from its last checkpoint")
        return 130


if __name__ == "__main__":
    sys.exit(main())
