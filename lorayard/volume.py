"""The adapters volume: layout, manifest, atomic publish, and resolving ``name`` / ``name@vN``.

Layout (the contract between the training job, the server and anyone browsing the volume)::

    <root>/
      <name>/
        v1/  v2/ ...          one immutable folder per published version
          adapter_config.json       PEFT's own format: plain PEFT and vLLM load it
          adapter_model.safetensors
          manifest.json             Manifest below
          eval.json  loss_curve.png (written by the training job)
        LATEST                text "v<N>": the version ``name`` means
      <plain>/                a plain PEFT folder (adapter_config.json + safetensors directly inside)
      .staging/               work in progress; never read by the server

A version becomes visible by one ``rename`` of a complete staged folder on the same filesystem, and
``LATEST`` is replaced by ``os.replace`` of a complete file, so a reader never sees a torn adapter.
Concurrent publishers of one name get distinct versions: ``rename`` onto an existing non-empty
folder fails, and the loser takes the next number.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LATEST_FILE = "LATEST"
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
STAGING_DIR = ".staging"
MANIFEST_FORMAT = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")


class VolumeError(Exception):
    """Base of every adapters-volume error."""


class InvalidAdapterName(VolumeError):
    """A name or reference that could escape the volume or is not ``name`` / ``name@vN``."""


class AdapterNotFound(VolumeError):
    """No adapter (or no such version of it) on the volume."""


class PublishError(VolumeError):
    """Publishing failed; nothing became visible."""


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="what the trainer was given (alias, folder or hub id)")
    sha256: str = Field(description="fingerprint of the base weights (lorayard.base_model)")


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str
    rows_train: int
    rows_validation: int


class Manifest(BaseModel):
    """``manifest.json`` of one published version."""

    model_config = ConfigDict(extra="allow")
    format: int = MANIFEST_FORMAT
    name: str
    version: int = Field(description="N of v<N>; filled in by publish")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    base_model: BaseModelRef
    datasets: list[DatasetRef] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="the full resolved training config")
    metrics: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    prompt_template: str | None = Field(
        None,
        description="chat template the server renders this adapter's chat requests with; None: the base's",
    )


def validate_name(name: str) -> str:
    """An adapter name: letters, digits, ``._-``, 1-64 chars, no ``..``, not starting with a dot."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, without '..'"
        )
    return name


