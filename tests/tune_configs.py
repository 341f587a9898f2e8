"""Search configs the tune tests share: a search over the quickstart corpus (ASHA, PBT)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPERATURE = "model.logit_scale.init_temperature"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _search_toml(corpus: Path, out: Path, search: str, extra: str = "", steps: int = 24) -> str:
    base = os.path.relpath(REPO / "configs" / "quickstart.toml", out)
    return f"""
[search]
base = "{base}"
{search}

[run]
name = "search"
output_dir = "{out / 'runs'}"

[data]
train = "{corpus / 'train'}"
eval = "{corpus / 'eval'}"

[model.logit_scale]
mode = "fixed"

[train]
global_batch_size = 64
max_steps = {steps}
epochs = 2
eval_every = 8
checkpoint_every = 8
log_every = 4
{extra}
"""


GOOD = f"""
metric = "eval/zero_shot_accuracy"
mode = "max"
max_concurrent = 2
scheduler = "asha"
algorithm = "grid"
[search.space]
"{TEMPERATURE}" = {{ grid = [1.0, 3.0, 0.05, 0.1] }}
[search.resources]
num_workers = 1
[search.asha]
grace_period = 8
"""


PBT = f"""
metric = "eval/zero_shot_accuracy"
mode = "max"
num_trials = 2
max_concurrent = 2
scheduler = "pbt"
seed = 0
[search.space]
"{TEMPERATURE}" = {{ loguniform = [0.05, 1.0] }}
"optim.lr" = {{ loguniform = [5e-4, 5e-3] }}
[search.resources]
num_workers = 1
[search.pbt]
perturbation_interval = 8
synch = true
"""
