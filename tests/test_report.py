"""Run and search reports, built from synthetic directories (no training needed) and
opened in a real headless Chromium, which must render every plot without an error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clray.jobs import events
from clray.jobs.config import dump_toml, load_config
from clray.jobs.report import (
    ENVIRONMENT_FILE,
    ReportError,
    build,
    build_report,
    build_search_report,
    environment,
)
from clray.models.metrics import embedding_geometry, ir_retrieval_metrics, retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = Path("/tmp/clray-report-screenshot.png")
"""Where the browser test leaves a screenshot of a run report, for a human to look at."""
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _eval_event(step: int, noise: float, time_: float) -> events.EvalEvent:
    """An evaluation of embeddings that get better as ``noise`` falls, with real figures."""
    g = torch.Generator().manual_seed(step)
    captions = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    caption_of = torch.arange(60) % 12
    images = torch.nn.functional.normalize(captions[caption_of] + noise * torch.randn(60, 16, generator=g), dim=1)
    keys = [f"caption {int(c)}" for c in caption_of]
    figures = {f"eval/{k}": v for k, v in retrieval_metrics(images, captions[caption_of], labels=caption_of).items()}
    figures.update({f"eval/{k}": v for k, v in ir_retrieval_metrics(images, captions[caption_of],
                                                                     positive_keys=keys).items()})
    geometry = embedding_geometry(images, captions[caption_of], positive_keys=keys)
    figures.update({f"eval/{k}": v for k, v in geometry.figures().items()})
    figures["eval/zero_shot_accuracy"] = 1.0 / (1.0 + noise)
    return events.EvalEvent(step=step, epoch=step // 10, metrics={"eval_rows": 60, **figures},
                            histograms=geometry.histogram, time=time_)


def write_run_dir(run_dir: Path, steps: int = 30, resumed_at: int | None = 15, complete: bool = True,
                  lr: float = 1e-3) -> Path:
    """A run directory as a driver leaves it: events (with a resumed start that re-logs
    steps after its checkpoint), summary, config, environment and quarantine."""
    run_dir.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "quickstart.toml", [f'run.name="{run_dir.name}"'])
    (run_dir / "config.toml").write_text(dump_toml(cfg))
    (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment(cfg)))
    pq.write_table(pa.table({"id": ["r7", "r9", "r12"], "reason": ["caption: empty text", "image: null image",
                                                                    "caption: empty text"],
                             "file": ["train/part-0.parquet"] * 3}), run_dir / "quarantine.parquet")
    records = [events.DataEvent(plan={"steps_per_epoch": 10, "total_steps": steps}, quarantined=3,
                                quarantine_path=str(run_dir / "quarantine.parquet"),
                                reasons={"caption: empty text": 2, "image: null image": 1}, time=1.0)]

    def train(step: int) -> events.TrainEvent:
        return events.TrainEvent(
            metrics={"loss": 3.0 * np.exp(-step / 12) + 0.5, "accuracy": 1 - np.exp(-step / 10), "pos_sim": 0.5,
                     "neg_sim": 0.1, "samples_per_s": 900.0 + step, "data_wait_fraction": 0.02},
            step=step, epoch=step // 10, samples_seen=64 * step, temperature=0.07 - step * 0.0005,
            lr=lr * min(1.0, step / 5), time=10.0 + step)

    records += [train(s) for s in range(2, (resumed_at or steps) + 5, 2)]  # the first start got past the resume point
    records.append(_eval_event(10, noise=1.5, time_=20.0))
    if resumed_at is not None:
        records.append(events.ResumedEvent(step=resumed_at, epoch=1, step_in_epoch=5, dataset="train", time=40.0))
        records += [train(s) for s in range(resumed_at + 1, steps + 1) if s % 2 == 0]
    records.append(events.EndEvent(step=steps, epoch=steps // 10, complete=complete, time=80.0))
    records.append(_eval_event(steps, noise=0.4, time_=81.0))
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for event in records:
            fh.write(json.dumps(event.record()) + "\n")
    final_eval = records[-1]
    (run_dir / "summary.json").write_text(json.dumps({
        "run_dir": str(run_dir), "steps": steps, "epochs": steps // 10, "steps_per_epoch": 10, "train_rows": 640,
        "quarantined_rows": 3, "quarantine_path": str(run_dir / "quarantine.parquet"),
        "quarantine_reasons": {"caption: empty text": 2, "image: null image": 1}, "checkpoints": [],
        "export_dir": str(run_dir / "export"), "eval": final_eval.figures, "wall_seconds": 81.5,
        "total_steps": steps, "batches": "examples"}))
    return run_dir


def images_in(page: str) -> list[str]:
    return re.findall(r'<img class="plot" src="data:image/png;base64,[^"]+"', page)


def test_run_report_holds_every_section(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path / "demo")
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    for anchor in ("overview", "training", "evaluation", "similarity", "config", "data", "environment"):
        assert f'<section id="{anchor}">' in page
    assert len(images_in(page)) == 3  # training curves, evaluation figures, histograms
    assert "complete: 30 steps" in page and "resumed starts" in page
    assert "a2p_ir_MRR@10" in page and "modality_gap" in page  # the eval table lists every figure
    assert "caption: empty text" in page and "r12" in page  # quarantine reasons and rows
    assert "[data.anchor]" in page  # the resolved config
    assert f"{torch.__version__}" in page  # the recorded environment
    # Self-contained: no scripts, nothing fetched from anywhere.
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)


def test_run_report_of_an_unfinished_run_and_bad_inputs(tmp_path: Path) -> None:
    run_dir = write_run_dir(tmp_path / "stopped", steps=20, resumed_at=None, complete=False)
    (run_dir / "summary.json").unlink()
    (run_dir / ENVIRONMENT_FILE).unlink()
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"event": "remine", "epoch": 1, "teacher": "t"}\n{"event": "fancy_new_kind"}\n{"event": "tra')
    page = build_report(run_dir).read_text()
    assert "stopped at step 20" in page
    assert "skipped the truncated last line" in page and "fancy_new_kind x1" in page
    assert "recorded no environment.json" in page

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]))
    with pytest.raises(ReportError, match=r"metrics.jsonl:2 is not JSON .* remove or repair that line"):
        build_report(run_dir)
    with pytest.raises(ReportError, match="has no metrics.jsonl: not a clray run directory"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="is not a directory"):
        build_report(tmp_path / "nope")
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n")
    (run_dir / "quarantine.parquet").write_text("not parquet")
    with pytest.raises(ReportError, match=r"quarantine.parquet is not a readable Parquet file"):
        build_report(run_dir)


def test_eval_histograms_survive_the_event_record() -> None:
    event = _eval_event(4, noise=1.0, time_=3.0)
    again = events.parse(json.loads(json.dumps(event.record())))
    assert isinstance(again, events.EvalEvent) and again.histograms == event.histograms
    assert "histograms" not in again.metrics and again.figures == pytest.approx(event.figures)
    assert "histograms" not in events.EvalEvent(step=1, epoch=0, metrics={}).record()


def write_search_dir(search_dir: Path) -> Path:
    """A finished two-trial search, one of whose trials PBT restarted as a new generation."""
    (search_dir / "trials").mkdir(parents=True)
    write_run_dir(search_dir / "trials" / "t0001", lr=1e-3)
    write_run_dir(search_dir / "trials" / "t0002", steps=14, resumed_at=None, lr=3e-4)
    write_run_dir(search_dir / "trials" / "t0002-1", steps=30, resumed_at=14, lr=6e-4)
    rows = [{"trial_id": "t0001", "status": "COMPLETE", "steps": 30, "metric_last": 0.7, "metric_best": 0.7,
             "evaluations": 2, "run_name": "t0001", "error": None, "curve": "[]", "optim.lr": 1e-3},
            {"trial_id": "t0002", "status": "COMPLETE", "steps": 30, "metric_last": 0.6, "metric_best": 0.6,
             "evaluations": 2, "run_name": "t0002-1", "error": None, "curve": "[]", "optim.lr": 3e-4}]
    pq.write_table(pa.Table.from_pylist(rows), search_dir / "results.parquet")
    (search_dir / "plots").mkdir()
    _write_png(search_dir / "plots" / "curves.png")  # what `clray tune` draws today
    (search_dir / "best.toml").write_text("# Best trial t0001\n[optim]\nlr = 0.001\n")
    (search_dir / "summary.json").write_text(json.dumps({
        "search_dir": str(search_dir), "metric": "eval/zero_shot_accuracy", "mode": "max", "best_trial": "t0001",
        "best_value": 0.7, "best_params": {"optim.lr": 1e-3}, "total_trial_steps": 60, "wall_seconds": 300.0}))
    return search_dir


def _write_png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1, 2], [0.2, 0.5, 0.7])
    fig.savefig(path)


def test_search_report_joins_each_trials_generations(tmp_path: Path) -> None:
    search_dir = write_search_dir(tmp_path / "search")
    path = build(search_dir)  # build() tells a search directory from a run directory
    assert path == search_dir / "report.html"
    page = path.read_text()
    for anchor in ("overview", "trials", "plots", "curves", "each", "best", "environment"):
        assert f'<section id="{anchor}">' in page
    # search plot + comparison + one grid per trial (t0002's two generations are one trial)
    assert len(images_in(page)) == 4
    assert page.count("<h3>") == 2 and "t0002 (lr=0.0003)" in page
    for run in ("t0001", "t0002", "t0002-1"):  # every trial run got its own report, linked
        assert (search_dir / "trials" / run / "report.html").is_file()
        assert f'href="trials/{run}/report.html"' in page
    assert "eval/zero_shot_accuracy (max)" in page and "lr = 0.001" in page
    with pytest.raises(ReportError, match="not a clray tune search directory"):
        build_search_report(tmp_path / "search" / "plots")


# --- in a real browser -------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
const consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); consoleError(...args); };
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0 || i.naturalHeight === 0).length;
  const marker = document.createElement("div");
  marker.id = "clray-probe";
  marker.textContent = `images=${images.length} broken=${broken} errors=${window.__errors.length}`;
  document.body.appendChild(marker);
});
</script>"""
"""Added to a copy of the page (the report itself has no scripts): after load it writes
how many images there are, how many did not decode, and the errors seen, into the DOM."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.fail("Chromium is not installed, and the report test needs a real browser: install it with "
                "`apt-get install -y chromium` (.ci/bootstrap does this on CI)")


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def console_messages(stderr: str) -> list[str]:
    """Whatever the page wrote to the console, and loads it failed. Chromium's log does not
    say a console message's level, and a report has no scripts of its own, so any console
    message at all (an uncaught error, a refused resource) fails the test."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "net::ERR_" in line]


