"""Security: the key on every route, names that cannot leave the volume, no pickle, no remote code."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from lorayard.server.app import create_app
from lorayard.server.settings import Settings
from lorayard.volume import ADAPTER_WEIGHTS_FILE

from .conftest import API_KEY, copy_folder, start_server

REPO = Path(__file__).resolve().parents[3]
PUBLIC = {"/health", "/metrics"}  # /metrics: public under --metrics-public (the default)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def secured(tiny_base_dir, tmp_path_factory, tiny_adapter_source):
    root = tmp_path_factory.mktemp("secured")
    volume = root / "adapters"
    volume.mkdir()
    copy_folder(tiny_adapter_source, volume / "ok")
    outside = copy_folder(tiny_adapter_source, root / "outside")
    (volume / "escape").symlink_to(outside)  # a symlink in the volume pointing out of it
    server = start_server(
        ["--adapters-dir", str(volume), "--base-model", str(tiny_base_dir)],
        root / "server.log",
        env={"LORAYARD_API_KEY": API_KEY},
    )
    server.volume = volume
    server.outside = outside
    yield server
    server.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _routes() -> list[tuple[str, str]]:
    """Every API operation of the app's own route table (its OpenAPI paths; no model is loaded).

    FastAPI mounts an included router lazily, so ``app.routes`` does not list our routes one by one;
    the OpenAPI document is generated from the very same table.
    """
    app = create_app(Settings(api_key=API_KEY))
    return [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]


def test_every_route_but_health_and_metrics_requires_the_key(secured):
    routes = _routes()
    assert ("POST", "/v1/chat/completions") in routes and len(routes) >= 8
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = httpx.request(method, secured.base_url + path, json=CHAT, headers=headers, timeout=30)
            if path in PUBLIC:
                assert response.status_code == 200, (method, path)
            else:
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"]["code"] == "invalid_api_key"
    # The route table is not public when the API is not (issue 23.9).
    for page in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(secured.base_url + page).status_code == 401, page
    assert httpx.get(secured.base_url + "/openapi.json", headers=_auth()).status_code == 200
    assert API_KEY not in secured.log()


@pytest.mark.parametrize(
    "body",
    [b"x" * (3 << 20), b"{not json", b'{"messages": 5}'],
    ids=["huge", "invalid-json", "invalid-fields"],
)
def test_the_key_is_checked_before_the_body_is_read(secured, body):
    """Without the key: 401, not 413 for a body over the limit nor 400 for a malformed one."""
    response = httpx.post(
        secured.v1 + "/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("kind", ["symlinked_weights", "symlinked_config"])
def test_files_symlinked_out_of_the_volume_are_refused_never_echoed(secured, tiny_base_dir, tmp_path, kind):
    """Issue 23.9: a plain folder inside the volume whose config or weights is a symlink to a file
    elsewhere is refused (422, naming the file, not its target) and nothing of the file is echoed;
    no client-facing message names a server path."""
    from lorayard.testing.hostile_adapter import build_hostile_adapter

    name = kind.replace("_", "-")
    build_hostile_adapter(kind, tiny_base_dir, secured.volume / name, outside=tmp_path / "elsewhere")
    for _ in range(2):
        response = httpx.post(
            secured.v1 + "/chat/completions", json={**CHAT, "adapter": name}, headers=_auth(), timeout=30
        )
        assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "resolves outside the adapters volume" in message
    listed = httpx.get(secured.v1 + "/models", headers=_auth(), timeout=30).text
    for text in (message, listed):
        assert "SECRET-VALUE" not in text
        assert str(tmp_path) not in text and str(secured.volume) not in text
    ok = httpx.post(
        secured.v1 + "/chat/completions", json={**CHAT, "adapter": "ok"}, headers=_auth(), timeout=30
    )
    assert ok.status_code == 200


def test_metrics_needs_the_key_when_not_public(tiny_base_dir, tmp_path):
    (tmp_path / "adapters").mkdir()
    server = start_server(
        [
            "--adapters-dir",
            str(tmp_path / "adapters"),
            "--base-model",
            str(tiny_base_dir),
            "--no-metrics-public",
        ],
        tmp_path / "log",
        env={"LORAYARD_API_KEY": API_KEY},
    )
    try:
        assert httpx.get(server.base_url + "/metrics").status_code == 401
        assert httpx.get(server.base_url + "/metrics", headers=_auth()).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    "ref", ["../x", "/etc", "..", "ok/../../etc", "escape", "escape@v1", "a/b", "%2e%2e"]
)
def test_adapter_names_cannot_leave_the_volume(secured, ref):
    response = httpx.post(
        secured.v1 + "/chat/completions", json={**CHAT, "adapter": ref}, headers=_auth(), timeout=30
    )
    assert response.status_code == 400, (ref, response.text)
    error = response.json()["error"]
    assert error["param"] == "adapter" and error["code"] == "invalid_adapter_name"
    ok = httpx.post(
        secured.v1 + "/chat/completions", json={**CHAT, "adapter": "ok"}, headers=_auth(), timeout=30
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("name", "path"),
    [("ok", "/etc"), ("ok", "{outside}"), ("escape", "{volume}/escape"), ("ok", "{volume}/../outside")],
)
def test_load_lora_adapter_outside_the_volume_is_400(secured, name, path):
    lora_path = path.format(volume=secured.volume, outside=secured.outside)
    response = httpx.post(
        secured.v1 + "/load_lora_adapter",
        json={"lora_name": name, "lora_path": lora_path},
        headers=_auth(),
        timeout=30,
    )
    assert response.status_code == 400, (lora_path, response.text)
    assert response.json()["error"]["code"] == "invalid_adapter_name"
    inside = httpx.post(
        secured.v1 + "/load_lora_adapter",
        json={"lora_name": "ok", "lora_path": str(secured.volume / "ok")},
        headers=_auth(),
        timeout=30,
    )
    assert inside.status_code == 200, inside.text


class _Booby:
    """Unpickling this creates a marker file: proof that a pickle was (wrongly) executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_adapter_is_refused_never_unpickled(secured, tmp_path):
    marker = tmp_path / "unpickled"
    folder = copy_folder(secured.volume / "ok", secured.volume / "pickled")
    (folder / ADAPTER_WEIGHTS_FILE).unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Booby(marker)))
    try:
        for request in (
            {"url": "/chat/completions", "json": {**CHAT, "adapter": "pickled"}},
            {"url": "/load_lora_adapter", "json": {"lora_name": "pickled"}},
        ):
            response = httpx.post(
                secured.v1 + request["url"], json=request["json"], headers=_auth(), timeout=30
            )
            assert response.status_code == 422, response.text
            message = response.json()["error"]["message"]
            assert "adapter_model.bin is a pickle and is never loaded" in message
        assert not marker.exists(), "the pickle was unpickled"
    finally:
        shutil.rmtree(folder)


