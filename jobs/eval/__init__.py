"""``clray eval``: a model's evaluation figures on a split, as a run's evaluations report them."""

from clray.jobs.eval.command import EVAL_FILE, EvalError, EvalSummary, checkpoint_export, run_eval

__all__ = ["EVAL_FILE", "EvalError", "EvalSummary", "checkpoint_export", "run_eval"]
