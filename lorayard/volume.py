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
        HISTORY.jsonl            the commit log: one HistoryEntry per LATEST move or split (publish,
                                 promote, canary, rollback); LATEST and ROUTING.json follow it
        LATEST                   text "v<N>": the version ``name`` means (written from the history)
        ROUTING.json             optional canary split of ``name`` between versions (written from the history)
      <plain>/                   a plain PEFT folder (adapter_config.json + safetensors inside; local only)
      .staging/                  work in progress; never read by the server

A version becomes visible complete or not at all: on a folder by one ``rename`` of a staged folder, on
an object store when its manifest (uploaded last) appears. Small files (LATEST, ROUTING.json) are
replaced whole. Concurrent publishers of one name get distinct versions: the loser of a number takes
the next one.

Every lifecycle change (a publish's LATEST move, promote, canary, rollback) is ONE conditional write:
the history with the change's line appended, written only if the history is still what the change
was planned on (an ETag on S3, a locked compare on a folder); otherwise it is planned again on the
new history. Only then are LATEST and ROUTING.json written, from the history (:class:`Timeline`).
A kill anywhere leaves either no line (nothing changed) or a line whose pointers the next change
writes; rollback reads only the history, so it never misreads a half-made change.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The storage's errors and staging folder are part of the volume's contract: importable from here.
from lorayard.s3_storage import S3Storage
from lorayard.storage import STAGING_DIR as STAGING_DIR
from lorayard.storage import (
    FileDigest,
    LocalStorage,
    Storage,
    digest_file,
    is_object_store,
    verify_folder,
)
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


class OutsideVolume(IntegrityError):
    """A file of an adapter folder is a symlink leading out of the adapters volume: never read."""


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
    tool_format: str | None = Field(
        None,
        description="the tool-call format tool conversations were trained in (lorayard.tool_format); "
        "None: no tool data",
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

    def _files_inside(self, folder: Path, label: str) -> Path:
        """Refuse an adapter folder any entry of which is a symlink leading out of the volume (the
        folder itself checked by :meth:`_inside`): whoever can write the volume must not make the
        server read, and echo, files elsewhere. The message names the entry, never its target."""
        root = self.root.resolve()
        for entry in folder.iterdir():
            real = entry.resolve()
            if root not in real.parents:
                raise OutsideVolume(f"adapter {label}: {entry.name} resolves outside the adapters volume")
        return folder

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
                return ResolvedAdapter(ref.name, None, self._files_inside(self._inside(folder), ref.name))
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
            return ResolvedAdapter(name, version, self._files_inside(self._inside(path), label))

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

    def publish(self, staged: Path, manifest: Manifest, *, reason: str | None = None) -> ResolvedAdapter:
        """Make ``staged`` visible as the next ``v<N>`` of ``manifest.name``, complete or not at all.

        The manifest, written last with its final version number and every file's sha256 and size,
        is the commit point of the version; its history line, appended next, makes it LATEST (unless
        a newer version is LATEST already). Returns the published version.
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

        def make_latest(timeline: Timeline, versions: builtins.list[int]) -> builtins.list[HistoryEntry]:
            if timeline.latest is not None and version <= timeline.latest:
                return []  # a newer version was published meanwhile and is LATEST already
            return _publish_entries(timeline, versions, version, reason)

        self._change(name, make_latest)
        if self.storage.local_root is None:  # no download of what we just uploaded
            return ResolvedAdapter(name, version, staged, location=f"{self.location}{name}/v{version}/")
        return self._version(name, version)

    # -- lifecycle: promote, canary, roll back ----------------------------------------------------
    def history(self, name: str) -> builtins.list[HistoryEntry]:
        """Every recorded change of ``name``, oldest first."""
        return _parse_history(name, self.storage.read_text(_key(validate_name(name), HISTORY_FILE)))

    def timeline(self, name: str) -> Timeline:
        """The history replayed: what LATEST, the canary split and the next rollback are."""
        return Timeline.replay(self.history(name))

    def _change(self, name: str, plan: Plan) -> builtins.list[HistoryEntry]:
        """Commit one lifecycle change: a conditional append to the history, then LATEST follows.

        ``plan`` gets the history replayed (with any LATEST it never recorded adopted first, see
        :func:`_adopted_entries`) and the committed versions, and returns the lines to append, or
        raises to refuse (nothing written). The append is one write conditional on the history being
        what was read (an ETag on S3, a locked compare on a folder); when another writer got there
        first, everything is read again and ``plan`` asked again. Returns ``plan``'s lines.
        """
        key = _key(name, HISTORY_FILE)
        for attempt in range(_CHANGE_ATTEMPTS):
            text, tag = self.storage.read_tagged(key)
            timeline = Timeline.replay(_parse_history(name, text))
            # Read after the history: a LATEST written from a newer history means ours is stale
            # and the conditional append below fails.
            pointers = self.pointers(name)
            adopted = _adopted_entries(timeline, pointers)
            for entry in adopted:
                timeline.apply(entry)
            planned = plan(timeline, pointers.versions)
            lines = "".join(entry.line() for entry in (*adopted, *planned))
            if not lines:
                break
            if text and not text.endswith("\n"):
                text += "\n"  # a hand-edited last line
            if self.storage.write_text_if(key, (text or "") + lines, tag):
                break
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 10)))  # another writer went first
        else:
            raise StorageUnavailable(
                f"{self.location}{key} kept changing; gave up after {_CHANGE_ATTEMPTS} tries"
            )
        self._follow_history(name)
        return planned

    def _follow_history(self, name: str) -> None:
        """Write LATEST and ROUTING.json as the history says, until the history stops changing under us.

        Writers that append concurrently may write these files in any order; each looks at the
        history again after writing and writes again when it moved, so the last write follows the
        last line. A writer killed before this leaves them behind the history until the next change.
        """
        key = _key(name, HISTORY_FILE)
        for _attempt in range(_CHANGE_ATTEMPTS):
            text, tag = self.storage.read_tagged(key)
            timeline = Timeline.replay(_parse_history(name, text))
            if timeline.latest is not None:
                latest = f"v{timeline.latest}\n"
                if self.storage.read_text(_key(name, LATEST_FILE)) != latest:
                    self.storage.write_text(_key(name, LATEST_FILE), latest)
                if timeline.routing is None:
                    self.storage.delete(_key(name, ROUTING_FILE))
                elif _routes(self.routing(name)) != _routes(timeline.routing):
                    self.storage.write_text(
                        _key(name, ROUTING_FILE), timeline.routing.model_dump_json(indent=2) + "\n"
                    )
            if self.storage.read_tagged(key)[1] == tag:
                return
        raise StorageUnavailable(
            f"{self.location}{key} kept changing; gave up after {_CHANGE_ATTEMPTS} tries"
        )

    def promote(self, name: str, version: int, *, reason: str | None = None) -> HistoryEntry:
        """Point LATEST at ``version`` (any published one, older or newer); ends any canary split."""

        def plan(timeline: Timeline, versions: builtins.list[int]) -> builtins.list[HistoryEntry]:
            _require(name, version, versions)
            latest = _version_text(timeline.latest)
            return [HistoryEntry(action="promote", from_version=latest, to=f"v{version}", reason=reason)]

        return self._change(validate_name(name), plan)[0]

    def canary(self, name: str, version: int, percent: float, *, reason: str | None = None) -> Routing:
        """Send ``percent`` of the requests for ``name`` to ``version``, the rest to LATEST."""
        if not 0 < percent < 100:
            raise LifecycleError(f"--canary: a percent strictly between 0 and 100, got {percent}")

        def plan(timeline: Timeline, versions: builtins.list[int]) -> builtins.list[HistoryEntry]:
            _require(name, version, versions)
            if timeline.latest is None or timeline.latest == version:
                raise LifecycleError(
                    f"{name}@v{version} is LATEST already: "
                    "a canary splits LATEST's traffic with another version"
                )
            entry = HistoryEntry(
                action="canary",
                from_version=f"v{timeline.latest}",
                to=f"v{version}",
                canary_percent=percent,
                reason=reason,
            )
            return [entry]

        routing = _split(self._change(validate_name(name), plan)[0])
        assert routing is not None  # a percent in (0, 100) and two versions make a valid split
        return routing

    def rollback(self, name: str, *, reason: str | None = None) -> HistoryEntry:
        """Undo the last publish, promote or canary that has not been undone yet.

        Undoing a publish or promote returns LATEST to the version it held before; undoing a canary
        removes the split. Repeated rollbacks walk further back. Two rollbacks at once undo two
        changes, one after the other: the second is planned on the history the first left.
        """

        def plan(timeline: Timeline, versions: builtins.list[int]) -> builtins.list[HistoryEntry]:
            if not timeline.undoable:
                raise LifecycleError(f"{name}: nothing to roll back (no publish, promote or canary recorded)")
            last = timeline.undoable[-1]
            current = _version_text(timeline.latest)
            if last.action == "canary":
                target = current
            else:
                if last.from_version is None:
                    raise LifecycleError(
                        f"{name}: {last.to} was its first version; there is nothing before it"
                    )
                _require(name, parse_version(last.from_version), versions)
                target = last.from_version
            why = reason or f"undo {last.action} of {last.to} at {last.at}"
            return [HistoryEntry(action="rollback", from_version=current, to=target, reason=why)]

        return self._change(validate_name(name), plan)[0]


Plan = Callable[["Timeline", list[int]], list[HistoryEntry]]
"""Given the history replayed and the committed versions: the lines one lifecycle change appends."""

_CHANGE_ATTEMPTS = 200
_LATE = "recorded late: "


@dataclass
class Timeline:
    """``HISTORY.jsonl`` replayed: the history is the commit log, LATEST and ROUTING.json follow it."""

    entries: list[HistoryEntry] = field(default_factory=list)
    latest: int | None = None
    routing: Routing | None = None
    undoable: list[HistoryEntry] = field(default_factory=list)
    """A stack: each rollback undoes the latest change not undone yet."""
    recorded: set[int] = field(default_factory=set)
    """Every version some line made LATEST."""

    @classmethod
    def replay(cls, entries: list[HistoryEntry]) -> Timeline:
        timeline = cls()
        for entry in entries:
            timeline.apply(entry)
        return timeline

    def apply(self, entry: HistoryEntry) -> None:
        self.entries.append(entry)
        if entry.action == "canary":
            self.undoable.append(entry)
            self.routing = _split(entry)
            return
        latest = _version_text(self.latest)
        if entry.action == "rollback":
            if entry.to == latest and entry.from_version != latest:
                # Recorded against a state already undone: the second of two rollbacks at once, as
                # written before changes were conditional. It changed nothing; it undoes nothing.
                return
            if self.undoable:
                self.undoable.pop()
        else:
            self.undoable.append(entry)
        self.routing = None
        to = _number(entry.to)
        if to is not None:
            self.latest = to
            self.recorded.add(to)


def _number(text: str | None) -> int | None:
    try:
        return None if text is None else parse_version(text)
    except InvalidAdapterName:
        return None


def _split(entry: HistoryEntry) -> Routing | None:
    """The routing a canary line describes; None when the line cannot describe one (a hand edit)."""
    if entry.from_version is None or entry.to is None or entry.canary_percent is None:
        return None
    try:
        return Routing(
            base=entry.from_version,
            routes=[
                Route(version=entry.from_version, weight=100 - entry.canary_percent),
                Route(version=entry.to, weight=entry.canary_percent),
            ],
            created_at=entry.at,
            reason=entry.reason,
        )
    except (ValidationError, InvalidAdapterName):
        return None


def _routes(routing: Routing | None) -> object:
    return None if routing is None else (routing.base, [(r.version, r.weight) for r in routing.routes])


def _parse_history(name: str, text: str | None) -> list[HistoryEntry]:
    entries = []
    for number, line in enumerate((text or "").splitlines(), 1):
        if line.strip():
            try:
                entries.append(HistoryEntry.model_validate_json(line))
            except ValidationError as exc:
                raise LifecycleError(
                    f"{name}: line {number} of {HISTORY_FILE} is unreadable ({exc})"
                ) from exc
    return entries


def _require(name: str, version: int, versions: list[int]) -> None:
    if version not in versions:
        raise AdapterNotFound(f"adapter {name}@v{version} not found (versions: {versions})")


def _publish_entries(
    timeline: Timeline, versions: list[int], upto: int, reason: str | None
) -> list[HistoryEntry]:
    """Publish lines from LATEST up to ``upto``, one per committed version the history never recorded.

    A publisher killed between its commit and its history line leaves such a version; recording it
    here, in order, means rollback walks back through it rather than skipping it.
    """
    entries = []
    before = timeline.latest
    for version in versions:
        if version <= (before or 0) or version > upto or version in timeline.recorded:
            continue
        why = reason if version == upto else f"{_LATE}its publish stopped before moving LATEST"
        entries.append(
            HistoryEntry(action="publish", from_version=_version_text(before), to=f"v{version}", reason=why)
        )
        before = version
    return entries


def _adopted_entries(timeline: Timeline, pointers: Pointers) -> list[HistoryEntry]:
    """Lines for a LATEST the history never recorded, so the history describes what is served.

    Only earlier versions of lorayard (which wrote LATEST before the history line and could be
    killed in between), hand edits and volumes older than their history leave one: new changes
    write LATEST from the history only. A LATEST the history did record but no longer holds is
    behind it (a writer killed before following its line); the history wins.
    """
    served = pointers.latest
    if served is None or served in timeline.recorded:
        return []
    if timeline.latest is None or served > timeline.latest:
        return _publish_entries(timeline, pointers.versions, served, f"{_LATE}LATEST named v{served}")
    return [
        HistoryEntry(
            action="promote",
            from_version=_version_text(timeline.latest),
            to=f"v{served}",
            reason=f"{_LATE}LATEST named v{served}",
        )
    ]


def open_storage(
    location: str | Path, *, cache_dir: Path | None = None, cache_max_bytes: int | None = None
) -> Storage:
    """``s3://bucket/prefix`` -> S3 (credentials from the standard AWS chain); anything else a folder."""
    if is_object_store(location):
        return S3Storage.from_url(str(location), cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
    return LocalStorage(location)


def read_manifest(path: Path) -> Manifest:
    return Manifest.model_validate(json.loads((path / MANIFEST_FILE).read_text()))
