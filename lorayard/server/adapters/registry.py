"""The adapter registry: what is on the volume, what is resident in the engine, who is using what.

* ``acquire("name", user)`` resolves LATEST, or the version a canary split routes ``user`` to (or
  ``name@vN``), loads it off the event loop if it is not resident, and pins it; ``release`` unpins. A
  request keeps the version it acquired even if LATEST moves on meanwhile (versions are immutable,
  keyed ``name@vN``); the lease says which version that is.
* At most ``max_loaded`` versions are resident; the least recently used *unpinned* one is evicted
  (SGLang's acquire/release discipline), so an adapter in use is never pulled from under a request.
* A watcher polls the volume; a new adapter or a new LATEST is served by the next acquire, and the
  cached listing for /v1/models is refreshed. On an object store the polled LATEST and routing are
  what acquire uses (no request reads S3 for them), and a version is loaded only once its download
  verifies against its manifest (sha256 and size of every file).
* A broken adapter (bad files, another base) raises :class:`AdapterLoadError` for that adapter only;
  a later fixed version loads normally.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorayard.adapter_files import AdapterFormatError, load_adapter
from lorayard.volume import (
    ADAPTER_WEIGHTS_FILE,
    AdapterListing,
    AdapterNotFound,
    AdapterVolume,
    IntegrityError,
    InvalidAdapterName,
    Manifest,
    Pointers,
    ResolvedAdapter,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from lorayard.server.engine.types import ServingEngine
    from lorayard.server.metrics import ServerMetrics

log = logging.getLogger("lorayard.registry")


class AdapterLoadError(Exception):
    """The adapter exists but cannot be served (corrupt files, wrong base, unsupported format)."""


class AdaptersBusy(Exception):
    """Every resident adapter is pinned by running requests and no slot can be freed."""


@dataclass(eq=False)
class _Resident:
    adapter: ResolvedAdapter
    slot: int
    pins: int = 0
    last_used: float = 0.0
    identity: tuple[int, int, int] | None = None
    """(device, inode, mtime) of the weights file when loaded: tells a folder replaced in place."""
    prompt_template: str | None = None
    """The chat template its manifest records (trained on a base without one), else None."""
    tool_format: str | None = None
    """The tool-call format its manifest records (trained on tool conversations), else None."""


def _file_identity(folder: Path) -> tuple[int, int, int] | None:
    try:
        st = (folder / ADAPTER_WEIGHTS_FILE).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


@dataclass(frozen=True)
class AdapterLease:
    """A pinned, resident adapter version (implements the engine's ``AdapterHandle``)."""

    name: str
    version: int | None
    key: str
    slot: int
    prompt_template: str | None = None
    """The prompt template this version was trained with (its manifest's), for chat requests: the
    server renders them exactly as training rendered its examples. None: the base's own template."""
    tool_format: str | None = None
    """The tool-call format this version was trained in (its manifest's, a ``TOOL_FORMATS`` key): its
    tool requests are rendered, constrained and parsed in it. None: the base's format."""


@dataclass(frozen=True)
class AdapterStatus:
    name: str
    versions: list[int]
    latest: int | None
    plain: bool
    loaded: bool
    load_error: str | None = None


class AdapterRegistry:
    def __init__(
        self,
        adapters_dir: Path | str,
        engine: ServingEngine,
        *,
        base_fingerprint: str,
        max_loaded: int,
        poll_interval_s: float,
        metrics: ServerMetrics | None = None,
        cache_dir: Path | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        """``max_loaded``, ``poll_interval_s``: the server's --max-loaded-adapters and --poll-interval."""
        self.volume = AdapterVolume(adapters_dir, cache_dir=cache_dir, cache_max_bytes=cache_max_bytes)
        self.engine = engine
        self.base_fingerprint = base_fingerprint
        self.max_loaded = max_loaded
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        self._resident: collections.OrderedDict[int, _Resident] = collections.OrderedDict()
        """Engine slot -> resident version, least recently used first."""
        self._current: dict[str, int] = {}
        """Version key -> the slot serving it to new requests. A resident whose slot is not here was
        replaced in place on the volume and stays only until its running requests release it."""
        self._errors: dict[str, str] = {}
        self._listing: list[AdapterListing] = []
        self._lock = asyncio.Lock()
        """Guards the maps above for the few synchronous steps of an acquire, never across a load."""
        self._loading: dict[str, asyncio.Task[None]] = {}
        """Version key -> its load in flight: a second acquire of it waits for that one."""
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def refresh(self) -> None:
        """Re-scan the volume (cheap: directory listings and LATEST files only)."""
        try:
            self._listing = await asyncio.to_thread(self.volume.list)
        except (OSError, StorageUnavailable) as exc:  # an unreadable volume must not take the server down
            log.error("cannot list adapters volume %s: %s", self.volume.location, exc)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()

    # -- requests -------------------------------------------------------------------------------
    def _polled(self, ref: str) -> Pointers | None:
        """The last polled pointers of ``ref``'s name, where reading them per request would be costly."""
        if self.volume.storage.cheap_reads:
            return None
        name = ref.partition("@")[0]
        return next((a.pointers for a in self._listing if a.name == name and not a.plain), None)

    async def acquire(self, ref: str, user: str | None = None) -> AdapterLease:
        """Resolve (a canary split routes by ``user``), load if needed, and pin.

        Raises InvalidAdapterName, AdapterNotFound, AdapterLoadError."""
        try:
            adapter = await asyncio.to_thread(self.volume.resolve, ref, user=user, pointers=self._polled(ref))
            identity = await asyncio.to_thread(_file_identity, adapter.path)
        except IntegrityError as exc:
            self._errors[ref.partition("@")[0]] = str(exc)
            raise AdapterLoadError(f"adapter {ref!r}: {exc}") from exc
        except (OSError, StorageUnavailable) as exc:
            # An OSError names the path it failed on: the server's business, logged, never sent.
            log.error("adapter %r: the adapters volume is unreadable: %s", ref, exc)
            raise AdapterLoadError(f"adapter {ref!r}: the adapters volume is unreadable") from exc
        while True:
            async with self._lock:
                lease = self._pin_resident(adapter, identity)
                if lease is not None:
                    return lease
                loading = self._loading.get(adapter.key)
                if loading is None:
                    self._make_room()
                    loading = asyncio.create_task(self._load(adapter, identity))
                    self._loading[adapter.key] = loading
            # The load runs without the lock, so acquires of resident adapters never wait behind it;
            # concurrent acquires of this version wait for the one load. Shielded: a client that hangs
            # up does not cancel a load others are waiting for (what it loads stays, unpinned).
            await asyncio.shield(loading)

    def _pin_resident(
        self, adapter: ResolvedAdapter, identity: tuple[int, int, int] | None
    ) -> AdapterLease | None:
        """Pin the resident serving ``adapter`` (the caller holds the lock); None if there is none."""
        slot = self._current.get(adapter.key)
        resident = None if slot is None else self._resident[slot]
        if resident is not None and resident.identity != identity:
            # Replaced in place (a plain folder rewritten, a version deleted and republished):
            # requests already running keep the old weights; new ones get the files on disk.
            self._retire(resident)
            resident = None
        if resident is None:
            return None
        resident.pins += 1
        resident.last_used = time.monotonic()
        self._resident.move_to_end(resident.slot)
        return AdapterLease(
            adapter.name,
            adapter.version,
            adapter.key,
            resident.slot,
            resident.prompt_template,
            resident.tool_format,
        )

    def release(self, lease: AdapterLease) -> None:
        resident = self._resident.get(lease.slot)
        if resident is None or resident.pins == 0:
            return
        resident.pins -= 1
        if resident.pins == 0 and self._current.get(resident.adapter.key) != resident.slot:
            self._evict(resident.slot)  # retired and now idle: nobody can acquire it again

    def _make_room(self) -> None:
        """Evict the LRU unpinned resident while residents and loads in flight fill ``max_loaded``
        (the caller holds the lock)."""
        while len(self._resident) + len(self._loading) >= self.max_loaded:
            victim = next((slot for slot, r in self._resident.items() if r.pins == 0), None)
            if victim is None:
                raise AdaptersBusy(
                    f"all {self.max_loaded} resident adapters are in use; "
                    "retry shortly or raise --max-loaded-adapters"
                )
            self._evict(victim)

    async def _load(self, adapter: ResolvedAdapter, identity: tuple[int, int, int] | None) -> None:
        """Load one version in a worker thread (no lock held meanwhile), then make it resident."""
        started = time.perf_counter()
        try:
            slot, manifest = await asyncio.to_thread(self._read_and_upload, adapter)
        except AdapterLoadError as exc:
            self._errors[adapter.name] = str(exc)
            raise
        finally:
            self._loading.pop(adapter.key, None)
        self._errors.pop(adapter.name, None)
        elapsed = time.perf_counter() - started
        log.info("loaded adapter %s in %.1f ms", adapter.key, elapsed * 1000)
        if self.metrics is not None:
            self.metrics.observe_adapter_load(adapter.name, adapter.version, elapsed)
        resident = _Resident(
            adapter,
            slot,
            identity=identity,
            prompt_template=manifest.prompt_template if manifest is not None else None,
            tool_format=manifest.tool_format if manifest is not None else None,
        )
        self._resident[slot] = resident
        self._current[adapter.key] = slot
        self._set_loaded_gauge()

    def _read_and_upload(self, adapter: ResolvedAdapter) -> tuple[int, Manifest | None]:
        """Check, verify and upload one version; returns its engine slot and its manifest (None: a
        plain PEFT folder)."""
        try:
            manifest = adapter.manifest()
        except OSError as exc:
            raise AdapterLoadError(
                f"adapter {adapter.key}: unreadable manifest.json ({exc.strerror})"
            ) from exc
        except ValueError as exc:
            raise AdapterLoadError(f"adapter {adapter.key}: unreadable manifest.json ({exc})") from exc
        if manifest is not None and manifest.base_model.sha256 != self.base_fingerprint:
            raise AdapterLoadError(
                f"adapter {adapter.key} was trained on base {manifest.base_model.id!r} "
                f"(sha256 {manifest.base_model.sha256[:12]}…), not on the base this server runs"
            )
        try:
            weights = load_adapter(adapter.path, self.engine.hf_config)
            # After the format checks (their messages name the problem more precisely) and before the
            # weights reach the engine: only files the manifest vouches for are served.
            adapter.verify()
            slot = self.engine.load_adapter_weights(adapter.key, weights, adapter.path)
            return slot, manifest
        except OSError as exc:
            log.error("adapter %s: cannot read its files: %s", adapter.key, exc)
            raise AdapterLoadError(
                f"adapter {adapter.key}: its files cannot be read ({exc.strerror})"
            ) from exc
        except (AdapterFormatError, IntegrityError, ValueError) as exc:
            raise AdapterLoadError(f"adapter {adapter.key}: {exc}") from exc

    def _retire(self, resident: _Resident) -> None:
        """Stop serving a stale version to new requests; drop it now, or when its last request
        releases it."""
        del self._current[resident.adapter.key]
        if resident.pins == 0:
            self._evict(resident.slot)

    def _evict(self, slot: int) -> None:
        resident = self._resident.pop(slot)
        if self._current.get(resident.adapter.key) == slot:
            del self._current[resident.adapter.key]
        self.engine.free_adapter_weights(slot)
        log.info("evicted adapter %s (slot %d)", resident.adapter.key, slot)
        self._set_loaded_gauge()

    def _set_loaded_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.loaded_adapters.set(len(self._resident))

    # -- management (vLLM's load/unload endpoints, /v1/models) ----------------------------------
    async def load(self, name: str, path: str | None = None) -> AdapterStatus:
        """Load ``name`` now: its LATEST, or the version whose folder ``path`` names.

        ``path`` (vLLM's ``lora_path``) must be on the volume: ``<volume>/<name>`` or
        ``<volume>/<name>/v3``, absolute or relative to the volume root (never to the server's CWD).
        """
        ref = name
        if path is not None:
            ref = self._ref_from_path(name, path)
        lease = await self.acquire(ref)
        self.release(lease)
        await self.refresh()
        return next(s for s in self.list_models() if s.name == name)

    def _ref_from_path(self, name: str, path: str) -> str:
        if self.volume.storage.local_root is None:
            return self._ref_from_key(name, path)
        root = self.volume.root.resolve()
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if root not in resolved.parents:
            raise InvalidAdapterName(f"lora_path {path!r} is outside the adapters volume")
        parts = resolved.relative_to(root).parts
        if parts[0] != name or len(parts) > 2:
            raise InvalidAdapterName(f"lora_path {path!r} is not the folder of adapter {name!r}")
        return name if len(parts) == 1 else f"{name}@{parts[1]}"

    def _ref_from_key(self, name: str, path: str) -> str:
        """On an object store ``lora_path`` is relative to the prefix: ``name`` or ``name/vN``."""
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts or parts[0] != name or len(parts) > 2 or ".." in parts:
            raise InvalidAdapterName(
                f"lora_path {path!r} is not the folder of adapter {name!r} "
                f"(on {self.volume.location} use {name!r} or '{name}/vN')"
            )
        return name if len(parts) == 1 else f"{name}@{parts[1]}"

    async def unload(self, name: str) -> None:
        async with self._lock:
            slots = [slot for slot, r in self._resident.items() if r.adapter.name == name]
            if not slots:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            for slot in slots:
                resident = self._resident[slot]
                if resident.pins:
                    raise AdaptersBusy(
                        f"adapter {resident.adapter.key} is serving requests; retry when they finish"
                    )
                self._evict(slot)

    def list_models(self) -> list[AdapterStatus]:
        loaded = {r.adapter.name for r in self._resident.values()}
        return [
            AdapterStatus(
                name=a.name,
                versions=a.versions,
                latest=a.latest,
                plain=a.plain,
                loaded=a.name in loaded,
                load_error=self._errors.get(a.name),
            )
            for a in self._listing
        ]

    def known(self, name: str) -> bool:
        return any(a.name == name for a in self._listing)
