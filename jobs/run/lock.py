"""One start of a run at a time: a lock file in the run directory, local or on S3.

Two starts with the same name would train into one directory: their events interleave
in ``metrics.jsonl``, their checkpoints and exports overwrite each other and one of them
fails later on a path the other removed. So a start takes ``run.lock`` first (created
only if absent: ``O_EXCL`` locally, a conditional PUT on S3) naming its holder (host,
pid, command, start time) and refreshes it every ``HEARTBEAT_S`` while it runs; a second
start is refused with the holder's name. A lock whose holder is gone (a killed driver:
same host and no such process, or no refresh for ``STALE_S``) is taken over with a
warning.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clray.jobs.run.errors import RunLockedError
from clray.pipelines import storage
from clray.pipelines.storage import StorageConfig

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
"""A lock not refreshed for this long is stale, whoever holds it (another host's driver
cannot be asked whether it lives)."""


@dataclass
class Holder:
    host: str
    pid: int
    command: str
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(host=socket.gethostname(), pid=os.getpid(), command=" ".join(sys.argv)[:300],
                   started=now, heartbeat=now)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} (`{self.command}`, started {started})"

    def stale_because(self, now: float | None = None) -> str | None:
        """Why this holder is gone, or None when it may still run."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not _alive(self.pid):
            return f"process {self.pid} no longer exists on {self.host}"
        if now - self.heartbeat > STALE_S:
            return f"its holder has not refreshed it for {now - self.heartbeat:.0f} s"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run directory; ``acquire`` then ``release`` (or use ``with``)."""

    def __init__(self, run_uri: str, cfg: StorageConfig | None = None) -> None:
        self.uri = storage.join(run_uri, LOCK)
        self.storage = cfg
        self.holder = Holder.me()
        self.warning: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the file itself

    def _create(self, holder: Holder) -> bool:
        """Create the lock file if there is none; True when this call created it."""
        data = json.dumps(asdict(holder)).encode()
        if not storage.is_s3(self.uri):
            path = Path(self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        return _put_if_absent(self.uri, data, self.storage)

    def _read(self) -> Holder | None:
        try:
            raw = json.loads(storage.read_bytes(self.uri, self.storage))
            return Holder(**raw)
        except Exception:  # noqa: BLE001 - missing or unreadable: treat as no valid holder
            return None

    # ------------------------------------------------------------------ protocol

    def acquire(self) -> RunLock:
        for _ in range(3):
            if self._create(self.holder):
                self._start_heartbeat()
                return self
            current = self._read()
            if current is None:
                why = "it is unreadable"
            else:
                why = current.stale_because()
                if why is None:
                    raise RunLockedError(
                        f"run directory {self.uri.rsplit('/', 1)[0]} is in use by {current.describe()}: two starts of "
                        "one run would overwrite each other's checkpoints and metrics. Wait for it to end, stop it, "
                        f"or use another run.name. (A lock left by a crashed start is taken over once {STALE_S:.0f} s "
                        f"old; to take it over now, delete {self.uri}.)")
            self.warning = f"took over the lock {self.uri} left by an earlier start ({why})"
            storage.delete(self.uri, self.storage)
        raise RunLockedError(f"could not take the lock {self.uri}: another start keeps taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and (current.host, current.pid, current.started) == (
                self.holder.host, self.holder.pid, self.holder.started):
            storage.delete(self.uri, self.storage)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self.holder.heartbeat = time.time()
                try:
                    storage.write_bytes(self.uri, json.dumps(asdict(self.holder)).encode(), self.storage)
                except Exception:  # noqa: BLE001 - a missed refresh only ages the lock
                    pass

        self._thread = threading.Thread(target=beat, name="clray-run-lock", daemon=True)
        self._thread.start()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _put_if_absent(uri: str, data: bytes, cfg: StorageConfig | None) -> bool:
    """An S3 PUT that succeeds only when the key does not exist (If-None-Match: *)."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    endpoint = (cfg.endpoint_url if cfg else None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    region = (cfg.region if cfg else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region or ("us-east-1" if endpoint else None))
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise storage.storage_error(uri, "writing the run lock", exc) from None
    return True
