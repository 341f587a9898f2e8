"""``clray mine``: load a mining config, start Ray, run the mining job
(``pipelines.mining.job``) and say what failed in the user's terms."""

from clray.jobs.mine.command import load_mine_config, run_mining, validate_mine_config

__all__ = ["load_mine_config", "run_mining", "validate_mine_config"]
