"""The exception types of the data side: data that cannot be trained on, and a mining
job that cannot go on."""

from __future__ import annotations


class DataError(Exception):
    """Shards or rows that cannot feed a run; ``problems`` holds one line per problem.

    Like the config loader, the data checks collect every problem before raising, so a
    user fixes a broken corpus in one round trip instead of one error at a time.
    """

    MAX_SHOWN = 20

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            shown = self.problems[: self.MAX_SHOWN]
            lines = "\n".join(f"  - {p}" for p in shown)
            more = len(self.problems) - len(shown)
            tail = f"\n  ... and {more} more" if more else ""
            message = f"{len(self.problems)} problem(s) in the data:\n{lines}{tail}"
        super().__init__(message)


class MineError(Exception):
    """A mining job that cannot go on (a different plan in the way, a failed stage); the
    message is meant for the user as-is."""
