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
from tests.conftest import shrunk_params, shrunk_raw, synthetic_dataset, synthetic_split

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


def test_a_dead_ray_worker_fails_the_stage_at_once(local_ray):
    executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
    started = time.monotonic()
    # a closure, not a module function: cloudpickle sends it by value (Ray workers cannot import tests/)
    suicide = lambda tracker: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    with pytest.raises(WorkerDied, match=r"run b/seed1: its Ray worker died"):
        list(executor.execute([Job("b/seed1", suicide)], [0]))
    assert time.monotonic() - started < 60


def test_an_unreachable_cluster_is_one_line_naming_the_address_and_the_token(monkeypatch):
    """No cluster at the address (or one that refuses a client without its token: Ray 2.60's `ray start`
    enables token authentication) stops the stage with one line, not Ray's traceback."""
    import ray

    from pipeline.orchestration.executors import RayUnreachable

    def refuse(**kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    executor = RayExecutor(ExecutorParams(kind="ray"), 1, torch.device("cpu"))
    with pytest.raises(RayUnreachable, match=r"^executor\.kind ray: 127\.0\.0\.1:1: no Ray cluster answered .*"
                                             r"RAY_AUTH_MODE=token") as err:
        executor._connect()
    assert "\n" not in str(err.value)
