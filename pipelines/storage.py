"""Where paths go: local directories or ``s3://bucket/prefix`` URIs, through one API.

Corpora, quarantine files, mined plans and run directories may all live on S3 (or an
S3-compatible store). Every module that reads or writes them asks this one for a
``pyarrow.fs.FileSystem`` and a path, so there is one place that knows how to reach a
bucket and one place that turns the store's errors into messages naming the URI, what
failed and what to do about it.

Credentials are never part of a clray config: ``StorageConfig`` holds only the endpoint
and region. Keys come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with
``~/.aws/credentials`` and ``~/.aws/config``, instance or pod roles), resolved by the
AWS SDK inside pyarrow on each process that touches S3. So a config dump, a log line or
a pickled filesystem sent to a Ray task never carries a secret: pyarrow pickles an
``S3FileSystem`` with its keys only when they were passed explicitly, which clray never
does.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import field_validator

from clray.models.config import Strict
from clray.pipelines.errors import DataError

SCHEME = "s3://"
_GLOB_CHARS = set("*?[")


class StorageConfig(Strict):
    """How to reach object storage for every ``s3://`` URI in the config. No secrets here:
    credentials come from the standard AWS environment and config files."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. "http://127.0.0.1:9000" (MinIO, Ceph, moto); unset:
    AWS itself (or AWS_ENDPOINT_URL from the environment)."""
    region: str | None = None
    """Bucket region; unset: AWS_REGION / AWS_DEFAULT_REGION / the AWS config file, else
    us-east-1."""

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"endpoint_url = {value!r} is not an http(s) URL: write it like \"http://127.0.0.1:9000\""
            )
        if parsed.username or parsed.password:
            raise ValueError(
                "endpoint_url must not carry credentials: remove them from the URL and use the AWS "
                "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            )
        return value.rstrip("/")


def is_s3(path: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs; local paths (and ``file://``) are False."""
    return str(path).startswith(SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    bucket, _, key = uri[len(SCHEME):].partition("/")
    return bucket, key.strip("/")


def local_path(path: str | os.PathLike[str]) -> Path:
    """A local path as clray has always taken it: ``file://`` dropped, ``~`` expanded, absolute."""
    return Path(os.path.expanduser(str(path).removeprefix("file://"))).absolute()


def normalize(path: str | os.PathLike[str]) -> str:
    """The canonical text of a location: ``s3://bucket/key`` (no trailing slash) or an
    absolute local path."""
    text = str(path)
    if is_s3(text):
        bucket, key = split_s3(text)
        return f"{SCHEME}{bucket}/{key}" if key else f"{SCHEME}{bucket}"
    return str(local_path(text))


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for either kind of location (``Path`` would turn ``s3://`` into ``s3:/``)."""
    if is_s3(base):
        return "/".join([normalize(base), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        # Fail in seconds, not minutes, when the endpoint is wrong or down.
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
        # S3-compatible stores rarely support virtual-host bucket addressing.
        kwargs["force_virtual_addressing"] = False
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint_url:
        # Without a region pyarrow asks AWS where the bucket lives; a custom endpoint has
        # no such lookup, and any region signs correctly for it.
        kwargs["region"] = "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem(storage: StorageConfig | None = None) -> pafs.S3FileSystem:
    """The (cached) S3 filesystem for ``storage``; credentials from the AWS chain."""
    storage = storage or StorageConfig()
    return _s3_filesystem(storage.endpoint_url, storage.region)


def filesystem(path: str | os.PathLike[str], storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or an ``s3://`` URI; the path is
    what pyarrow and Ray Data take together with the filesystem (``bucket/key`` on S3)."""
    text = str(path)
    if is_s3(text):
        bucket, key = split_s3(text)
        return s3_filesystem(storage), f"{bucket}/{key}" if key else bucket
    return pafs.LocalFileSystem(), str(local_path(text))


def filesystem_for(paths: list[str], storage: StorageConfig | None = None) -> tuple[pafs.FileSystem | None, list[str]]:
    """One filesystem for a list of files that ``resolve_shards`` returned (all local or
    all on S3), and the paths to give it. Local lists keep ``filesystem=None`` so Ray
    Data reads them exactly as before."""
    if not paths or not any(is_s3(p) for p in paths):
        return None, list(paths)
    if not all(is_s3(p) for p in paths):
        raise DataError(
            "the files mix local paths and s3:// URIs; Ray Data reads one filesystem per dataset: "
            "put all of a split's shards in one place"
        )
    fs = s3_filesystem(storage)
    return fs, [filesystem(p, storage)[1] for p in paths]


def to_uri(fs_path: str, like: str) -> str:
    """The inverse of ``filesystem``: a path inside the filesystem, written as ``like`` is
    (``s3://`` when ``like`` is on S3)."""
    return f"{SCHEME}{fs_path}" if is_s3(like) else fs_path


# ------------------------------------------------------------------------- error messages

_S3_FAILURES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", re.I),
     "no such bucket: create the bucket or fix its name in the URI"),
    (re.compile(r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|"
                r"ExpiredToken|InvalidToken", re.I),
     "the store rejected the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
     "in the environment of every Ray node"),
    (re.compile(r"ACCESS_DENIED|AccessDenied|Access Denied|HTTP response code: 403|\b403\b", re.I),
     "access denied: the credentials in use may not read/write here; grant s3:ListBucket, s3:GetObject, "
     "s3:PutObject and s3:DeleteObject on the prefix, or use other credentials"),
    (re.compile(r"NETWORK_CONNECTION|curlCode|Couldn't connect|Could not connect|Connection refused|"
                r"Failed to connect|Could not resolve host|Timeout was reached|EndpointConnectionError", re.I),
     "cannot reach the S3 endpoint: check storage.endpoint_url (or AWS_ENDPOINT_URL) and the network"),
    (re.compile(r"NoCredentialProviders|Unable to locate credentials|No credentials|"
                r"AWS Error UNKNOWN \(HTTP status 400\)", re.I),
     "no usable AWS credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"),
]


def explain(exc: BaseException) -> str:
    """What an S3 failure means and how to fix it, from pyarrow's or botocore's error."""
    text = str(exc)
    if type(exc).__name__ == "ClientError":  # botocore: the code is structured, use it
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        text = f"{code} {text}"
    for pattern, meaning in _S3_FAILURES:
        if pattern.search(text):
            return meaning
    if isinstance(exc, FileNotFoundError):
        return "no such file or prefix"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}"


def storage_error(uri: str, action: str, exc: BaseException, key: str | None = None) -> DataError:
    """A ``DataError`` naming the config key, the URI, what clray was doing and why it failed."""
    where = f"{key}: " if key else ""
    return DataError(f"{where}{action} {uri} failed: {explain(exc)}")


# --------------------------------------------------------------------------- file access


def file_type(path: str, storage: StorageConfig | None = None, key: str | None = None) -> pafs.FileType:
    """NotFound / File / Directory for a local path or URI. On S3 a "directory" is a
    prefix with objects under it; a missing bucket or a denied request is an error."""
    fs, inner = filesystem(path, storage)
    try:
        info = fs.get_file_info(inner)
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "looking up", exc, key) from None
    if info.type == pafs.FileType.NotFound and is_s3(path):
        require_bucket(path, storage, key)
    return info.type


def require_bucket(uri: str, storage: StorageConfig | None = None, key: str | None = None) -> None:
    """Raise a ``DataError`` naming ``uri`` when its bucket does not exist. S3 answers
    "not found" alike for a missing key and a key in a missing bucket; this tells them apart."""
    bucket = split_s3(uri)[0]
    fs = s3_filesystem(storage)
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(uri, "looking up", exc, key) from None
    if missing:
        raise DataError(f"{key + ': ' if key else ''}{uri}: no such bucket {bucket!r}: create it or fix the URI")


def exists(path: str, storage: StorageConfig | None = None) -> bool:
    return file_type(path, storage) != pafs.FileType.NotFound


def is_file(path: str, storage: StorageConfig | None = None) -> bool:
    return file_type(path, storage) == pafs.FileType.File


def is_dir(path: str, storage: StorageConfig | None = None) -> bool:
    return file_type(path, storage) == pafs.FileType.Directory


def list_files(path: str, storage: StorageConfig | None = None, key: str | None = None) -> list[str]:
    """Every file under a directory or prefix, recursively, as locations like ``path``."""
    fs, inner = filesystem(path, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "listing", exc, key) from None
    return sorted(to_uri(i.path, path) for i in infos if i.type == pafs.FileType.File)


def glob_s3(pattern: str, storage: StorageConfig | None = None, key: str | None = None) -> list[str]:
    """Files and prefixes matching an ``s3://`` glob (``*`` does not cross ``/``, ``**``
    does), listed under the longest prefix without glob characters."""
    bucket, key_pattern = split_s3(pattern)
    parts = key_pattern.split("/")
    fixed = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    base = f"{SCHEME}{bucket}/{'/'.join(fixed)}" if fixed else f"{SCHEME}{bucket}"
    fs, inner = filesystem(base, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(pattern, "listing", exc, key) from None
    regex = _glob_regex(f"{bucket}/{key_pattern}")
    return sorted(f"{SCHEME}{i.path}" for i in infos if regex.fullmatch(i.path))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    for i, part in enumerate(pattern.split("**")):
        out.append(fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z").replace(".*", "[^/]*"))
        if i < pattern.count("**"):
            out.append(".*")
    return re.compile("".join(out))


def read_bytes(path: str, storage: StorageConfig | None = None, key: str | None = None) -> bytes:
    fs, inner = filesystem(path, storage)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "reading", exc, key) from None


def write_bytes(path: str, data: bytes, storage: StorageConfig | None = None, key: str | None = None) -> None:
    """Write a whole file. An S3 PUT replaces the object atomically, so readers see the old
    object or the new one, like the local tmp-then-rename writes."""
    if not is_s3(path):
        target = local_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, inner = filesystem(path, storage)
    try:
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "writing", exc, key) from None


def read_json(path: str, storage: StorageConfig | None = None) -> Any:
    return json.loads(read_bytes(path, storage))


def write_json(path: str, data: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), storage)


def delete(path: str, storage: StorageConfig | None = None) -> None:
    """Remove a file or a whole directory/prefix; a missing one is fine."""
    fs, inner = filesystem(path, storage)
    try:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(inner)
        elif info.type == pafs.FileType.File:
            fs.delete_file(inner)
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "deleting", exc) from None


