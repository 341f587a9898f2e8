"""A job's output directory, local or on S3, written through one local directory.

Every job that writes a directory (a training run, a search, a mining job) writes its
files with plain local I/O. For a local destination that directory *is* the
destination. For an ``s3://`` destination it is a staging directory on this machine,
and ``publish`` uploads what is finished; nothing of the job lives only on the driver's
disk once it has published. Checking that the destination is writable first makes a
missing bucket, denied writes or a wrong endpoint fail before Ray starts, naming the
config key.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from clray.pipelines import storage
from clray.pipelines.storage import StorageConfig


def kept_staging_dir(uri: str, name: str) -> Path:
    """The staging directory a ``keep`` job uses for ``uri`` on this machine."""
    digest = hashlib.sha256(storage.normalize(uri).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"clray-{name}-{digest}"


class Staging:
    """Where a job's files go (``uri``) and where it writes them (``local``).

    ``name``: a short word for the job kind, used in the staging directory's name.
    ``keep``: the staging directory of an S3 destination is the same on every start on
    this machine (``$TMPDIR/clray-NAME-<hash of the URI>``) and is kept by ``close``, so a
    killed job that resumes from its own work files finds them again; without it each
    start stages into a new temporary directory that ``close`` removes.
    """

    def __init__(self, uri: str, cfg: StorageConfig | None, key: str, *, name: str, keep: bool = False) -> None:
        self.uri = storage.normalize(uri)
        self.storage = cfg
        self.remote = storage.is_s3(self.uri)
        self.keep = keep
        if not self.remote:
            self.local = Path(self.uri)
            self.local.mkdir(parents=True, exist_ok=True)
            return
        storage.check_writable(self.uri, cfg, key)
        if keep:
            self.local = kept_staging_dir(self.uri, name)
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.local = Path(tempfile.mkdtemp(prefix=f"clray-{name}-"))

    def path(self, name: str) -> str:
        """Where ``name`` (relative to the directory) ends up."""
        return storage.join(self.uri, name)

    def final(self, local_path: str | None) -> str | None:
        """A staged path as its final location (other paths, e.g. a plan's, unchanged)."""
        if not self.remote or local_path is None:
            return local_path
        try:
            relative = Path(local_path).relative_to(self.local)
        except ValueError:
            return local_path
        return self.path(str(relative))

    def pull(self, name: str) -> bool:
        """Copy an existing remote file into the staging directory (a file that later
        starts append to, like metrics.jsonl); True when there was one. No-op locally."""
        if not self.remote:
            return (self.local / name).exists()
        remote = self.path(name)
        if not storage.is_file(remote, self.storage):
            return False
        target = self.local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(remote, self.storage))
        return True

    def publish(self, *names: str, mirror: bool = False) -> None:
        """Upload the named staged files or directories, in the order given (so the file
        that marks a result complete can go last). ``mirror``: a name this start did not
        write is deleted remotely too, and a directory replaces the remote one, so the
        destination describes this start only. No-op locally."""
        if not self.remote:
            return
        for name in names:
            local = self.local / name
            if mirror:
                storage.delete(self.path(name), self.storage)
            if local.exists():
                storage.upload(local, self.path(name), self.storage)

    def close(self) -> None:
        """Remove a staging directory that is not kept."""
        if self.remote and not self.keep:
            shutil.rmtree(self.local, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging directory of an S3 destination, kept or not (its job is done)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
