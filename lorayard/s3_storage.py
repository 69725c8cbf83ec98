"""The adapters volume on an S3-compatible object store (AWS S3, MinIO, Ceph RGW, R2 ...), through boto3.

Credentials come from boto3's standard chain only (environment, shared profile, IRSA web identity,
instance metadata) and the endpoint from the standard ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``)
for stores other than AWS; nothing here reads, stores or logs a secret.

S3 has no rename, so publishing a version is three steps, each a single object write:

1. **claim** the number: ``<name>/v<N>/.publishing`` with ``If-None-Match: *``. Of two publishers of one
   name exactly one gets a number; the other sees 412 and tries ``N+1``.
2. **upload** the version's files.
3. **commit**: upload ``manifest.json`` (every file's sha256 and size) last. A version without its
   manifest does not exist for readers, so a publish interrupted anywhere before this is never
   served (its number stays claimed and is never reused).

Readers download a version into a local cache folder, verify every file against the manifest, and
only then rename it into place; the cache is bounded by bytes, least recently used versions first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorayard.storage import S3_SCHEME, ListedFiles, StorageUnavailable, VolumeError, verify_folder

if TYPE_CHECKING:
    from botocore.client import BaseClient as S3Client

CLAIM_FILE = ".publishing"
"""Written first, with If-None-Match: the publisher that creates it owns the version number."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lorayard/adapters``, else ``~/.cache/lorayard/adapters``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorayard" / "adapters"


