"""Local paths and s3:// URIs behind one small API, so every step reads and publishes the same way.

S3 goes through boto3 with our own exponential-backoff retries (botocore's are switched off so the
attempt count is predictable), the endpoint from `FUSEDIT_S3_ENDPOINT` / `AWS_ENDPOINT_URL` or
`configure()`, and credentials only from the environment or the standard AWS chain (never logged).
Writes are atomic: a temp name then a rename locally; a single PUT on S3 (objects appear whole).
`publish()` uploads data first and the manifest last, so a manifest means a complete output.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from fusedit.components.shared.patterns import expand_braces
from fusedit.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(UserError):
    """A path or object that cannot be read or written; the message names the URI."""


NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # disk full, file-size limit, quota


def no_space(exc: BaseException) -> bool:
    """Whether an OSError means the disk (or a size limit or quota) is full: the user can fix that."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


@dataclass
class S3Options:
    endpoint_url: str | None = None
    retries: int = 4  # attempts after the first
    backoff_s: float = 0.5  # first wait; doubles each attempt
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


_options = S3Options()
_clients: dict[tuple, Any] = {}


def configure(**kwargs: Any) -> S3Options:
    """Set S3 options for this process (worker processes call it with the same values)."""
    global _options
    _options = S3Options(**{**_options.__dict__, **{k: v for k, v in kwargs.items() if v is not None}})
    _clients.clear()
    return _options


def options() -> S3Options:
    return _options


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: not an s3://bucket/key URI")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


# ---------------------------------------------------------------- S3 client and retries

def _client():
    endpoint = (_options.endpoint_url or os.environ.get("FUSEDIT_S3_ENDPOINT")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    ck = (endpoint, os.getpid())
    if ck not in _clients:
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"total_max_attempts": 1}, connect_timeout=_options.connect_timeout_s,
                     read_timeout=_options.read_timeout_s, signature_version="s3v4")
        _clients[ck] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)
    return _clients[ck]


_RETRY_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def _unwrap(exc: BaseException) -> BaseException:
    """The botocore error inside boto3's S3UploadFailedError (which hides a 500 or a dropped connection)."""
    from boto3.exceptions import S3UploadFailedError

    while isinstance(exc, S3UploadFailedError) and (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _classify(exc: BaseException) -> str:
    """'retry', 'missing', 'auth' or 'fatal' for an exception raised by boto3/botocore/urllib3."""
    from botocore import exceptions as bx

    exc = _unwrap(exc)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return "auth"
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _MISSING_CODES or status == "404":
            return "missing"
        if code in _RETRY_CODES or status in _RETRY_CODES:
            return "retry"
        return "auth" if status in ("401", "403") else "fatal"
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionError | bx.ReadTimeoutError
                  | bx.ConnectTimeoutError | bx.ResponseStreamingError | bx.IncompleteReadError
                  | bx.HTTPClientError | ConnectionError | TimeoutError):  # HTTPClientError: a dropped connection
        return "retry"
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error

        if isinstance(exc, Urllib3Error):
            return "retry"
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        pass
    return "fatal"


