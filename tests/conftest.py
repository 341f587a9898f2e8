"""Shared fixtures. Ray is started at most once per test session, and only by tests
that ask for ``ray_session``; unit tests never start it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

OWN_RAY = "test_benchmark_on_ray_runs_tiny"
"""Tests that run a command starting a local Ray of its own; see pytest_collection_modifyitems."""

FAKE_AWS_ACCESS_KEY_ID = "clray-test-access-key"
FAKE_AWS_SECRET_ACCESS_KEY = "clray-test-secret-key"
"""Credentials of the tests' own S3 (moto on loopback): distinctive, so a test can prove
they were never written anywhere."""


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[None]:
    """Fake AWS credentials for the test session, and none of the user's own.

    Ray worker processes inherit the environment of the process that starts Ray, and
    clray's S3 access takes credentials from that environment (never from configs), so
    these must be set before ``ray_session`` starts Ray. The user's AWS profile, config
    files and instance metadata are hidden so no test can reach a real account; all of it
    is undone when the session ends."""
    patch = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        patch.delenv(name, raising=False)
    patch.setenv("AWS_ACCESS_KEY_ID", FAKE_AWS_ACCESS_KEY_ID)
    patch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_AWS_SECRET_ACCESS_KEY)
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    patch.setenv("AWS_CONFIG_FILE", os.devnull)
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def ray_session(aws_test_env: None) -> Iterator[None]:
    """A local Ray for the whole session (starting one costs seconds on a laptop); its
    workers see the session's fake AWS credentials (``aws_test_env``)."""
    import ray

    from clray.jobs.runtime import start_ray
    from clray.pipelines import quiet_ray_data

    # With its dashboard, as `clray tune` starts Ray: it serves the state API, which Ray
    # Train's placement-group cleaner needs to free the resources of trials that Tune
    # kills (tests/test_tune.py).
    start_ray(4, {}, dashboard=True)
    quiet_ray_data()
    yield
    ray.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs Ray is an integration test (`-m "not integration"` skips them).
    The benchmarks that start a Ray of their own run first, while ``ray_session``'s Ray
    does not exist yet (tests/test_benchmarks.py)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.name.startswith(OWN_RAY):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: not item.name.startswith(OWN_RAY))  # stable: the rest keep their order
