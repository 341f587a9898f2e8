"""A config that cannot run, and pydantic's errors as the lines users read."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(Exception):
    """A config that cannot run; ``problems`` holds one line per offending key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


_TOWER_TAGS = {"text", "conv", "vit"}


def format_pydantic(err: ValidationError) -> list[str]:
    """One line per pydantic error: the dotted key as the user writes it, then the fix."""
    problems = []
    for item in err.errors():
        # pydantic puts the union's discriminator tag (text/conv/vit) into the location;
        # users never write it, so drop it from the key we show.
        parts = [str(p) for p in item["loc"]]
        loc = ".".join(p for i, p in enumerate(parts) if not (i and p in _TOWER_TAGS))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key: remove it or check its spelling against `clray config show`"
        elif item["type"] == "missing":
            msg = "required key is missing: add it"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append(f"{loc or '(top level)'}: {msg}")
    return problems
