"""compose.yaml (+ compose.gpu.yaml): the real Compose v2 parser and the compose-spec JSON schema."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import (
    COMPOSE_FILES,
    REPO,
    compose_binary,
    compose_config,
    image_runtime,
    run_tool,
    venv_tool,
)

VARIANTS = [
    (("compose.yaml",), ()),
    (("compose.yaml",), ("train",)),
    (("compose.yaml",), ("monitoring",)),
    (("compose.yaml", "compose.gpu.yaml"), ()),
    (("compose.yaml", "compose.gpu.yaml"), ("train", "monitoring")),
    (("compose.yaml",), ("s3",)),
    (("compose.yaml",), ("s3", "s3-train")),
]


@pytest.mark.parametrize(("files", "profiles"), VARIANTS)
def test_compose_config_is_valid(files, profiles):
    args = [compose_binary()]
    for name in files:
        args += ["-f", name]
    for profile in profiles:
        args += ["--profile", profile]
    run_tool([*args, "config", "-q"])


def test_compose_files_match_the_compose_spec_schema():
    run_tool([venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES])


def test_compose_parser_rejects_a_broken_file(tmp_path):
    """The validation above can fail: an unknown key is an error, not silently dropped."""
    broken = yaml.safe_load((REPO / "compose.yaml").read_text())
    broken["services"]["serve"]["helthcheck"] = broken["services"]["serve"].pop("healthcheck")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    done = subprocess.run(
        [compose_binary(), "-f", "compose.yaml", "config", "-q"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert done.returncode != 0 and b"helthcheck" in done.stderr


def test_plain_up_starts_only_the_server():
    services = compose_config("compose.yaml")["services"]
    assert set(services) == {"serve"}  # train needs `run` (or its profile); monitoring its profile
    assert set(compose_config("compose.yaml", profiles=("monitoring",))["services"]) == {
        "serve",
        "prometheus",
        "grafana",
    }


def test_train_service_contract():
    train = compose_config("compose.yaml", profiles=("train",))["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["dockerfile"] == "Dockerfile.train"
    # the image's ENTRYPOINT, so arguments after `run train` pass through
    assert train["entrypoint"] is None and train["command"] is None
    assert image_runtime("Dockerfile.train").entrypoint == ["lorayard", "train"]
    mounts = {m["target"]: m for m in train["volumes"]}
    assert mounts["/adapters"]["type"] == "volume" and mounts["/adapters"]["source"] == "adapters"
    assert not mounts["/adapters"].get("read_only")
    assert mounts["/data"]["type"] == "bind" and mounts["/data"]["read_only"] is True
    assert mounts["/data"]["source"] == str(REPO / "data")
    assert train["environment"]["LORAYARD_ADAPTERS_DIR"] == "/adapters"


def test_serve_service_contract():
    serve = compose_config("compose.yaml")["services"]["serve"]
    runtime = image_runtime("Dockerfile.serve")
    assert serve["build"]["dockerfile"] == "Dockerfile.serve"
    assert serve["restart"] == "unless-stopped"
    assert [(p["target"], p["published"]) for p in serve["ports"]] == [(8000, "8000")]
    assert serve["environment"]["LORAYARD_PORT"] == runtime.env["LORAYARD_PORT"] == "8000"
    mounts = {m["target"]: m for m in serve["volumes"]}
    assert mounts["/adapters"]["source"] == "adapters" and mounts["/adapters"]["read_only"] is True
    health = serve["healthcheck"]
    assert health["test"] == ["CMD", *runtime.healthcheck]  # /ready, with the API key when one is set
    # SIGTERM drains for LORAYARD_DRAIN_TIMEOUT seconds; compose must wait longer before SIGKILL
    grace = serve["stop_grace_period"]
    assert grace.endswith("s") and grace.startswith("1m")  # 1m15s
    assert int(serve["environment"]["LORAYARD_DRAIN_TIMEOUT"]) < 75


def test_env_file_is_optional_and_feeds_the_api_key(tmp_path):
    raw = yaml.safe_load((REPO / "compose.yaml").read_text())
    for name in ("train", "serve"):
        assert raw["services"][name]["env_file"] == [{"path": ".env", "required": False}]
    # with a .env present (a copy of the project's compose files in a scratch folder) the key arrives
    for name in ("compose.yaml", "compose.gpu.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    example = (REPO / ".env.example").read_text()
    assert "# LORAYARD_API_KEY=" in example  # documented, off by default
    (tmp_path / ".env").write_text(example.replace("# LORAYARD_API_KEY=change-me", "LORAYARD_API_KEY=s3cret"))
    done = run_tool([compose_binary(), "-f", "compose.yaml", "config", "--format", "json"], cwd=tmp_path)
    serve = yaml.safe_load(done.stdout)["services"]["serve"]
    assert serve["environment"]["LORAYARD_API_KEY"] == "s3cret"


def test_gpu_override_reserves_a_gpu_and_builds_cuda_images():
    services = compose_config("compose.yaml", "compose.gpu.yaml", profiles=("train",))["services"]
    for name in ("train", "serve"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
        variant = services[name]["build"]["args"]["TORCH_VARIANT"]
        assert variant.startswith("cu") and services[name]["image"].endswith(f"-{variant}")
    cpu = compose_config("compose.yaml", profiles=("train",))["services"]
    for service in cpu.values():
        assert "deploy" not in service and service["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_monitoring_mounts_exist():
    services = compose_config("compose.yaml", profiles=("monitoring",))["services"]
    for name in ("prometheus", "grafana"):
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
        for mount in services[name]["volumes"]:
            assert mount["read_only"] is True and (REPO / mount["source"]).exists(), mount


def test_s3_profile_serves_from_minio_without_a_shared_volume():
    services = compose_config("compose.yaml", profiles=("s3", "s3-train"))["services"]
    assert set(compose_config("compose.yaml", profiles=("s3",))["services"]) == {
        *("serve", "minio", "minio-init", "serve-s3")  # train-s3 is a one-off job, like train
    }
    minio = services["minio"]
    assert ":" in minio["image"] and not minio["image"].endswith(":latest")
    root_user = minio["environment"]["MINIO_ROOT_USER"]
    root_password = minio["environment"]["MINIO_ROOT_PASSWORD"]
    for name in ("serve-s3", "train-s3"):
        env = services[name]["environment"]
        bucket = env["LORAYARD_ADAPTERS_DIR"].removeprefix("s3://").partition("/")[0]
        assert env["LORAYARD_ADAPTERS_DIR"].startswith("s3://") and bucket
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"  # the standard variable boto3 reads
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (root_user, root_password)
        assert "/adapters" not in {m["target"] for m in services[name].get("volumes", [])}
    assert f"local/{bucket}" in services["minio-init"]["command"][0]  # creates that bucket
    assert services["serve-s3"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    serve, serve_s3 = services["serve"], services["serve-s3"]
    assert serve_s3["healthcheck"] == serve["healthcheck"] and serve_s3["image"] == serve["image"]
    assert [p["published"] for p in serve_s3["ports"]] != [p["published"] for p in serve["ports"]]