DEFAULT_CACHE_BYTES = 4 << 30
_DOWNLOADING = ".downloading"
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class S3Storage:
    """``s3://bucket/prefix`` as the volume's storage (see the module docstring)."""

    cheap_reads = False
    local_root = None

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        cache_dir: Path | None = None,
        cache_max_bytes: int | None = None,
        client: S3Client | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"{S3_SCHEME}{bucket}/{self.prefix}"
        self.cache_dir = Path(cache_dir or default_cache_dir()) / bucket / self.prefix
        self.cache_max_bytes = DEFAULT_CACHE_BYTES if cache_max_bytes is None else cache_max_bytes
        self._client = client

    @classmethod
    def from_url(cls, url: str, *, cache_dir: Path | None, cache_max_bytes: int | None) -> S3Storage:
        bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
        if not bucket:
            raise VolumeError(f"{url!r}: expected s3://bucket or s3://bucket/prefix")
        return cls(bucket, prefix, cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)

    @property
    def client(self) -> S3Client:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # The standard chain and AWS_ENDPOINT_URL are boto3's own; only timeouts and retries here.
            config = Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 5, "mode": "standard"}
            )
            self._client = boto3.client("s3", config=config)
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + key

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """boto3's failures -> StorageUnavailable naming the location and the S3 error (never a secret)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            detail = f"{error.get('Code', '?')} {error.get('Message', '')}".rstrip()
            raise StorageUnavailable(f"{self.location}: {what} failed: {detail}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"{self.location}: {what} failed: {exc}") from exc

    @staticmethod
    def _code(exc: Exception) -> str:
        response: dict[str, Any] = getattr(exc, "response", {}) or {}
        return str(response.get("Error", {}).get("Code", ""))

    # -- small files -----------------------------------------------------------------------------
    def _get(self, key: str) -> tuple[str, str] | None:
        """(text, ETag), or None when the object does not exist."""
        from botocore.exceptions import ClientError

        with self._errors(f"reading {key}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if self._code(exc) in _MISSING:
                    return None
                raise
            return response["Body"].read().decode(), response["ETag"]

    def read_text(self, key: str) -> str | None:
        found = self._get(key)
        return None if found is None else found[0]

    def write_text(self, key: str, text: str) -> None:
        with self._errors(f"writing {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())

    def _put_if(self, key: str, body: bytes, *, etag: str | None) -> bool:
        """Create (etag None) or replace exactly ``etag``; False when another writer got there first."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        with self._errors(f"writing {key}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **condition)
            except ClientError as exc:
                code = self._code(exc)
                # If-Match on an object deleted meanwhile is a 404: it changed, like a 412.
                if code in _CONDITION_FAILED or (etag is not None and code in _MISSING):
                    return False
                raise
        return True

    def read_tagged(self, key: str) -> tuple[str | None, str | None]:
        found = self._get(key)
        return (None, None) if found is None else found

    def write_text_if(self, key: str, text: str, tag: str | None) -> bool:
        return self._put_if(key, text.encode(), etag=tag)

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def has_file(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"looking up {key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if self._code(exc) in _MISSING:
                    return False
                raise
        return True

    # -- listings ----------------------------------------------------------------------------------
    def _list(self, prefix: str, *, delimiter: bool) -> Iterator[dict[str, Any]]:
        full = self._key(f"{prefix}/" if prefix else "")
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            arguments["Delimiter"] = "/"
        with self._errors(f"listing {full or '/'}"):
            yield from self.client.get_paginator("list_objects_v2").paginate(**arguments)

    def child_folders(self, prefix: str) -> list[str]:
        cut = len(self._key(f"{prefix}/" if prefix else ""))
        names = [
            common["Prefix"][cut:].rstrip("/")
            for page in self._list(prefix, delimiter=True)
            for common in page.get("CommonPrefixes", [])
        ]
        return sorted(names)

    def committed_folders(self, prefix: str, commit_file: str) -> list[str]:
        cut = len(self._key(f"{prefix}/"))
        found = set()
        for page in self._list(prefix, delimiter=False):
            for item in page.get("Contents", []):
                folder, sep, file = item["Key"][cut:].partition("/")
                if sep and file == commit_file:
                    found.add(folder)
        return sorted(found)

    # -- publishing --------------------------------------------------------------------------------
    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix=f"lorayard-{name}-") as folder:
            yield Path(folder)

    def commit_folder(self, staged: Path, prefix: str, commit_file: str) -> bool:
        claim = json.dumps(
            {"at": datetime.now(UTC).isoformat(timespec="seconds"), "host": socket.gethostname()}
        )
        if not self._put_if(f"{prefix}/{CLAIM_FILE}", claim.encode(), etag=None):
            return False  # another publisher owns this number
        for file in sorted(staged.iterdir()):
            if file.is_file() and file.name != commit_file:
                with self._errors(f"uploading {prefix}/{file.name}"):
                    self.client.upload_file(str(file), self.bucket, self._key(f"{prefix}/{file.name}"))
        # The commit point. If-None-Match: even a publisher that lost its claim cannot replace it.
        if not self._put_if(f"{prefix}/{commit_file}", (staged / commit_file).read_bytes(), etag=None):
            raise VolumeError(f"{self.location}{prefix} was committed by another publisher despite our claim")
        return True

    # -- reading a version -------------------------------------------------------------------------
    def local_folder(self, prefix: str, files: ListedFiles | None, label: str) -> Path:
        target = self.cache_dir / prefix
        if target.is_dir():
            os.utime(target)  # recently used: evicted last
            return target
        if files is None:
            raise VolumeError(f"{label}: no file list to download it by")
        listed = files()
        work = self.cache_dir / _DOWNLOADING / uuid.uuid4().hex
        work.mkdir(parents=True)
        try:
            for name in listed:
                with self._errors(f"downloading {prefix}/{name}"):
                    self.client.download_file(self.bucket, self._key(f"{prefix}/{name}"), str(work / name))
            verify_folder(work, {n: d for n, d in listed.items() if d is not None}, label)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, target)
            except OSError:
                if not target.is_dir():  # a concurrent download of the same version won: use it
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Drop least recently used versions until the cache fits ``cache_max_bytes`` (never ``keep``)."""
        folders = [
            version
            for name in self.cache_dir.iterdir()
            if name.is_dir() and name.name != _DOWNLOADING
            for version in name.iterdir()
            if version.is_dir()
        ]
        sizes = {f: sum(p.stat().st_size for p in f.iterdir() if p.is_file()) for f in folders}
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda f: f.stat().st_mtime):
            if total <= self.cache_max_bytes:
                break
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