def _python_sources() -> list[Path]:
    folders = ("lorayard", "client", "demo", "bench")
    return [p for folder in folders for p in (REPO / folder).rglob("*.py")]


def test_no_trust_remote_code_in_our_sources():
    """No from_pretrained (or anything) is ever called with trust_remote_code=True."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _python_sources()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*True", line)
    ]
    assert not offenders, offenders
    assert len(_python_sources()) > 20  # the scan saw our code


def _deploy_files() -> tuple[list[Path], list[Path], list[Path]]:
    dockerfiles = sorted(REPO.glob("Dockerfile*"))
    compose = [p for p in (REPO / "compose.yaml", REPO / "docker-compose.yaml") if p.is_file()]
    k8s = sorted(p for p in REPO.glob("k8s/**/*.y*ml") if p.is_file())
    return dockerfiles, compose, k8s


def test_containers_run_as_non_root():
    dockerfiles, _, _ = _deploy_files()
    if not dockerfiles:
        pytest.skip("no Dockerfile.* in the repository yet")
    for dockerfile in dockerfiles:
        users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
        assert users, f"{dockerfile.name} sets no USER"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as {users[-1]}"


def _is_server(service_or_container: dict) -> bool:
    command = " ".join(str(c) for c in (service_or_container.get("command") or []))
    args = " ".join(str(c) for c in (service_or_container.get("args") or []))
    text = f"{service_or_container.get('name', '')} {command} {args}"
    return "server" in text or "serve" in text


def test_server_mounts_the_adapters_volume_read_only():
    _, compose, k8s = _deploy_files()
    if not compose and not k8s:
        pytest.skip("no compose.yaml or k8s/ manifests in the repository yet")
    checked = 0
    for file in compose:
        services = yaml.safe_load(file.read_text()).get("services", {})
        for name, service in services.items():
            if not _is_server({**service, "name": name}) or "train" in name:
                continue
            for volume in service.get("volumes", []):
                text = (
                    volume if isinstance(volume, str) else f"{volume.get('target')}:{volume.get('read_only')}"
                )
                if "adapters" in text:
                    checked += 1
                    assert text.endswith(":ro") or text.endswith(":True"), f"{file.name} {name}: {volume}"
    for file in k8s:
        for doc in yaml.safe_load_all(file.read_text()):
            pod = ((doc or {}).get("spec", {}).get("template", {}) or {}).get("spec", {})
            for container in pod.get("containers", []):
                if not _is_server(container) or "train" in container.get("name", ""):
                    continue
                for mount in container.get("volumeMounts", []):
                    if mount.get("$patch") == "delete":
                        continue  # a kustomize patch removing the mount (k8s/components/s3), not a mount
                    if "adapters" in mount.get("name", "") + mount.get("mountPath", ""):
                        checked += 1
                        assert mount.get("readOnly") is True, f"{file.name}: {mount}"
    assert checked, "found no adapters volume mount on a server to check"