def upload(local: str | os.PathLike[str], uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local file to the object ``uri``, or a local directory's tree to the prefix
    ``uri`` (files named relative to it)."""
    fs, inner = filesystem(uri, storage)
    try:
        pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(uri, "uploading to", exc) from None


def list_dirs(path: str, storage: StorageConfig | None = None) -> list[str]:
    """The immediate subdirectories (prefixes) of ``path``, as locations like ``path``."""
    fs, inner = filesystem(path, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(path, "listing", exc) from None
    return sorted(to_uri(i.path, path) for i in infos if i.type == pafs.FileType.Directory)


def download_dir(uri: str, local: str | os.PathLike[str], storage: StorageConfig | None = None) -> None:
    """Copy everything under ``uri`` into the local directory ``local``."""
    fs, inner = filesystem(uri, storage)
    dest = Path(local)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(inner, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(uri, "downloading", exc) from None


def check_writable(uri: str, storage: StorageConfig | None, key: str) -> None:
    """Write and delete a small probe object under ``uri``, so a missing bucket, denied
    writes or a wrong endpoint fail before any work starts, naming ``key``."""
    probe = join(uri, ".clray-write-check")
    fs, inner = filesystem(probe, storage)
    try:
        with fs.open_output_stream(inner) as stream:
            stream.write(b"ok")
        fs.delete_file(inner)
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(uri, "writing to", exc, key) from None


def remove_local(path: str | os.PathLike[str]) -> None:
    shutil.rmtree(path, ignore_errors=True)