def _with_retries(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run fn, retrying transient S3 errors with exponential backoff; one StorageError at the end."""
    attempts = _options.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = _classify(exc)
            if kind == "missing":
                raise StorageError(f"{uri}: not found ({what})") from exc
            if kind == "auth":
                raise StorageError(f"{uri}: access denied or no AWS credentials in the environment / "
                                   f"standard chain ({type(exc).__name__})") from exc
            if kind == "fatal" or attempt == attempts:
                inner = _unwrap(exc)
                raise StorageError(f"{uri}: {what} failed after {attempt} attempt(s): "
                                   f"{type(inner).__name__}: {inner}") from exc
            wait = min(_options.max_backoff_s, _options.backoff_s * 2 ** (attempt - 1))
            wait *= 0.8 + 0.4 * random.random()
            log.warning("%s: %s attempt %d/%d failed (%s); retrying in %.2fs",
                        uri, what, attempt, attempts, type(exc).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class _S3Reader(io.RawIOBase):
    """A streaming GetObject body that resumes with a Range request after a broken connection."""

    def __init__(self, uri: str):
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self._body = None
        self._open()

    def _open(self) -> None:
        def get():  # a resumed read insists on the same object version (412 -> an error, not mixed bytes)
            extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
            if self.pos and self.etag:
                extra["IfMatch"] = self.etag
            return _client().get_object(Bucket=self.bucket, Key=self.key, **extra)

        resp = _with_retries(self.uri, "read", get)
        if self.size is None:
            self.size, self.etag = resp.get("ContentLength"), resp.get("ETag")
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        for attempt in range(_options.retries + 1):
            try:
                data = self._body.read(len(buf))
                break
            except Exception as exc:  # noqa: BLE001
                if _classify(exc) != "retry" or attempt == _options.retries:
                    raise StorageError(f"{self.uri}: read failed at byte {self.pos}: {exc}") from exc
                log.warning("%s: stream broke at byte %d (%s); resuming", self.uri, self.pos,
                            type(exc).__name__)
                time.sleep(min(_options.max_backoff_s, _options.backoff_s * 2 ** attempt))
                self._open()
        n = len(data)
        buf[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()


# ---------------------------------------------------------------- public API

def open_read(uri: str, buffer_size: int = 1 << 20) -> BinaryIO:
    """A streaming binary reader; raises StorageError naming the URI if it is missing or unreachable."""
    if is_s3(uri):
        return io.BufferedReader(_S3Reader(uri), buffer_size)  # type: ignore[return-value]
    try:
        return open(uri, "rb", buffering=buffer_size)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: not found") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri}: is a directory, expected a file") from exc


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def stat(uri: str) -> dict[str, Any]:
    """Size and a content version (the object's ETag; a local file's sha256) that tell whether an input
    changed. Content, not mtime: a rewrite with the same bytes (a forced `dvc repro` upstream) is the
    same input, so manifests that record it stay byte-identical."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head = _with_retries(uri, "stat", lambda: _client().head_object(Bucket=bucket, Key=key))
        return {"size": head["ContentLength"], "version": head.get("ETag", "")}
    digest = hashlib.sha256()
    try:
        with open(uri, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: not found") from exc
    return {"size": os.path.getsize(uri), "version": f"sha256:{digest.hexdigest()}"}


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    try:
        stat(uri)
        return True
    except StorageError as exc:
        if isinstance(exc.__cause__, Exception) and _classify(exc.__cause__) == "missing":
            return False
        raise


def list_uris(prefix: str) -> list[str]:
    """Every file under a directory or S3 prefix, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)

        def page_all():
            out = []
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
            return out

        return sorted(_with_retries(prefix, "list", page_all))
    out = []
    for root, _dirs, files in os.walk(prefix):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


@contextlib.contextmanager
def atomic_write(uri: str) -> Iterator[BinaryIO]:
    """Write to a temp file; on success it becomes `uri` in one step (rename, or one S3 PUT)."""
    if is_s3(uri):
        with tempfile.NamedTemporaryFile(prefix="fusedit-", suffix=".part") as tmp:
            yield tmp  # type: ignore[misc]
            tmp.flush()
            upload_file(tmp.name, uri)
        return
    parent = os.path.dirname(os.path.abspath(uri))
    os.makedirs(parent, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(uri)}.", suffix=".part", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 would make published files private
    try:
        with os.fdopen(fd, "wb") as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, uri)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        if no_space(exc):
            raise StorageError(f"{uri}: no space left to write it ({exc.strerror}); nothing was replaced") from None
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri) as f:
        f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def upload_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` (atomic on both backends)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _with_retries(uri, "upload", lambda: _client().upload_file(local_path, bucket, key))
        return
    with open(local_path, "rb") as src, atomic_write(uri) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def remove(uri: str) -> None:
    """Delete a file/object or a whole local directory; missing is fine."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _with_retries(uri, "delete", lambda: _client().delete_object(Bucket=bucket, Key=key))
    elif os.path.isdir(uri):
        shutil.rmtree(uri, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uri)


def publish(local_dir: str, dest: str, manifest_name: str = "manifest.json",
            manifest: dict[str, Any] | None = None, last: tuple[str, ...] = ()) -> None:
    """Publish a finished local directory to a local or S3 destination: data first, manifest last.

    Locally each file is renamed into place; the manifest (if given) is written after everything else,
    so readers that wait for it never see a half-published output. `last` names files (relative
    paths) that readers take as the sign of a whole output; they go after the other data files.
    """
    files = [p for p in list_uris(local_dir) if os.path.basename(p) != manifest_name]
    files.sort(key=lambda p: os.path.relpath(p, local_dir).replace(os.sep, "/") in last)
    for path in files:
        rel = os.path.relpath(path, local_dir)
        target = join(dest, *rel.split(os.sep))
        if is_s3(dest):
            upload_file(path, target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
    if manifest is not None:
        write_json(join(dest, manifest_name), manifest)


# ---------------------------------------------------------------- patterns (braces: patterns.py)

def expand(pattern: str, suffix: str = ".tar") -> list[str]:
    """Input URIs for a pattern: braces, globs (`*`, `?`), a directory or S3 prefix ending in '/'.

    Several patterns may be given separated by whitespace. Directories and prefixes yield the
    files ending in `suffix`. Order is kept as written (ranges ascending), duplicates removed.
    """
    out: list[str] = []
    for part in pattern.split():
        for item in expand_braces(part):
            if any(c in item for c in "*?["):
                base = item[: min(item.index(c) for c in "*?[" if c in item)]
                base = base[: base.rfind("/") + 1]
                found = (list_uris(base) if is_s3(item) else sorted(glob.glob(item)))
                out += [u for u in found if fnmatch.fnmatchcase(u, item)]
            elif (is_s3(item) and item.endswith("/")) or (not is_s3(item) and os.path.isdir(item)):
                out += [u for u in list_uris(item) if u.endswith(suffix)
                        and "/." not in u[len(item.rstrip('/')):]]
            else:
                out.append(item)
    seen: set[str] = set()
    return [u for u in out if not (u in seen or seen.add(u))]
