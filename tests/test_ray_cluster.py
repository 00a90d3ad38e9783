"""`federation.ray_address`: a simulation that runs its virtual clients on an existing Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.client.task import SHARED_CACHE
from fedtune.config import ConfigError, load_config
from fedtune.report import RunDirectory
from fedtune.simulation import simulate

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
HEAD_START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RayHead:
    address: str
    cache: Path  # FEDTUNE_CACHE_DIR in the head's environment only


def _processes_under(temp_dir: str) -> list[int]:
    """Ray processes of this head: each names its session folder, under our own temp dir, on its command line."""
    found = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split() if int(pid) != os.getpid()]


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    """A one-node Ray cluster started the way deploy/README.md says, stopped whatever the test does.

    `ray stop` would stop every Ray on this machine (other users' included), so the head runs with
    --block in a session of its own, and SIGTERM to it stops the processes it started. Its temp dir
    is short (Unix socket paths are limited to about 107 bytes) and private, so that no other
    `ray.init()` on this machine finds this cluster through /tmp/ray/ray_current_cluster.
    """
    assert RAY.is_file(), f"the ray CLI (it comes with the ray dependency) is not at {RAY}"
    temp_dir = tempfile.mkdtemp(prefix="fedtune-ray-", dir="/tmp")
    port = _free_port()
    cache = tmp_path / "head-cache"
    env = {**os.environ, "FEDTUNE_CACHE_DIR": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp_dir) / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--ray-client-server-port", str(_free_port()), "--num-cpus", "2", "--include-dashboard=false",
             "--temp-dir", temp_dir, "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield RayHead(address=f"127.0.0.1:{port}", cache=cache)
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        # Whatever outlived its parent (a worker mid-shutdown): ours by the temp dir on its command line.
        for pid in _processes_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


# Run in a separate driver, attached to the head: the GCS keeps every job and actor the cluster ran.
# (ray.util.state would need the dashboard, which this head runs without.)
_CLUSTER_RECORD = """
import json, sys
import ray
import ray._private.state as state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
jobs = [{"JobID": j["JobID"], "DriverPid": j["DriverPid"], "IsDead": j["IsDead"]} for j in state.jobs()]
actors = [{"JobID": a["JobID"], "ActorClassName": a["ActorClassName"]} for a in state.actors().values()]
print(json.dumps({"jobs": jobs, "actors": actors}))
ray.shutdown()
"""


def test_simulation_runs_its_clients_on_the_existing_cluster(
    tmp_path: Path, ray_head: RayHead, isolated_cache: Path
) -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "data.image_size=32", "federation.num_clients=2", "federation.rounds=1", "train.unfreeze=[]",
        f"federation.ray_address={ray_head.address}", f"output.dir={tmp_path / 'runs'}",
    ])
    outcome = simulate(cfg)

    history = RunDirectory.load_history(outcome.run_dir / "history.json")
    assert [r.round for r in history] == [0, 1]
    assert history[1].clients_ok == 2
    # The clients ran in the cluster's workers: they cached the backbone where the head's
    # environment says, not where this process's does.
    assert [p.name for p in ray_head.cache.iterdir()] == [SHARED_CACHE]
    assert len(list((ray_head.cache / SHARED_CACHE / "models").glob("*.safetensors"))) == 1
    assert not isolated_cache.exists()

    record = subprocess.run([sys.executable, "-c", _CLUSTER_RECORD, ray_head.address],
                            capture_output=True, text=True, timeout=60)
    assert record.returncode == 0, record.stderr[-3000:]
    cluster = json.loads(record.stdout.strip().splitlines()[-1])
    # This test process was the driver of a finished job on that cluster, whose actors were
    # Flower's virtual-client actors.
    ours = [job for job in cluster["jobs"] if job["DriverPid"] == os.getpid()]
    assert len(ours) == 1 and ours[0]["IsDead"], cluster["jobs"]
    actors = [a for a in cluster["actors"] if a["JobID"] == ours[0]["JobID"]]
    assert actors and {a["ActorClassName"] for a in actors} == {"ClientAppActor"}, actors


@pytest.mark.parametrize(
    ("address", "hint"),
    [
        ("ray://10.0.0.5:10001", "Ray Client addresses (ray://...) are not supported"),
        ("local", "leave ray_address unset"),
        ("10.0.0.5", "must be 'auto' or HOST:PORT"),
        ("10.0.0.5:port", "must be 'auto' or HOST:PORT"),
        ("10.0.0.5:70000", "must be 'auto' or HOST:PORT"),
        (":6379", "must be 'auto' or HOST:PORT"),
        ("::1:6379", "[fd00::5]:6379"),
        ("head node:6379", "must be 'auto' or HOST:PORT"),
    ],
)
def test_a_bad_ray_address_names_the_key(tmp_path: Path, address: str, hint: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(f"federation:\n  ray_address: {json.dumps(address)}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "federation.ray_address:" in message and hint in message and repr(address) in message


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "head-0.cluster.local:6379", "[fd00::5]:6379"])
def test_good_ray_addresses_are_kept(tmp_path: Path, address: str | None) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(f"federation:\n  ray_address: {json.dumps(address)}\n")
    assert load_config(path).federation.ray_address == address
