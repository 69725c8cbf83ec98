"""The adapters volume: layout, manifest, publish, resolve ``name`` / ``name@vN``, promote, roll back, canary.

Layout (the contract between the training job, the server and anyone browsing the volume; the same on
a local folder and on an object store, see :mod:`lorayard.storage`)::

    <root>/                      a folder, or s3://bucket/prefix
      <name>/
        v1/  v2/ ...             one immutable folder per published version
          adapter_config.json          PEFT's own format: plain PEFT and vLLM load it
          adapter_model.safetensors
          eval.json  loss_curve.png    (written by the training job)
          manifest.json                Manifest below: lists every other file's sha256 and size
        LATEST                   text "v<N>": the version ``name`` means
        ROUTING.json             optional canary split of ``name`` between versions (Routing below)
        HISTORY.jsonl            one HistoryEntry per LATEST move or split: publish, promote, canary, rollback
      <plain>/                   a plain PEFT folder (adapter_config.json + safetensors inside; local only)
      .staging/                  work in progress; never read by the server

A version becomes visible complete or not at all: on a folder by one ``rename`` of a staged folder, on
an object store when its manifest (uploaded last) appears. Small files (LATEST, ROUTING.json) are
replaced whole. Concurrent publishers of one name get distinct versions: the loser of a number takes
the next one.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The storage's errors and staging folder are part of the volume's contract: importable from here.
from lorayard.storage import STAGING_DIR as STAGING_DIR
from lorayard.storage import FileDigest, Storage, digest_file, open_storage, verify_folder
from lorayard.storage import IntegrityError as IntegrityError
from lorayard.storage import StorageUnavailable as StorageUnavailable
from lorayard.storage import VolumeError as VolumeError

LATEST_FILE = "LATEST"
MANIFEST_FILE = "manifest.json"
ROUTING_FILE = "ROUTING.json"
HISTORY_FILE = "HISTORY.jsonl"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FORMAT = 2
"""2: the manifest lists every file's sha256 and size (1 did not)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")


class InvalidAdapterName(VolumeError):
    """A name or reference that could escape the volume or is not ``name`` / ``name@vN``."""


class AdapterNotFound(VolumeError):
    """No adapter (or no such version of it) on the volume."""


class PublishError(VolumeError):
    """Publishing failed; nothing became visible."""


class LifecycleError(VolumeError):
    """A promote, canary or rollback that cannot be done (the message says why); nothing changed."""


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


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """``manifest.json`` of one published version."""

    model_config = ConfigDict(extra="allow")
    format: int = MANIFEST_FORMAT
    name: str
    version: int = Field(description="N of v<N>; filled in by publish")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    base_model: BaseModelRef
    files: dict[str, FileEntry] = Field(
        default_factory=dict,
        description="every other file of the version: sha256 and size; filled by publish",
    )
    datasets: list[DatasetRef] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="the full resolved training config")
    metrics: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    prompt_template: str | None = Field(
        None,
        description="chat template the server renders this adapter's chat requests with; None: the base's",
    )

    def digests(self) -> dict[str, FileDigest]:
        return {name: FileDigest(entry.sha256, entry.size) for name, entry in self.files.items()}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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


def _version_text(version: int | None) -> str | None:
    return None if version is None else f"v{version}"


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="v<N>")
    weight: float = Field(gt=0, le=100, description="percent of requests for the name")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return f"v{parse_version(value)}"

    @property
    def number(self) -> int:
        return parse_version(self.version)


