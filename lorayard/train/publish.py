"""Publishing: save in PEFT's format, check the server can load it, stage, rename into place.

Order matters: everything is written into a staging folder on the volume, the base's architecture is
checked with the server's own support test (:func:`lorayard.architectures.architecture_for`), the
staged adapter is read back through :func:`lorayard.adapter_files.load_adapter` (the server's own
loader) against the base config, and only then :meth:`AdapterVolume.publish` renames it to the next
``v<N>`` and moves ``LATEST``. Any failure before the rename leaves the volume as it was.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorayard.adapter_files import AdapterFormatError, load_adapter
from lorayard.architectures import Architecture, UnsupportedArchitecture, architecture_for
from lorayard.volume import (
    AdapterVolume,
    BaseModelRef,
    DatasetRef,
    Manifest,
    ResolvedAdapter,
    read_manifest,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig

    from lorayard.train.evaluate import EvalReport

COMPARED_METRIC = "eval_loss"
"""The manifest metric --publish-if-better compares (lower is better)."""
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "lorayard")


class NotBetterError(Exception):
    """--publish-if-better: the new adapter's validation loss is not better than LATEST's."""


class ServingCheckError(Exception):
    """The staged adapter would not load in the server; nothing was published."""


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_better(volume: AdapterVolume, name: str, new_loss: float) -> None:
    """Raise NotBetterError when ``name``'s LATEST records a lower (better) validation loss."""
    latest = volume.latest(name)
    if latest is None:
        return
    manifest = read_manifest(volume.resolve(f"{name}@v{latest}").path)
    old_loss = manifest.metrics.get(COMPARED_METRIC)
    if isinstance(old_loss, int | float) and new_loss > old_loss:
        raise NotBetterError(
            f"not publishing {name}: validation loss {new_loss:.4f} is worse than LATEST v{latest}'s "
            f"{old_loss:.4f} (drop --publish-if-better to publish anyway)"
        )


def save_adapter(model: PeftModel, folder: Path) -> None:
    """PEFT's own save_pretrained (adapter_config.json + adapter_model.safetensors), nothing else."""
    model.save_pretrained(str(folder), safe_serialization=True)
    # PEFT adds a placeholder model card; the manifest and eval.json say what matters.
    (folder / "README.md").unlink(missing_ok=True)
    for file in folder.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; a server running as another user must read it


def check_base_servable(base_config: PretrainedConfig) -> Architecture:
    """The server's support test for the base: ServingCheckError (saying why) when it would refuse it.

    The training job runs it before training (so no run is wasted) and again before publishing.
    """
    try:
        return architecture_for(base_config)
    except UnsupportedArchitecture as exc:
        raise ServingCheckError(f"the server cannot serve this base: {exc}") from exc


def check_serving_compatible(folder: Path, base_config: PretrainedConfig) -> None:
    """Check the base and load the staged files exactly as the server will; refuse what it would."""
    check_base_servable(base_config)
    try:
        load_adapter(folder, base_config)
    except AdapterFormatError as exc:
        raise ServingCheckError(f"the trained adapter would not load in the server: {exc}") from exc


def build_manifest(
    *,
    name: str,
    base_id: str,
    base_sha256: str,
    datasets: list[DatasetRef],
    config: dict[str, Any],
    report: EvalReport,
    extra_metrics: dict[str, Any],
    prompt_template: str | None = None,
    tool_format: str | None = None,
) -> Manifest:
    return Manifest(
        name=name,
        version=0,  # publish() writes the real number
        base_model=BaseModelRef(id=base_id, sha256=base_sha256),
        datasets=datasets,
        config=config,
        metrics={**report.manifest_metrics(), **extra_metrics},
        library_versions=library_versions(),
        prompt_template=prompt_template,
        tool_format=tool_format,
    )


def publish_adapter(
    volume: AdapterVolume,
    model: PeftModel,
    base_config: PretrainedConfig,
    manifest: Manifest,
    report: EvalReport,
    *,
    if_better: bool,
) -> ResolvedAdapter:
    """Stage, check, publish; returns the published version. Raises NotBetterError/ServingCheckError."""
    from lorayard.train.evaluate import write_report

    if if_better:
        check_better(volume, manifest.name, report.adapter.loss)
    with volume.staging(manifest.name) as staged:
        save_adapter(model, staged)
        check_serving_compatible(staged, base_config)
        write_report(report, staged)
        return volume.publish(staged, manifest)
