"""deploy/: the container, Compose, Kubernetes and Ray cluster files agree with the CLI and with each other.

Images cannot be built here; these checks keep the files from drifting away from the tested commands.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from fedtune.cli import cli
from fedtune.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _parse_args(command: str, args: list[str]) -> dict[str, Any]:
    """The parameters `fedtune <command>` would run with: unknown options and bad values fail here."""
    click_command = typer.main.get_command(cli).commands[command]  # type: ignore[attr-defined]
    return dict(click_command.make_context(command, list(args)).params)


def _overrides(params: dict[str, Any]) -> list[str]:
    return list(params.get("set_") or [])


def _num_clients(overrides: list[str]) -> int:
    values = [item.split("=", 1)[1] for item in overrides if item.startswith("federation.num_clients=")]
    assert len(values) == 1, overrides
    return int(values[0])


def test_compose_clients_have_distinct_partitions_and_their_own_volumes() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    server = _parse_args("server", services["server"]["command"])
    config = re.sub(r"\$\{FEDTUNE_CONFIG:-(.*)\}", r"\1", str(server["config"]))
    assert config == "/configs/quickstart.yaml"  # ../configs is mounted at /configs
    load_config(REPO / "configs" / "quickstart.yaml", _overrides(server))
    n = _num_clients(_overrides(server))

    clients = {name: spec for name, spec in services.items() if name.startswith("client-")}
    assert len(clients) == n == 3
    partitions, caches, data = set(), set(), set()
    for spec in clients.values():
        params = _parse_args("client", spec["command"])
        assert params["server"] == "server:9092" and params["num_partitions"] == n
        assert str(params["cache_dir"]) == "/cache" and str(params["data"]) == "/data"
        partitions.add(params["partition_id"])
        volumes = spec["volumes"]
        caches |= {v.split(":")[0] for v in volumes if isinstance(v, str) and v.endswith(":/cache")}
        data |= {v["source"] for v in volumes if isinstance(v, dict) and v["target"] == "/data"}
        # Clients get the CA certificate, never the folder with the server's key.
        assert [v["source"] for v in volumes if isinstance(v, dict) and v["target"].startswith("/certs")] == [
            "${FEDTUNE_CERTS:-./certs}/ca.crt"]
    assert partitions == set(range(n))
    assert len(caches) == len(data) == n
    assert caches <= set(compose["volumes"])


def _k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if doc]


def test_kubernetes_replicas_partitions_and_num_clients_agree() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    documents = [doc for name in kustomization["resources"] for doc in _k8s(name)]
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    job = by_kind[("Job", "fedtune-server")]["spec"]["template"]["spec"]
    server = _parse_args("server", job["containers"][0]["args"])
    load_config(REPO / str(server["config"]).removeprefix("/app/"), _overrides(server))
    n = _num_clients(_overrides(server))

    statefulset = by_kind[("StatefulSet", "fedtune-client")]["spec"]
    container = statefulset["template"]["spec"]["containers"][0]
    assert statefulset["replicas"] == n
    env = {e["name"]: e for e in container["env"]}
    ordinal = "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["PARTITION_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == ordinal
    args = [arg.replace("$(PARTITION_ID)", "0") for arg in container["args"]]
    params = _parse_args("client", args)
    assert params["num_partitions"] == n and str(params["cache_dir"]) == "/cache"
    service = by_kind[("Service", "fedtune-server")]
    assert params["server"] == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert [t["metadata"]["name"] for t in statefulset["volumeClaimTemplates"]] == ["cache", "data"]
    secrets = {v["secret"]["secretName"] for v in statefulset["template"]["spec"]["volumes"] if "secret" in v}
    assert secrets == {"fedtune-ca"}


def test_dockerfile_runs_the_cli_with_existing_files() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.MULTILINE)
    assert targets == ["base", "server", "client"]
    assert '"fedtune", "server"]' in dockerfile and '"fedtune", "client"]' in dockerfile
    server_cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", dockerfile.split("AS server")[1], re.MULTILINE)[1])
    server = _parse_args("server", server_cmd)
    load_config(REPO / str(server["config"]).removeprefix("/app/"), _overrides(server))
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", "certs", "**/*.key", ".git"} <= set(ignored)


def test_ray_cluster_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["min_workers"] == config["max_workers"]


@pytest.mark.parametrize("name", ["compose.yaml", "ray-cluster.yaml", "k8s/server.yaml", "k8s/clients.yaml",
                                  "k8s/kustomization.yaml", "k8s/runs-reader.yaml"])
def test_deploy_yaml_parses(name: str) -> None:
    assert all(doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()))
