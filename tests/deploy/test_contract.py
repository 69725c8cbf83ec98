"""The deployment contract, run: each compose service and Kubernetes workload as a local process.

The command is the image's ENTRYPOINT (from the Dockerfile) plus the service's arguments, the
environment is the image's ENV plus the service's, and container paths map to scratch folders
(/adapters, /data, /config, /tmp), to the host's model cache, or to what the Dockerfile copies into
the image. Only what a user would add on top is added: a tiny random base model (through the env file
or an env entry) and `--max-steps 2`, so each run takes seconds. The training command publishes an
adapter; the serving command serves it on 127.0.0.1, its health probe passes with the API key, and the
official openai client lists the adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from lorayard.base_model import cache_dir
from lorayard.testing.server import free_port
from lorayard.volume import AdapterVolume

from .conftest import (
    REPO,
    ImageRuntime,
    compose_config,
    container,
    find,
    image_runtime,
    kustomize,
)

FAST = ["--max-steps", "2"]
READY_TIMEOUT_S = 120
pytestmark = pytest.mark.timeout(300)


@dataclass
class Sandbox:
    """Container paths -> host paths for one run."""

    root: Path
    paths: dict[str, Path]

    @classmethod
    def create(cls, root: Path, dockerfile: str) -> Sandbox:
        paths = {
            "/adapters": root / "adapters",
            "/data": root / "data",
            "/config": root / "config",
            "/tmp": root / "tmp",
            image_runtime(dockerfile).workdir: root / "home",
            # converted at build time in the image; here once per machine
            "/opt/lorayard/cache": cache_dir(),
        }
        # what the Dockerfile's runtime stage copies from the build context
        paths.update({target: REPO / source for target, source in image_runtime(dockerfile).copies.items()})
        for path in paths.values():
            path.mkdir(parents=True, exist_ok=True)
        return cls(root, paths)

    def host(self, value: str) -> str:
        """A container path (or a value that is one) as its host path; other values unchanged."""
        for prefix in sorted(self.paths, key=len, reverse=True):
            if value == prefix or value.startswith(prefix + "/"):
                return str(self.paths[prefix]) + value[len(prefix) :]
        return value

    def host_paths_in(self, value: Any) -> Any:
        """Every string in a parsed YAML document mapped (a config file naming container paths)."""
        if isinstance(value, dict):
            return {k: self.host_paths_in(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.host_paths_in(v) for v in value]
        return self.host(value) if isinstance(value, str) else value

    def check_mounts(self, targets: list[str]) -> None:
        unknown = [t for t in targets if t not in self.paths]
        assert not unknown, f"mounts this test does not map yet: {unknown}"


def process_env(
    image: ImageRuntime,
    service_env: Mapping[str, str],
    sandbox: Sandbox,
    *,
    host_env: Mapping[str, str],
    port: int | None = None,
) -> dict[str, str]:
    """The container's environment, paths mapped, listening on loopback; ``host_env`` (values that
    are host paths already, such as the tiny base) goes on top unmapped."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(sandbox.paths[image.workdir]),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1",
        # the image's code is this checkout (not whichever one the venv has installed)
        "PYTHONPATH": str(REPO),
    }
    for key, value in {**image.env, **service_env}.items():
        if key not in {"PATH", "VIRTUAL_ENV"}:  # the image's venv is this interpreter's
            env[key] = sandbox.host(value)
    env.update(host_env)
    env["OMP_NUM_THREADS"] = "1"  # the suite shares two cores
    if port is not None:
        assert env["LORAYARD_HOST"] == "0.0.0.0" and env["LORAYARD_PORT"] == "8000"
        env["LORAYARD_HOST"] = "127.0.0.1"
        env["LORAYARD_PORT"] = str(port)
        env["LORAYARD_BASE_URL"] = env["LORAYARD_BASE_URL"].replace(":8000", f":{port}")
    return env


