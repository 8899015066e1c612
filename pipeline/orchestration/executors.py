"""Where a stage's independent runs execute, behind one interface: `execute(jobs, indices)` yields each job's
outcome as it finishes. Every run seeds itself and uses `threads_per_run` torch threads wherever it runs, so
the results never depend on the executor (tested).

- `SerialExecutor`: one after another in the stage's process.
- `LocalPool`: worker processes on this machine. On a CPU they are forked (jobs are closures over the loaded
  dataset, inherited for free); on a GPU they are spawned (CUDA cannot be used after fork) and packed
  `runs_per_gpu` to the device, the dataset sent once per worker (torch shares CPU tensors through shared
  memory and CUDA tensors through CUDA IPC, so it is not copied per worker). The pool watches every worker:
  one that dies (a signal, the kernel's OOM killer) fails the stage at once with `WorkerDied`, naming the run
  and the signal; the runs finished before are kept (the run cache, run_cache.py).
- `RayExecutor`: each run a Ray task with `cpus_per_run` CPUs and a `gpus_per_run` GPU fraction (several small
  runs share a GPU), on a private local Ray instance bound to 127.0.0.1 or on an existing cluster (`address`
  in params, or RAY_ADDRESS). The dataset goes into Ray's object store once and each node holds one copy;
  MLflow logging stays in the stage's process.

Jobs never talk to MLflow: each records its runs (`RecordingTracker`) and the stage's process replays them.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.errors import UserError
from pipeline.orchestration.shipping import SharedObjects, dumps_for_worker, pack, unpack
from pipeline.params import NON_NEGATIVE, POSITIVE
from pipeline.tracking.base import Tracker
from pipeline.tracking.recording import RecordedRun, RecordingTracker


@dataclass(frozen=True)
class ExecutorParams:
    """`kind`: `local` (worker processes on this machine; `workers` of them on a CPU, `runs_per_gpu` spawned
    processes sharing the GPU) or `ray` (one Ray task per run). `ray_address`: `local` starts a private Ray
    instance on 127.0.0.1 for the stage; anything else (`auto`, `host:port`, `ray://host:port`) connects to an
    existing cluster, as does a set RAY_ADDRESS. `ray_cpus_per_run` / `ray_gpus_per_run`: each run's Ray
    resources (a fraction < 1 packs runs on a GPU; ignored where there is no GPU). `progress_interval_s`: at
    most one line per this many seconds of a long run's epochs (0: none). None of these changes a result."""

    kind: Literal["local", "ray"] = "local"
    runs_per_gpu: int = field(default=2, metadata=POSITIVE)
    ray_address: str = "local"
    ray_cpus_per_run: float = field(default=1.0, metadata=POSITIVE)
    ray_gpus_per_run: float = field(default=0.25, metadata=NON_NEGATIVE)
    progress_interval_s: float = field(default=30.0, metadata=NON_NEGATIVE)


@dataclass(frozen=True)
class Job:
    """One independent run of a stage: `run(tracker) -> result`. `name` identifies it within the stage (its
    MLflow run name; the run cache's key); `outputs` are the files it writes (checkpoints)."""

    name: str
    run: Callable[[Tracker], Any]
    outputs: tuple[Path, ...] = ()


@dataclass
class Outcome:
    index: int
    result: Any
    runs: list[RecordedRun]
    error: BaseException | None
    seconds: float
    cached: bool = False


class RayUnreachable(UserError):
    """The Ray cluster named by `executor.ray_address` or RAY_ADDRESS cannot be reached."""


class WorkerDied(UserError):
    """A worker process ended without returning its run (killed by a signal, out of memory)."""


def run_recorded(job: Job) -> tuple[Any, list[RecordedRun], BaseException | None, float]:
    """Run one job, its MLflow runs recorded in memory; an exception is returned, not raised."""
    recorder = RecordingTracker()
    started = time.perf_counter()
    try:
        result, error = job.run(recorder), None
    except Exception as err:
        result, error = None, err
    return result, recorder.runs, error, time.perf_counter() - started