def parse_version(text: str) -> int:
    text = text.strip()
    match = _VERSION_RE.match(text if text.startswith("v") else f"v{text}")
    if not match:
        raise InvalidAdapterName(f"invalid version {text!r}: expected v<N> with N >= 1")
    return int(match.group(1))


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference: ``name`` (LATEST) or ``name@vN`` (pinned)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, ref: str) -> AdapterRef:
        name, sep, version = ref.partition("@")
        validate_name(name)
        return cls(name, parse_version(version) if sep else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class ResolvedAdapter:
    """A concrete adapter folder on the volume."""

    name: str
    version: int | None
    """None for a plain PEFT folder (no versions)."""
    path: Path

    @property
    def key(self) -> str:
        """Unique per immutable folder: what caches and metrics key on."""
        return self.name if self.version is None else f"{self.name}@v{self.version}"

    def manifest(self) -> Manifest | None:
        file = self.path / MANIFEST_FILE
        return Manifest.model_validate_json(file.read_text()) if file.is_file() else None


@dataclass(frozen=True)
class AdapterListing:
    name: str
    versions: list[int]
    latest: int | None
    plain: bool


class AdapterVolume:
    """Read and publish adapters under one root folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """Refuse symlinks that lead out of the volume."""
        real = path.resolve()
        if real != self.root.resolve() and self.root.resolve() not in real.parents:
            raise InvalidAdapterName(f"{path.name!r} resolves outside the adapters volume")
        return real

    def versions(self, name: str) -> list[int]:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = _VERSION_RE.match(child.name)
            if match and child.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self, name: str) -> int | None:
        """The version LATEST names, or the highest version if LATEST is missing or stale."""
        folder = self.root / validate_name(name)
        try:
            version = parse_version((folder / LATEST_FILE).read_text())
            if (folder / f"v{version}").is_dir():
                return version
        except (FileNotFoundError, InvalidAdapterName):
            pass
        versions = self.versions(name)
        return versions[-1] if versions else None

    def resolve(self, ref: str | AdapterRef) -> ResolvedAdapter:
        """``name`` -> its LATEST version; ``name@vN`` -> that version; a plain PEFT folder as is."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        folder = self.root / ref.name
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter {ref.name!r} not found on the volume")
        self._inside(folder)
        if (folder / ADAPTER_CONFIG_FILE).is_file():
            if ref.version is not None:
                raise AdapterNotFound(f"adapter {ref.name!r} is a plain PEFT folder without versions")
            return ResolvedAdapter(ref.name, None, self._inside(folder))
        version = ref.version if ref.version is not None else self.latest(ref.name)
        path = folder / f"v{version}"
        if version is None or not path.is_dir():
            raise AdapterNotFound(f"adapter {ref!s} not found (versions: {self.versions(ref.name)})")
        return ResolvedAdapter(ref.name, version, self._inside(path))

    def list(self) -> list[AdapterListing]:
        """Every adapter on the volume, sorted by name; folders with invalid names are skipped."""
        if not self.root.is_dir():
            return []
        listings = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir() or not _NAME_RE.match(child.name):
                continue
            if (child / ADAPTER_CONFIG_FILE).is_file():
                listings.append(AdapterListing(child.name, [], None, plain=True))
                continue
            versions = self.versions(child.name)
            if versions:
                listings.append(AdapterListing(child.name, versions, self.latest(child.name), plain=False))
        return listings

    # -- publishing ------------------------------------------------------------------------------
    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A fresh folder on the same filesystem as the volume; removed on exit unless published."""
        validate_name(name)
        folder = self.root / STAGING_DIR / f"{name}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, manifest: Manifest, *, set_latest: bool = True) -> ResolvedAdapter:
        """Make ``staged`` visible as the next ``v<N>`` of ``manifest.name``, atomically.

        The manifest is written with its final version number before the rename, so a visible
        version is always complete. Returns the published version.
        """
        name = validate_name(manifest.name)
        if not (staged / ADAPTER_CONFIG_FILE).is_file() or not (staged / ADAPTER_WEIGHTS_FILE).is_file():
            raise PublishError(f"{staged} lacks {ADAPTER_CONFIG_FILE} or {ADAPTER_WEIGHTS_FILE}")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        for _attempt in range(1000):
            version = (self.versions(name) or [0])[-1] + 1
            _write_atomic(
                staged / MANIFEST_FILE,
                manifest.model_copy(update={"version": version}).model_dump_json(indent=2),
            )
            _fsync_tree(staged)
            try:
                os.rename(staged, folder / f"v{version}")
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another publisher took this number; take the next
                raise PublishError(f"cannot publish {name} v{version}: {exc}") from exc
            break
        else:
            raise PublishError(f"could not find a free version number for {name}")
        if set_latest:
            self._advance_latest(name)
        return ResolvedAdapter(name, version, folder / f"v{version}")

    def set_latest(self, name: str, version: int) -> None:
        """Point ``name`` at an existing version (a rollback)."""
        if not (self.root / validate_name(name) / f"v{version}").is_dir():
            raise AdapterNotFound(f"adapter {name}@v{version} not found")
        _write_atomic(self.root / name / LATEST_FILE, f"v{version}\n")

    def _advance_latest(self, name: str) -> None:
        # Each publisher writes the highest version it sees, then looks again: a publisher that read
        # the versions before a newer rename re-writes, so LATEST ends at the highest version.
        while True:
            highest = self.versions(name)[-1]
            _write_atomic(self.root / name / LATEST_FILE, f"v{highest}\n")
            if self.versions(name)[-1] == highest:
                return


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())


def read_manifest(path: Path) -> Manifest:
    return Manifest.model_validate(json.loads((path / MANIFEST_FILE).read_text()))
