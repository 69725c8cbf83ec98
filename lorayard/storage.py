"""Where the adapters volume lives: the storage primitives :mod:`lorayard.volume` is written against.

The volume's layout (versions, manifests, LATEST, history, routing) is defined once, in
:mod:`lorayard.volume`, over keys such as ``support/v3/manifest.json``. This module supplies the few
operations that layout needs, with two implementations:

* :class:`LocalStorage`: a folder (a local disk or a ReadWriteMany volume). A version is assembled in
  ``<root>/.staging`` and made visible by one ``rename``; small files are replaced by ``os.replace``.
* :class:`lorayard.s3_storage.S3Storage`: an S3-compatible bucket (``s3://bucket/prefix``). S3 has no
  rename, so a version is claimed by a conditional put, its files are uploaded, and its manifest,
  uploaded last, is the commit point (see that module). It builds on this module, never the other
  way round; :func:`lorayard.volume.open_storage` picks one of the two for a location.

Both read a version into a *local* folder the loaders can open: the volume itself, or a verified
download in a bounded cache.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock

S3_SCHEME = "s3://"
STAGING_DIR = ".staging"
"""Work in progress on a local volume; never read by the server."""


class VolumeError(Exception):
    """Base of every adapters-volume error."""


class IntegrityError(VolumeError):
    """A version's files do not match what its manifest lists (sha256 and size)."""


class StorageUnavailable(VolumeError):
    """The storage cannot be reached or refused us (network, credentials, missing bucket)."""


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


def digest_file(path: Path) -> FileDigest:
    """sha256 and size of one file, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return FileDigest(sha.hexdigest(), size)


def verify_folder(folder: Path, expected: dict[str, FileDigest], label: str) -> None:
    """Raise IntegrityError unless every listed file is in ``folder`` with its size and sha256."""
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{label}: {name} is listed in the manifest but missing")
        got = digest_file(path)
        if got.size != want.size:
            raise IntegrityError(f"{label}: {name} has {got.size} bytes, the manifest says {want.size}")
        if got.sha256 != want.sha256:
            raise IntegrityError(f"{label}: {name} does not match the sha256 in its manifest")


def _text_tag(text: str) -> str:
    """A folder's stand-in for an ETag: the sha256 of the text."""
    return hashlib.sha256(text.encode()).hexdigest()


ListedFiles = Callable[[], dict[str, FileDigest | None]]
"""A version's files and their digests, read only when a download needs them (None: not checked)."""


class Storage(Protocol):
    """The operations the volume layout needs; keys are ``/``-separated paths under the root."""

    location: str
    """Where it is, for messages (never holds credentials)."""

    @property
    def local_root(self) -> Path | None:
        """The root folder when the storage is a local folder, else None."""
        ...

    cheap_reads: bool
    """Reading a small file costs a local file read (so LATEST may be read per request)."""

    def read_text(self, key: str) -> str | None:
        """The file's text, or None when it does not exist."""

    def write_text(self, key: str, text: str) -> None:
        """Replace the file as a whole: a reader sees the old text or the new, never a mix."""

    def read_tagged(self, key: str) -> tuple[str | None, str | None]:
        """The file's text and a tag that changes whenever the text does; (None, None) when absent."""

    def write_text_if(self, key: str, text: str, tag: str | None) -> bool:
        """Replace the file only while it still has ``tag`` (None: only while absent); False otherwise.

        The compare and the write are one atomic step: of two writers holding the same tag, exactly one
        succeeds. This is how every lifecycle change is committed (see :mod:`lorayard.volume`).
        """

    def delete(self, key: str) -> None:
        """Remove a file; absent is fine."""

    def child_folders(self, prefix: str) -> list[str]:
        """Names of the folders directly under ``prefix`` ("" for the root)."""

    def committed_folders(self, prefix: str, commit_file: str) -> list[str]:
        """Names of the folders under ``prefix`` that are complete (hold ``commit_file``)."""

    def has_file(self, key: str) -> bool: ...

    def staging(self, name: str) -> AbstractContextManager[Path]:
        """A fresh local folder to assemble a version in; removed on exit unless committed."""

    def commit_folder(self, staged: Path, prefix: str, commit_file: str) -> bool:
        """Make ``staged`` visible as ``prefix``, ``commit_file`` last; False if ``prefix`` is taken."""

    def local_folder(self, prefix: str, files: ListedFiles | None, label: str) -> Path:
        """A local folder holding ``prefix``'s files; a download fetches ``files()`` and verifies them."""


class LocalStorage:
    """A folder on a filesystem with atomic rename (local disk, NFS, a ReadWriteMany claim)."""

    cheap_reads = True

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.local_root = self.root
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_text(self, key: str) -> str | None:
        try:
            return self._path(key).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_text(self, key: str, text: str) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_tagged(self, key: str) -> tuple[str | None, str | None]:
        text = self.read_text(key)
        return text, None if text is None else _text_tag(text)

    def write_text_if(self, key: str, text: str, tag: str | None) -> bool:
        path = self._path(key)
        # The lock file sits beside the file; a dot name, so listings skip it. Its name is the one
        # earlier versions locked their history appends with, so they serialize with us. The OS drops
        # the lock of a killed process; the write itself is a rename, so a kill leaves old or new.
        with FileLock(str(path.with_name(f".{path.name}.lock"))):
            _, current = self.read_tagged(key)
            if current != tag:
                return False
            self.write_text(key, text)
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child_folders(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(child.name for child in folder.iterdir() if child.is_dir())

    def committed_folders(self, prefix: str, commit_file: str) -> list[str]:
        # A rename publishes a complete folder, so on a local volume every folder is committed.
        return self.child_folders(prefix)

    def has_file(self, key: str) -> bool:
        return self._path(key).is_file()

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        # On the volume itself, so the rename that publishes never crosses filesystems.
        folder = self.root / STAGING_DIR / f"{name}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit_folder(self, staged: Path, prefix: str, commit_file: str) -> bool:
        target = self._path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        for file in staged.iterdir():
            if file.is_file():
                with file.open("rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False  # another publisher took this number
            raise
        return True

    def local_folder(self, prefix: str, files: ListedFiles | None, label: str) -> Path:
        # Verified when loaded (the registry), after the format checks name a clearer problem.
        return self._path(prefix)


def is_object_store(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def location_value(value: object) -> object:
    """A settings field's raw adapters location: an ``s3://`` URL stays a string (a Path would fold its
    ``//``); any other string is a folder."""
    if isinstance(value, str) and not is_object_store(value):
        return Path(value)
    return value