def _host_program(program: str) -> str:
    """The image's ``python`` is this interpreter; its console scripts (``lorayard``) sit beside it."""
    if program == "python":
        return sys.executable
    script = Path(sys.executable).with_name(program)
    assert script.is_file(), f"{program}: not installed beside {sys.executable} (make install)"
    return str(script)


def command(image: ImageRuntime, args: list[str], sandbox: Sandbox) -> list[str]:
    entrypoint = [*image.entrypoint, *image.cmd] if not args else [*image.entrypoint, *args]
    return [_host_program(entrypoint[0]), *(sandbox.host(a) for a in entrypoint[1:])]


def run_training(image: ImageRuntime, args: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    done = subprocess.run(
        command(image, args, sandbox),
        env=env,
        cwd=sandbox.paths[image.workdir],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def probe(probe_command: list[str], env: dict[str, str], sandbox: Sandbox) -> int:
    assert probe_command[0] == "python"
    return subprocess.run(
        [sys.executable, *probe_command[1:]],
        env=env,
        cwd=sandbox.root,
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


@contextmanager
def serving(
    image: ImageRuntime, args: list[str], env: dict[str, str], sandbox: Sandbox, probe_command: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the server; yield once its health probe passes; SIGTERM must drain and exit 0."""
    log = (sandbox.root / "server.log").open("wb")
    server = subprocess.Popen(
        command(image, args, sandbox), env=env, cwd=sandbox.paths[image.workdir], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while probe(probe_command, env, sandbox) != 0:
            assert server.poll() is None, (sandbox.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the health probe never passed"
            time.sleep(0.5)
        yield server
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (sandbox.root / "server.log").read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def listed_models(port: int, api_key: str) -> set[str]:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
    return {model.id for model in client.models.list()}


def env_file(text: str) -> dict[str, str]:
    """compose's env_file format: KEY=VALUE lines, # comments."""
    pairs = (line.partition("=") for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, _, value in pairs}


# -- docker compose ------------------------------------------------------------------------------------


def test_compose_train_then_serve(tmp_path, tiny_base_dir):
    services = compose_config("compose.yaml", profiles=("train",))["services"]
    train, serve = services["train"], services["serve"]
    train_image, serve_image = image_runtime("Dockerfile.train"), image_runtime("Dockerfile.serve")
    sandbox = Sandbox.create(tmp_path, "Dockerfile.train")
    sandbox.check_mounts([m["target"] for s in (train, serve) for m in s["volumes"]])
    # the user's .env, from .env.example: an API key, and (for speed) the tiny base
    dotenv = (REPO / ".env.example").read_text()
    dotenv = dotenv.replace("# LORAYARD_API_KEY=change-me", "LORAYARD_API_KEY=compose-key")
    dotenv = dotenv.replace(
        "# LORAYARD_BASE_MODEL=smollm2-135m-instruct", f"LORAYARD_BASE_MODEL={tiny_base_dir}"
    )
    user_env = env_file(dotenv)
    assert set(user_env) == {"LORAYARD_API_KEY", "LORAYARD_BASE_MODEL"}

    # `docker compose run --rm train`: the default (demo) run
    train_env = process_env(train_image, train["environment"], sandbox, host_env=user_env)
    assert train["command"] is None
    run_training(train_image, FAST, train_env, sandbox)
    # `docker compose run --rm train --name support --data /data/support.jsonl`: a user's dataset
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Ticket {i}?"},
                {"role": "assistant", "content": f"Ok {i}."},
            ]
        }
        for i in range(12)
    ]
    (sandbox.paths["/data"] / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    user_args = ["--name", "support", "--data", "/data/support.jsonl"]
    run_training(train_image, [*user_args, *FAST], train_env, sandbox)

    volume = AdapterVolume(sandbox.paths["/adapters"])
    assert volume.latest("persona") == 1 and volume.latest("support") == 1

    # `docker compose up serve`, probed by its healthcheck
    port = free_port()
    serve_env = process_env(serve_image, serve["environment"], sandbox, host_env=user_env, port=port)
    healthcheck = serve["healthcheck"]["test"]
    assert healthcheck[0] == "CMD"
    with serving(serve_image, [], serve_env, sandbox, healthcheck[1:]):
        assert {"persona", "support"} <= listed_models(port, "compose-key")
        # /ready needs the key: the probe passes because it sends it
        keyless = {k: v for k, v in serve_env.items() if k != "LORAYARD_API_KEY"}
        assert probe(healthcheck[1:], keyless, sandbox) != 0


# -- Kubernetes ----------------------------------------------------------------------------------------


def _mount_targets(pod: dict[str, Any], name: str) -> list[str]:
    return [m["mountPath"] for m in container(pod, name)["volumeMounts"]]


def _plain_env(box: dict[str, Any], secrets: Mapping[str, str]) -> dict[str, str]:
    env = {}
    for entry in box.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            if f"{ref['name']}/{ref['key']}" in secrets:
                env[entry["name"]] = secrets[f"{ref['name']}/{ref['key']}"]
    return env


def test_kubernetes_job_then_deployment(tmp_path, tiny_base_dir, overlay_builds):
    resources = overlay_builds["cpu"]
    job_pod = find(resources, "Job")["spec"]["template"]["spec"]
    serve_pod = find(resources, "Deployment")["spec"]["template"]["spec"]
    train_box, serve_box = container(job_pod, "train"), container(serve_pod, "serve")
    assert "command" not in train_box and "command" not in serve_box  # the images' ENTRYPOINTs
    train_image, serve_image = image_runtime("Dockerfile.train"), image_runtime("Dockerfile.serve")
    sandbox = Sandbox.create(tmp_path, "Dockerfile.train")
    sandbox.check_mounts(_mount_targets(job_pod, "train") + _mount_targets(serve_pod, "serve"))
    # the ConfigMap volume, as the kubelet would project it (container paths in it mapped)
    config_map = find(resources, "ConfigMap", "lorayard-train")
    for key, text in config_map["data"].items():
        config = sandbox.host_paths_in(yaml.safe_load(text))
        (sandbox.paths["/config"] / key).write_text(yaml.safe_dump(config))
    # a user's overlay would add this env entry; here it keeps the run fast
    user_env = {"LORAYARD_BASE_MODEL": str(tiny_base_dir)}

    train_env = process_env(train_image, _plain_env(train_box, {}), sandbox, host_env=user_env)
    run_training(train_image, [*train_box["args"], *FAST], train_env, sandbox)
    assert AdapterVolume(sandbox.paths["/adapters"]).latest("persona") == 1

    port = free_port()
    secrets = {"lorayard-api-key/api-key": "k8s-key"}
    serve_env = process_env(
        serve_image, _plain_env(serve_box, secrets), sandbox, host_env=user_env, port=port
    )
    startup_probe = serve_box["startupProbe"]["exec"]["command"]
    with serving(serve_image, serve_box.get("args", []), serve_env, sandbox, startup_probe):
        assert probe(serve_box["readinessProbe"]["exec"]["command"], serve_env, sandbox) == 0
        liveness = serve_box["livenessProbe"]["httpGet"]
        assert httpx.get(f"http://127.0.0.1:{port}{liveness['path']}").status_code == 200
        assert "persona" in listed_models(port, "k8s-key")


# -- adapters on an object store (moto's S3 server stands in for S3 / MinIO) ---------------------------


def _ensure_bucket(location: str) -> str:
    import boto3

    bucket = location.removeprefix("s3://").partition("/")[0]
    client = boto3.client("s3")
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return bucket


def test_kubernetes_s3_overlay_job_then_deployment(tmp_path, tiny_base_dir, s3_endpoint):
    resources = kustomize(REPO / "k8s" / "overlays" / "s3")
    job_pod = find(resources, "Job")["spec"]["template"]["spec"]
    serve_pod = find(resources, "Deployment")["spec"]["template"]["spec"]
    train_box, serve_box = container(job_pod, "train"), container(serve_pod, "serve")
    train_image, serve_image = image_runtime("Dockerfile.train"), image_runtime("Dockerfile.serve")
    sandbox = Sandbox.create(tmp_path, "Dockerfile.train")
    sandbox.paths["/cache"] = tmp_path / "cache"  # the server's emptyDir download cache
    sandbox.check_mounts(_mount_targets(job_pod, "train") + _mount_targets(serve_pod, "serve"))
    for key, text in find(resources, "ConfigMap", "lorayard-train")["data"].items():
        config = sandbox.host_paths_in(yaml.safe_load(text))
        (sandbox.paths["/config"] / key).write_text(yaml.safe_dump(config))
    # the `lorayard-s3` Secret a user creates (on EKS, IRSA instead); the endpoint is the test's S3
    secrets = {
        "lorayard-s3/AWS_ACCESS_KEY_ID": "testing",
        "lorayard-s3/AWS_SECRET_ACCESS_KEY": "testing",
        "lorayard-s3/AWS_ENDPOINT_URL": s3_endpoint,
        "lorayard-s3/AWS_REGION": "us-east-1",
        "lorayard-api-key/api-key": "k8s-key",
    }
    user_env = {"LORAYARD_BASE_MODEL": str(tiny_base_dir)}
    train_env = process_env(train_image, _plain_env(train_box, secrets), sandbox, host_env=user_env)
    location = train_env["LORAYARD_ADAPTERS_DIR"]
    _ensure_bucket(location)
    run_training(train_image, [*train_box["args"], *FAST], train_env, sandbox)
    assert AdapterVolume(location, cache_dir=tmp_path / "check").latest("persona") == 1
    assert not (sandbox.paths["/adapters"] / "persona").exists()

    port = free_port()
    serve_env = process_env(
        serve_image, _plain_env(serve_box, secrets), sandbox, host_env=user_env, port=port
    )
    with serving(serve_image, [], serve_env, sandbox, serve_box["startupProbe"]["exec"]["command"]):
        assert "persona" in listed_models(port, "k8s-key")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k8s-key", max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="persona", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert reply.headers["x-lorayard-adapter-version"] == "v1"
        assert list(sandbox.paths["/cache"].rglob("manifest.json"))  # served from a verified download


def test_compose_s3_profile_train_then_serve(tmp_path, tiny_base_dir, s3_endpoint):
    services = compose_config("compose.yaml", profiles=("s3", "s3-train"))["services"]
    train, serve = services["train-s3"], services["serve-s3"]
    train_image, serve_image = image_runtime("Dockerfile.train"), image_runtime("Dockerfile.serve")
    sandbox = Sandbox.create(tmp_path, "Dockerfile.train")
    sandbox.check_mounts([m["target"] for s in (train, serve) for m in s.get("volumes", [])])
    user_env = {"LORAYARD_BASE_MODEL": str(tiny_base_dir), "LORAYARD_API_KEY": "compose-key"}

    def container_env(service: dict[str, Any]) -> dict[str, str]:
        env = dict(service["environment"])
        # compose's network resolves `minio`; here the test's S3 answers in its place
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        env["AWS_ENDPOINT_URL"] = s3_endpoint
        return env

    train_env = process_env(train_image, container_env(train), sandbox, host_env=user_env)
    _ensure_bucket(train_env["LORAYARD_ADAPTERS_DIR"])  # what minio-init does
    run_training(train_image, FAST, train_env, sandbox)
    port = free_port()
    serve_env = process_env(serve_image, container_env(serve), sandbox, host_env=user_env, port=port)
    with serving(serve_image, [], serve_env, sandbox, serve["healthcheck"]["test"][1:]):
        assert "persona" in listed_models(port, "compose-key")
