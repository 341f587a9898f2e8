"""Shared fixtures. Ray is started at most once per test session, and only by tests
that ask for ``ray_session``; unit tests never start it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray for the whole session (starting one costs seconds on a laptop)."""
    import ray

    from pipelines import quiet_ray_data

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    yield
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs Ray is an integration test (`-m "not integration"` skips them)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
