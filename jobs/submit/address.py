"""Where the Jobs API is and how to talk to it safely: parsing ``--address``/RAY_ADDRESS,
finding the recorded local head, the warning for plain HTTP to another machine, and the
headers that carry a token.

Ray's dashboard, which serves the Jobs API, accepts any request unless the cluster enables
token authentication, and whoever can submit a job runs code on every node. clray has no
default address, and warns before it submits to a plain ``http://`` address that is not
loopback."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from clray.jobs.submit.errors import SubmitError
from clray.jobs.submit.head import local_head_path, read_local_head


def parse_address(address: str, source: str = "--address") -> str:
    """The Jobs API base URL (``http(s)://HOST:PORT``), or SubmitError naming the fix.

    The Jobs API is the dashboard's HTTP port (8265 by default), not the GCS port
    (6379) that ``RAY_ADDRESS=HOST:6379`` or ``ray://`` addresses name."""
    text = address.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(
            f"{source} = {address!r} is not a Jobs API address: give the head's dashboard "
            "URL, e.g. http://HEAD:8265 (not a ray:// or GCS HOST:6379 address)"
        )
    try:
        parts.port  # noqa: B018  (raises on a non-numeric port)
    except ValueError:
        raise SubmitError(f"{source} = {address!r}: the port is not a number, e.g. http://HEAD:8265") from None
    if parts.path not in ("", "/") or parts.query:
        raise SubmitError(f"{source} = {address!r}: give only scheme, host and port, e.g. http://HEAD:8265")
    return text


def is_loopback(address: str) -> bool:
    """The address names this machine (localhost or a loopback IP): no network crossed."""
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warning(address: str) -> str | None:
    """The warning for a plain-HTTP Jobs API on another machine, else None."""
    if urlsplit(address).scheme != "http" or is_loopback(address):
        return None
    return (
        f"{address} is plain HTTP on another machine. Ray's dashboard (the Jobs API) has no "
        "authentication unless the cluster enables it (token authentication), and a submitted "
        "job runs code on every node, so anyone who can reach this port controls the cluster; "
        "requests and tokens also cross the network unencrypted. Safer: reach the dashboard "
        "through an SSH tunnel (`ray dashboard cluster/aws.yaml`, then --address "
        "http://127.0.0.1:8265) or `kubectl port-forward`. If the cluster runs token "
        "authentication (RAY_AUTH_MODE=token), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
        "here as well; if it sits behind a TLS proxy, use its https:// address and "
        "--token-env NAME to send the proxy's bearer token from the variable NAME."
    )


def resolve_jobs_address(explicit: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The Jobs API address for ``clray jobs``/``clray submit`` and where it came from:
    --address, else RAY_ADDRESS when it is an http(s) URL, else the local head that
    ``clray submit`` recorded. Raises SubmitError when there is none."""
    environ = os.environ if environ is None else environ
    if explicit:
        return parse_address(explicit), "--address"
    env_address = environ.get("RAY_ADDRESS", "")
    if env_address.startswith(("http://", "https://")):
        return parse_address(env_address, "RAY_ADDRESS"), "RAY_ADDRESS"
    head = read_local_head(environ)
    if head is not None and head.alive():
        return head.address, f"the local head in {local_head_path(environ)}"
    raise SubmitError(
        "no Jobs API address: pass --address http://HEAD:8265 or set RAY_ADDRESS=http://HEAD:8265 "
        "(a local head started by `clray submit` without --address is found automatically "
        "while it runs)"
    )


def auth_headers(address: str, token_env: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """HTTP headers for the Jobs API.

    ``--token-env NAME`` sends the value of NAME as a bearer token (a TLS proxy's or the
    cluster's Ray token). On loopback the local Ray token (``~/.ray/auth_token``,
    RAY_AUTH_TOKEN), which Ray 2.60's heads on this machine require once it exists, is
    sent as well; it never leaves the machine. To a remote address Ray's own client
    sends its token only when RAY_AUTH_MODE=token is set, as Ray documents."""
    environ = os.environ if environ is None else environ
    if token_env:
        if not environ.get(token_env):
            raise SubmitError(f"--token-env {token_env}: the variable {token_env} is not set (or empty) here")
        return {"Authorization": f"Bearer {environ[token_env]}"}
    if is_loopback(address):
        try:
            from ray._raylet import AuthenticationTokenLoader

            loader = AuthenticationTokenLoader.instance()
            if loader.has_token(ignore_auth_mode=True):
                return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}
        except Exception:  # an older Ray without token auth: nothing to send
            return {}
    return {}