def death_reason(exitcode: int | None) -> str:
    """`killed by SIGKILL (signal 9)` for a negative exit code, `exited with status N` otherwise."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name} (signal {-exitcode}){hint}"
    return f"exited with status {exitcode}"


class SerialExecutor:
    """Every job in this process, one after another."""

    def execute(self, jobs: Sequence[Job], indices: Sequence[int]) -> Iterator[Outcome]:
        for i in indices:
            yield Outcome(i, *run_recorded(jobs[i]))


_FORKED_JOBS: Sequence[Job] = ()


def import_lazy_torch_modules() -> None:
    """Import what torch imports on first use in every run, so forked workers inherit it instead of each
    importing it again: building any optimiser imports `torch._dynamo` (`torch._compile._disable_dynamo`),
    ~2 s of CPU per worker and per pool on the 2-core machine, more than a tiny run trains."""
    import torch._dynamo  # noqa: F401


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when the process that started it dies (Linux `PR_SET_PDEATHSIG`;
    elsewhere a no-op). Without it, a stage killed by a signal leaves its workers training to the end of their
    run, holding CPU, GPU memory and the stage's stdout (so `dvc repro` does not return)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before the request took effect
        os._exit(1)


def _worker_main(conn, threads: int, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    held: dict[str, Any] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:        # the stage's process is gone
            return
        if message[0] == "stop":
            return
        if message[0] == "shared":   # bytes this stage's own process just made (dumps_for_worker)
            held[message[1]] = pickle.loads(message[2])
            continue
        _, index, payload = message
        job = _FORKED_JOBS[index] if payload is None else unpack(payload, held)
        result, runs, error, seconds = run_recorded(job)
        try:
            conn.send(("done", index, result, runs, error, seconds))
        except Exception as err:    # an unpicklable result or exception: report it rather than vanish
            conn.send(("done", index, None, runs, RuntimeError(f"{type(error or err).__name__}: {error or err}"),
                       seconds))


@dataclass
class _Worker:
    process: Any
    conn: Any
    shared: set[str] = field(default_factory=set)
    job: int | None = None


class LocalPool:
    """`workers` processes on this machine (`fork` on a CPU, `spawn` for CUDA), each fed one job at a time."""

    def __init__(self, workers: int, threads_per_run: int, start_method: Literal["fork", "spawn"],
                 shared_types: tuple[type, ...] = ()) -> None:
        self.workers = workers
        self.threads = threads_per_run
        self.start_method = start_method
        self.shared_types = shared_types

    def execute(self, jobs: Sequence[Job], indices: Sequence[int]) -> Iterator[Outcome]:
        global _FORKED_JOBS
        if not indices:
            return
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "fork":
            import_lazy_torch_modules()
        shared = SharedObjects(self.shared_types)
        pending = list(indices)
        _FORKED_JOBS = jobs
        pool: list[_Worker] = []
        try:
            for _ in range(min(self.workers, len(pending))):
                parent, child = context.Pipe()
                process = context.Process(target=_worker_main, args=(child, self.threads, os.getpid()),
                                          daemon=True)
                process.start()
                child.close()
                pool.append(_Worker(process, parent))
            for worker in pool:
                self._assign(worker, jobs, pending, shared)
            while any(w.job is not None for w in pool):
                busy = [w for w in pool if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    if worker.conn in ready:
                        try:
                            _, index, result, runs, error, seconds = worker.conn.recv()
                        except (EOFError, ConnectionError):
                            worker.process.join(5)
                            raise self._died(jobs, worker) from None
                        worker.job = None
                        yield Outcome(index, result, runs, error, seconds)
                        self._assign(worker, jobs, pending, shared)
                    elif worker.process.sentinel in ready:
                        worker.process.join(5)
                        raise self._died(jobs, worker)
        finally:
            _FORKED_JOBS = ()
            for worker in pool:
                if worker.process.is_alive():
                    try:
                        worker.conn.send(("stop",))
                    except (OSError, ValueError):
                        pass
            for worker in pool:
                worker.process.join(2)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.conn.close()

    def _assign(self, worker: _Worker, jobs: Sequence[Job], pending: list[int], shared: SharedObjects) -> None:
        if not pending:
            return
        index = pending.pop(0)
        worker.job = index
        payload = None
        try:
            if self.start_method != "fork":
                payload, needed = pack(jobs[index], shared)
                for key in needed:
                    if key not in worker.shared:
                        worker.conn.send(("shared", key, dumps_for_worker(shared.objects[key])))
                        worker.shared.add(key)
            worker.conn.send(("job", index, payload))
        except (BrokenPipeError, ConnectionError):   # it died after returning its previous run
            worker.process.join(5)
            raise self._died(jobs, worker, " before the run started") from None

    @staticmethod
    def _died(jobs: Sequence[Job], worker: _Worker, when: str = "") -> WorkerDied:
        return WorkerDied(f"run {jobs[worker.job].name}: its worker process (pid {worker.process.pid}) "
                          f"{death_reason(worker.process.exitcode)}{when}; the runs finished before it are kept in "
                          "the run cache and the next `dvc repro` trains only the others")


_RAY_HELD: dict[str, Any] = {}


def _ray_task(payload: bytes, refs: dict[str, Any], threads: int, device: str, cwd: str):
    import ray

    # a cluster's worker starts where `ray start` ran; the stage's relative paths (checkpoints, outputs) are from
    # its repository, which every node mounts at the same path
    os.chdir(cwd)
    torch.set_num_threads(threads)

    def resolve(key: str) -> Any:
        ref = refs[key]
        held = _RAY_HELD.get(ref.hex())
        if held is None:   # once per worker process; the object store holds one copy per node
            held = _RAY_HELD[ref.hex()] = ray.get(ref).to(torch.device(device))
        return held

    return run_recorded(unpack(payload, resolve))


def local_ray_environment(environ, private: bool = True) -> None:
    """Ray settings for this project: no usage statistics sent anywhere, and, for a private instance or a cluster
    on this machine's loopback address, every connection on 127.0.0.1. Ray's own switch for a loopback-only node
    is named for Windows and macOS (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` disables multi-node addresses on any
    OS; without it Ray binds the machine's network address even when `_node_ip_address` is 127.0.0.1, and
    rewrites a client's 127.0.0.1 address to the machine's, where a loopback-bound cluster does not listen).
    Must run before `import ray`: Ray reads it once, at import."""
    environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if private:
        environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray cluster address (`host:port`, `ray://host:port`, `[::1]:port`); None for `auto`
    or anything without a port."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback (`localhost`, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def probe_cluster(address: str, timeout_s: float = 5.0) -> None:
    """Open a TCP connection to the cluster's head (`address`'s host and port), raising `RayUnreachable` in one
    line when nothing listens there: Ray's own client retries an unreachable head for minutes, or forever."""
    import socket

    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError as err:
        raise RayUnreachable(f"executor.kind ray: {address}: nothing answers at {endpoint[0]}:{endpoint[1]} "
                             f"({err.strerror or err}); start a cluster with `ray start --head` or set "
                             "RAY_ADDRESS to its head's address") from None


class RayExecutor:
    """Each job a Ray task. Shared objects (the dataset) must offer `.to(device)`: they travel on the CPU and
    each worker moves them to its run device."""

    def __init__(self, params: ExecutorParams, threads_per_run: int, device: torch.device,
                 shared_types: tuple[type, ...] = ()) -> None:
        self.params = params
        self.threads = threads_per_run
        self.device = device
        self.shared_types = shared_types

    def _connect(self):
        address = os.environ.get("RAY_ADDRESS") or (None if self.params.ray_address == "local"
                                                    else self.params.ray_address)
        endpoint = cluster_endpoint(address) if address else None
        # a cluster on this machine's loopback address is reached as one: Ray would rewrite 127.0.0.1 to the
        # machine's network address, where it does not listen, and retry forever
        on_loopback = endpoint is not None and is_loopback(endpoint[0])
        local_ray_environment(os.environ, private=address is None or on_loopback)
        import ray

        if ray.is_initialized():
            return
        if address is None:
            # "local": a new instance even when a cluster runs on this machine (without it Ray joins the cluster
            # that `ray start` last started here, and fails on num_cpus)
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False,
                     log_to_driver=True)
        else:
            probe_cluster(address)
            try:
                ray.init(address=address, configure_logging=False, log_to_driver=True)
            except ConnectionError as err:
                raise RayUnreachable(f"executor.kind ray: {address}: no Ray cluster answered ({err}); start one with "
                                     "`ray start --head`; a cluster it starts (Ray 2.60) wants its token: set "
                                     "RAY_AUTH_MODE=token, the token being ~/.ray/auth_token of the head node or "
                                     "RAY_AUTH_TOKEN") from None

    def execute(self, jobs: Sequence[Job], indices: Sequence[int]) -> Iterator[Outcome]:
        if not indices:
            return
        self._connect()   # first: it sets what Ray reads when it is imported
        import ray
        from ray import exceptions as ray_errors

        shared = SharedObjects(self.shared_types)
        packed = {i: pack(jobs[i], shared) for i in indices}
        refs = {key: ray.put(obj.to(torch.device("cpu"))) for key, obj in shared.objects.items()}
        gpus = self.params.ray_gpus_per_run if self.device.type == "cuda" else 0
        task = ray.remote(_ray_task).options(num_cpus=self.params.ray_cpus_per_run, num_gpus=gpus, max_retries=0)
        device = "cuda" if self.device.type == "cuda" else "cpu"   # a task sees only the GPU Ray gave it
        pending = {task.remote(payload, {k: refs[k] for k in needed}, self.threads, device, os.getcwd()): i
                   for i, (payload, needed) in packed.items()}
        try:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done)
                try:
                    result, runs, error, seconds = ray.get(done)
                except (ray_errors.WorkerCrashedError, ray_errors.NodeDiedError,
                        getattr(ray_errors, "OutOfMemoryError", ray_errors.WorkerCrashedError)) as err:
                    raise WorkerDied(f"run {jobs[index].name}: its Ray worker died ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else 'no detail'}); the runs "
                                     "finished before it are kept in the run cache") from None
                yield Outcome(index, result, runs, error, seconds)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