class Routing(BaseModel):
    """``ROUTING.json``: how requests for a plain ``name`` are split between versions.

    Valid only while LATEST is still ``base`` (the version it was written against): any move of LATEST
    ends the split, so a stale file can never resurrect an old canary.
    """

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    base: str = Field(description="the LATEST this split was written against")
    routes: list[Route] = Field(min_length=1)
    created_at: str = Field(default_factory=_now)
    reason: str | None = None

    @model_validator(mode="after")
    def _weights_sum_to_100(self) -> Routing:
        total = sum(r.weight for r in self.routes)
        if abs(total - 100) > 1e-6:
            raise ValueError(f"route weights sum to {total}, not 100")
        return self

    def pick(self, name: str, user: str | None) -> int:
        """The version serving one request: sticky by ``user`` (a hash of user and name), else random.

        The canary is the last route, so raising its share moves only users from the current version
        to it, and a user already on the canary stays there.
        """
        if user is None:
            point = random.random() * 100
        else:
            digest = hashlib.sha256(f"{name}\n{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * 100
        cumulative = 0.0
        for route in self.routes:
            cumulative += route.weight
            if point < cumulative:
                return route.number
        return self.routes[-1].number


class HistoryEntry(BaseModel):
    """One line of ``HISTORY.jsonl``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    at: str = Field(default_factory=_now)
    action: Literal["publish", "promote", "canary", "rollback"]
    from_version: str | None = Field(None, alias="from", description="LATEST before")
    to: str | None = Field(None, description="LATEST after (for canary: the canary version)")
    canary_percent: float | None = None
    reason: str | None = None

    def line(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True)) + "\n"


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
    """A concrete adapter version, readable in a local folder (the volume, or a verified download)."""

    name: str
    version: int | None
    """None for a plain PEFT folder (no versions)."""
    path: Path
    location: str | None = None
    """Where the version lives when that is not ``path`` (an object-store URL)."""

    @property
    def key(self) -> str:
        """Unique per immutable folder: what caches and metrics key on."""
        return self.name if self.version is None else f"{self.name}@v{self.version}"

    def manifest(self) -> Manifest | None:
        file = self.path / MANIFEST_FILE
        return Manifest.model_validate_json(file.read_text()) if file.is_file() else None

    def verify(self) -> None:
        """Raise IntegrityError unless every file the manifest lists has its sha256 and size."""
        manifest = self.manifest()
        if manifest is not None:
            verify_folder(self.path, manifest.digests(), self.key)


@dataclass(frozen=True)
class Pointers:
    """What a plain ``name`` means right now: its versions, LATEST and any valid canary split."""

    versions: list[int]
    latest: int | None
    routing: Routing | None = None

    def choose(self, name: str, user: str | None) -> int | None:
        if self.routing is not None:
            return self.routing.pick(name, user)
        return self.latest


@dataclass(frozen=True)
class AdapterListing:
    name: str
    versions: list[int]
    latest: int | None
    plain: bool
    routing: Routing | None = None

    @property
    def pointers(self) -> Pointers:
        return Pointers(self.versions, self.latest, self.routing)


def _key(*parts: str) -> str:
    return "/".join(parts)


class AdapterVolume:
    """Read, publish and steer adapters under one root: a folder or ``s3://bucket/prefix``."""

    def __init__(
        self,
        root: Path | str | Storage,
        *,
        cache_dir: Path | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        if isinstance(root, Path | str):
            root = open_storage(root, cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
        self.storage: Storage = root

    @property
    def root(self) -> Path:
        """The root folder of a local volume (an object store has none)."""
        if self.storage.local_root is None:
            raise VolumeError(f"{self.storage.location} is an object store, not a local folder")
        return self.storage.local_root

    @property
    def location(self) -> str:
        return self.storage.location

    # -- reading ---------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        """Refuse symlinks that lead out of a local volume."""
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise InvalidAdapterName(f"{path.name!r} resolves outside the adapters volume")
        return real

    def versions(self, name: str) -> list[int]:
        """The committed versions of ``name``, ascending."""
        folders = self.storage.committed_folders(validate_name(name), MANIFEST_FILE)
        return sorted(int(m.group(1)) for f in folders if (m := _VERSION_RE.match(f)))

    def _read_latest(self, name: str) -> int | None:
        text = self.storage.read_text(_key(name, LATEST_FILE))
        try:
            return None if text is None else parse_version(text)
        except InvalidAdapterName:
            return None

    def routing(self, name: str) -> Routing | None:
        """The canary split of ``name`` as written (None when there is none or it is unreadable)."""
        text = self.storage.read_text(_key(validate_name(name), ROUTING_FILE))
        if text is None:
            return None
        try:
            return Routing.model_validate_json(text)
        except ValidationError:
            return None  # a hand-edited, broken split: LATEST alone serves

    def pointers(self, name: str) -> Pointers:
        """Versions, LATEST (the highest version when LATEST is missing or stale) and a valid split."""
        versions = self.versions(name)
        latest = self._read_latest(name)
        if latest not in versions:
            latest = versions[-1] if versions else None
        routing = self.routing(name)
        if routing is not None and (
            latest is None
            or routing.base != f"v{latest}"
            or any(r.number not in versions for r in routing.routes)
        ):
            routing = None
        return Pointers(versions, latest, routing)

    def latest(self, name: str) -> int | None:
        """The version LATEST names, or the highest version if LATEST is missing or stale."""
        return self.pointers(name).latest

    def _is_plain(self, name: str) -> bool:
        # Plain PEFT folders carry no manifest to verify: served from a local volume only.
        return self.storage.local_root is not None and self.storage.has_file(_key(name, ADAPTER_CONFIG_FILE))

    def resolve(
        self, ref: str | AdapterRef, *, user: str | None = None, pointers: Pointers | None = None
    ) -> ResolvedAdapter:
        """``name`` -> its LATEST (or a canary pick for ``user``); ``name@vN`` -> that version.

        ``pointers``: what the caller last read for ``name`` (the server polls them on an object store
        rather than read LATEST per request); read now when not given.
        """
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        local = self.storage.local_root
        if local is not None:
            folder = local / ref.name
            if not folder.is_dir():
                raise AdapterNotFound(f"adapter {ref.name!r} not found on the volume")
            self._inside(folder)
            if self._is_plain(ref.name):
                if ref.version is not None:
                    raise AdapterNotFound(f"adapter {ref.name!r} is a plain PEFT folder without versions")
                return ResolvedAdapter(ref.name, None, self._inside(folder))
        version = ref.version
        if version is None:
            pointers = pointers or self.pointers(ref.name)
            version = pointers.choose(ref.name, user)
            if version is None:
                raise AdapterNotFound(f"adapter {ref.name!r} not found on the volume")
        return self._version(ref.name, version)

    def _version(self, name: str, version: int) -> ResolvedAdapter:
        prefix = _key(name, f"v{version}")
        label = f"{name}@v{version}"
        if self.storage.local_root is not None:
            path = self.storage.local_folder(prefix, None, label)
            if not path.is_dir():
                raise AdapterNotFound(f"adapter {label} not found (versions: {self.versions(name)})")
            return ResolvedAdapter(name, version, self._inside(path))

        def listed_files() -> dict[str, FileDigest | None]:
            manifest = self._remote_manifest(name, version)
            return {**manifest.digests(), MANIFEST_FILE: None}

        return ResolvedAdapter(name, version, self.storage.local_folder(prefix, listed_files, label))

    def _remote_manifest(self, name: str, version: int) -> Manifest:
        text = self.storage.read_text(_key(name, f"v{version}", MANIFEST_FILE))
        if text is None:
            raise AdapterNotFound(f"adapter {name}@v{version} not found (versions: {self.versions(name)})")
        try:
            manifest = Manifest.model_validate_json(text)
        except ValidationError as exc:
            raise IntegrityError(f"adapter {name}@v{version}: unreadable manifest.json ({exc})") from exc
        if not manifest.files:
            raise IntegrityError(
                f"adapter {name}@v{version}: its manifest lists no files to verify "
                f"(publish it again with this version of lorayard)"
            )
        return manifest

    def list(self) -> list[AdapterListing]:
        """Every adapter on the volume, sorted by name; folders with invalid names are skipped."""
        listings = []
        for name in self.storage.child_folders(""):
            if name.startswith(".") or not _NAME_RE.match(name) or ".." in name:
                continue
            if self._is_plain(name):
                listings.append(AdapterListing(name, [], None, plain=True))
                continue
            pointers = self.pointers(name)
            if pointers.versions:
                listings.append(
                    AdapterListing(name, pointers.versions, pointers.latest, False, pointers.routing)
                )
        return listings

    # -- publishing ------------------------------------------------------------------------------
    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A fresh local folder to assemble a version in; removed on exit unless published."""
        with self.storage.staging(validate_name(name)) as folder:
            yield folder

    def publish(
        self, staged: Path, manifest: Manifest, *, set_latest: bool = True, reason: str | None = None
    ) -> ResolvedAdapter:
        """Make ``staged`` visible as the next ``v<N>`` of ``manifest.name``, complete or not at all.

        The manifest, written last with its final version number and every file's sha256 and size,
        is the commit point. Returns the published version.
        """
        name = validate_name(manifest.name)
        if not (staged / ADAPTER_CONFIG_FILE).is_file() or not (staged / ADAPTER_WEIGHTS_FILE).is_file():
            raise PublishError(f"{staged} lacks {ADAPTER_CONFIG_FILE} or {ADAPTER_WEIGHTS_FILE}")
        files = {
            file.name: FileEntry(**vars(digest_file(file)))
            for file in sorted(staged.iterdir())
            if file.is_file() and file.name != MANIFEST_FILE
        }
        for _attempt in range(1000):
            # Claimed-but-unfinished numbers count too: an interrupted publish's number is never reused.
            taken = [int(m.group(1)) for f in self.storage.child_folders(name) if (m := _VERSION_RE.match(f))]
            version = max(taken, default=0) + 1
            final = manifest.model_copy(
                update={"version": version, "files": files, "format": MANIFEST_FORMAT}
            )
            (staged / MANIFEST_FILE).write_text(final.model_dump_json(indent=2))
            try:
                if self.storage.commit_folder(staged, _key(name, f"v{version}"), MANIFEST_FILE):
                    break
            except OSError as exc:
                raise PublishError(f"cannot publish {name} v{version}: {exc}") from exc
        else:
            raise PublishError(f"could not find a free version number for {name}")
        if set_latest:
            self._advance_latest(name, reason)
        if self.storage.local_root is None:  # no download of what we just uploaded
            return ResolvedAdapter(name, version, staged, location=f"{self.location}{name}/v{version}/")
        return self._version(name, version)

    def _advance_latest(self, name: str, reason: str | None) -> None:
        before = self._read_latest(name)
        # Each publisher writes the highest version it sees, then looks again: a publisher that read
        # the versions before a newer commit re-writes, so LATEST ends at the highest version.
        while True:
            highest = self.versions(name)[-1]
            self.storage.write_text(_key(name, LATEST_FILE), f"v{highest}\n")
            if self.versions(name)[-1] == highest:
                break
        self.storage.delete(_key(name, ROUTING_FILE))
        self._record(
            name,
            HistoryEntry(
                action="publish", from_version=_version_text(before), to=f"v{highest}", reason=reason
            ),
        )

    # -- lifecycle: promote, canary, roll back ----------------------------------------------------
    def history(self, name: str) -> builtins.list[HistoryEntry]:
        """Every recorded change of ``name``, oldest first."""
        text = self.storage.read_text(_key(validate_name(name), HISTORY_FILE)) or ""
        return [HistoryEntry.model_validate_json(line) for line in text.splitlines() if line.strip()]

    def _record(self, name: str, entry: HistoryEntry) -> None:
        self.storage.update_text(_key(name, HISTORY_FILE), lambda old: (old or "") + entry.line())

    def _require(self, name: str, version: int) -> Pointers:
        pointers = self.pointers(name)
        if version not in pointers.versions:
            raise AdapterNotFound(f"adapter {name}@v{version} not found (versions: {pointers.versions})")
        return pointers

    def promote(self, name: str, version: int, *, reason: str | None = None) -> HistoryEntry:
        """Point LATEST at ``version`` (any published one, older or newer); ends any canary split."""
        pointers = self._require(validate_name(name), version)
        self.storage.write_text(_key(name, LATEST_FILE), f"v{version}\n")
        self.storage.delete(_key(name, ROUTING_FILE))
        entry = HistoryEntry(
            action="promote", from_version=_version_text(pointers.latest), to=f"v{version}", reason=reason
        )
        self._record(name, entry)
        return entry

    def canary(self, name: str, version: int, percent: float, *, reason: str | None = None) -> Routing:
        """Send ``percent`` of the requests for ``name`` to ``version``, the rest to LATEST."""
        pointers = self._require(validate_name(name), version)
        if not 0 < percent < 100:
            raise LifecycleError(f"--canary: a percent strictly between 0 and 100, got {percent}")
        if pointers.latest is None or pointers.latest == version:
            raise LifecycleError(
                f"{name}@v{version} is LATEST already: a canary splits LATEST's traffic with another version"
            )
        routing = Routing(
            base=f"v{pointers.latest}",
            routes=[
                Route(version=f"v{pointers.latest}", weight=100 - percent),
                Route(version=f"v{version}", weight=percent),
            ],
            reason=reason,
        )
        self.storage.write_text(_key(name, ROUTING_FILE), routing.model_dump_json(indent=2) + "\n")
        self._record(
            name,
            HistoryEntry(
                action="canary",
                from_version=f"v{pointers.latest}",
                to=f"v{version}",
                canary_percent=percent,
                reason=reason,
            ),
        )
        return routing

    def rollback(self, name: str, *, reason: str | None = None) -> HistoryEntry:
        """Undo the last publish, promote or canary that has not been undone yet.

        Undoing a publish or promote returns LATEST to the version it held before; undoing a canary
        removes the split. Repeated rollbacks walk further back.
        """
        undoable = self._undoable(validate_name(name))
        if not undoable:
            raise LifecycleError(f"{name}: nothing to roll back (no publish, promote or canary recorded)")
        last = undoable[-1]
        pointers = self.pointers(name)
        current = _version_text(pointers.latest)
        if last.action == "canary":
            self.storage.delete(_key(name, ROUTING_FILE))
            target = current
        else:
            if last.from_version is None:
                raise LifecycleError(f"{name}: {last.to} was its first version; there is nothing before it")
            self._require(name, parse_version(last.from_version))
            target = last.from_version
            self.storage.write_text(_key(name, LATEST_FILE), f"{target}\n")
            self.storage.delete(_key(name, ROUTING_FILE))
        entry = HistoryEntry(
            action="rollback",
            from_version=current,
            to=target,
            reason=reason or f"undo {last.action} of {last.to} at {last.at}",
        )
        self._record(name, entry)
        return entry

    def _undoable(self, name: str) -> builtins.list[HistoryEntry]:
        # A stack: each rollback undoes the latest change not undone yet.
        stack: builtins.list[HistoryEntry] = []
        for entry in self.history(name):
            if entry.action == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(entry)
        return stack


def read_manifest(path: Path) -> Manifest:
    return Manifest.model_validate(json.loads((path / MANIFEST_FILE).read_text()))