@pytest.mark.parametrize("kind", ["run", "search"])
def test_reports_render_in_a_real_browser(kind: str, tmp_path: Path) -> None:
    if kind == "run":
        path = build_report(write_run_dir(tmp_path / "demo"))
    else:
        path = build_search_report(write_search_dir(tmp_path / "search"))
    page = path.read_text()
    expected = len(images_in(page))
    probe = path.with_name("probe.html")
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))

    dom = run_chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-3000:]
    marker = re.search(r'<div id="clray-probe">([^<]*)</div>', dom.stdout)
    assert marker, f"the page never finished loading in Chromium:\n{dom.stderr[-3000:]}"
    assert marker.group(1) == f"images={expected} broken=0 errors=0"
    assert console_messages(dom.stderr) == []

    shot = SCREENSHOT if kind == "run" else tmp_path / "search.png"
    shot.unlink(missing_ok=True)
    taken = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars",
                         path.as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-3000:]
    assert console_messages(taken.stderr) == []
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # Plots drew something: plenty of pixels far from the white page, in several colours.
    inked = (np.abs(pixels - 255).sum(axis=2) > 120).mean()
    assert inked > 0.02, f"the screenshot is nearly blank ({inked:.3%} inked): {shot}"
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::97]}) > 20


def test_clray_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clray.jobs.cli import main

    run_dir = write_run_dir(tmp_path / "demo")
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_dir / 'report.html'}"
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
