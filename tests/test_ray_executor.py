"""The `ray` executor on a local Ray instance bound to 127.0.0.1: runs equal the local executor's, bit for bit,
and a Ray worker that dies fails the stage at once, naming the run."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from pipeline.data.catalog import dataset_spec
from pipeline.orchestration.config import parse_params
from pipeline.orchestration.executors import ExecutorParams, Job, RayExecutor, WorkerDied, local_ray_environment
from pipeline.orchestration.runs import LoadedDataset
from pipeline.orchestration.teachers import train_teachers
from pipeline.tracking.recording import RecordingTracker
from tests.conftest import REPO, free_port, shrunk_params, shrunk_raw, synthetic_dataset, synthetic_split

import torch


@pytest.fixture(scope="module")
def local_ray():
    local_ray_environment(os.environ)
    import ray

    # a private instance, whatever cluster another test started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    # every Ray server of the instance listens on the loopback address only
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield ray
    ray.shutdown()


def _loaded() -> LoadedDataset:
    split = synthetic_split()
    return LoadedDataset(dataset_spec("av_digits"), synthetic_dataset(), {0: split, 1: split})


def test_ray_runs_equal_the_local_executor_s(tmp_path, local_ray):
    torch.set_num_threads(1)
    loaded = _loaded()
    local_tracker, ray_tracker = RecordingTracker(), RecordingTracker()
    local = train_teachers(shrunk_params(seeds=(0, 1), workers=2), loaded, tmp_path / "local", local_tracker)
    raw = shrunk_raw(seeds=(0, 1), workers=2)
    raw["executor"]["kind"] = "ray"
    rayed = train_teachers(parse_params(raw), loaded, tmp_path / "ray", ray_tracker)
    assert [dataclasses.replace(r, cost={}) for r in local] == [dataclasses.replace(r, cost={}) for r in rayed]
    for seed in (0, 1):
        for role in ("mm", "m1", "m2"):
            assert ((tmp_path / "local" / f"seed{seed}" / f"{role}.pt").read_bytes()
                    == (tmp_path / "ray" / f"seed{seed}" / f"{role}.pt").read_bytes()), (seed, role)
    # MLflow logging stays in this process: every run came back recorded, in job order, with its real times
    assert [r.name for r in ray_tracker.runs] == [r.name for r in local_tracker.runs]
    assert all(r.end_ms - r.start_ms > 10 for r in ray_tracker.runs)


_FRESH_STAGE = """
import json, os, torch
from pipeline.orchestration.executors import ExecutorParams, Job, RayExecutor
executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
(outcome,) = executor.execute([Job("a/seed0", lambda tracker: os.getpid())], [0])
import ray
print(json.dumps({"ran_elsewhere": outcome.result != os.getpid(), "gcs": ray.get_runtime_context().gcs_address,
                  "nodes": sorted({node["NodeManagerAddress"] for node in ray.nodes()})}))
ray.shutdown()
"""


def test_a_stage_s_private_instance_listens_on_the_loopback_only():
    """As a stage runs it: a fresh process, no Ray setting in its environment, Ray first imported by the executor
    (the settings Ray reads at import must be set before; the fixture above sets them itself, so it cannot show
    this)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", _FRESH_STAGE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ran_elsewhere"] and seen["nodes"] == ["127.0.0.1"] and seen["gcs"].startswith("127.0.0.1:"), seen


def test_a_dead_ray_worker_fails_the_stage_at_once(local_ray):
    executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
    started = time.monotonic()
    # a closure, not a module function: cloudpickle sends it by value (Ray workers cannot import tests/)
    suicide = lambda tracker: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    with pytest.raises(WorkerDied, match=r"run b/seed1: its Ray worker died"):
        list(executor.execute([Job("b/seed1", suicide)], [0]))
    assert time.monotonic() - started < 60


def test_an_address_where_nothing_listens_is_one_line_at_once(monkeypatch):
    """Ray's client retries an unreachable head for minutes; the stage says so in one line within seconds."""
    import ray

    from pipeline.orchestration.executors import RayUnreachable

    monkeypatch.setattr(ray, "is_initialized", lambda: False)   # whatever instance an earlier test left up
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
    started = time.monotonic()
    with pytest.raises(RayUnreachable, match=rf"^executor\.kind ray: 127\.0\.0\.1:{port}: nothing answers at "
                                             rf"127\.0\.0\.1:{port} .*`ray start --head`") as err:
        executor._connect()
    assert "\n" not in str(err.value) and time.monotonic() - started < 10


def test_an_unreachable_cluster_is_one_line_naming_the_address_and_the_token(monkeypatch):
    """A head that listens but refuses the client (Ray 2.60's `ray start` enables token authentication, and a
    client without it is refused) stops the stage with one line, not Ray's traceback."""
    import socket

    import ray

    from pipeline.orchestration.executors import RayUnreachable

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
        with pytest.raises(RayUnreachable, match=rf"^executor\.kind ray: {address}: no Ray cluster answered .*"
                                                 r"RAY_AUTH_MODE=token") as err:
            executor._connect()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("address, endpoint, loopback", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379), True),
    ("localhost:6379", ("localhost", 6379), True),
    ("ray://127.0.0.2:10001", ("127.0.0.2", 10001), True),
    ("[::1]:6379", ("::1", 6379), True),
    ("10.0.0.5:6379", ("10.0.0.5", 6379), False),
    ("head.cluster:6379", ("head.cluster", 6379), False),
    ("auto", None, False),
])
def test_cluster_addresses_are_parsed_and_loopback_ones_recognised(address, endpoint, loopback):
    from pipeline.orchestration.executors import cluster_endpoint, is_loopback

    assert cluster_endpoint(address) == endpoint
    assert (endpoint is not None and is_loopback(endpoint[0])) == loopback


@pytest.mark.parametrize("address, expected", [("127.0.0.1:6379", "0"), ("192.0.2.7:6379", None)])
def test_a_cluster_on_the_loopback_is_reached_on_the_loopback(monkeypatch, address, expected):
    """Ray rewrites a client's 127.0.0.1 to the machine's network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is 0 (read when Ray is imported), and a cluster started with `--node-ip-address=127.0.0.1` listens only on
    the loopback: the client then retries forever. The executor sets it for a loopback address only (a remote
    cluster needs multi-node addresses)."""
    import ray

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)   # stop before connecting
    RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))._connect()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == expected
