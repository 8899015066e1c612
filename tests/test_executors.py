"""Executors: a dead worker fails the stage at once, naming the run and the signal; spawned workers and Ray tasks
compute what forked workers and the main process compute; the run cache resumes an interrupted stage with
only the runs that had not finished; progress lines read well without a terminal."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import time
from pathlib import Path

import pytest

from pipeline.data.catalog import dataset_spec
from pipeline.orchestration import parallel
from pipeline.orchestration.executors import Job, LocalPool, SerialExecutor, WorkerDied, death_reason
from pipeline.orchestration.progress import EpochProgress, StageProgress
from pipeline.orchestration.run_cache import RunCache, RunCacheBusy, tree_hash
from pipeline.orchestration.runs import LoadedDataset, RunRecord
from pipeline.orchestration.shipping import SharedObjects, pack, unpack
from pipeline.orchestration.teachers import train_teachers
from pipeline.tracking.recording import RecordingTracker
from tests.conftest import shrunk_params, synthetic_dataset, synthetic_split


def _loaded() -> LoadedDataset:
    split = synthetic_split()
    return LoadedDataset(dataset_spec("av_digits"), synthetic_dataset(), {0: split, 1: split})


def _record(name: str, accuracy: float = 0.5) -> RunRecord:
    return RunRecord(dataset="av_digits", stage="t", method="ce", phase="main", setting="default", teacher="none",
                     target="image", seed=0, epochs=1, best_epoch=0, test_accuracy=accuracy, test_accuracy_last=0.4,
                     best_val_loss=1.0, best_val_accuracy=0.5, run_name=name, extras={"k": [1, 2]})


def _logging_job(name: str, value: float):
    def run(tracker):
        with tracker.run(name, {"p": 1}, {"t": "x"}) as logger:
            logger.log_metrics({"m": value}, step=0)
        return _record(name, value)
    return Job(name, run)


def _suicide(tracker):
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep(tracker):
    time.sleep(30)
    return _record("never")


def test_death_reason_names_the_signal():
    assert death_reason(-9).startswith("killed by SIGKILL (signal 9)")
    assert "out-of-memory" in death_reason(-9)
    assert death_reason(-15) == "killed by SIGTERM (signal 15)"
    assert death_reason(3) == "exited with status 3"


def test_a_killed_worker_fails_the_stage_within_seconds_naming_the_run_and_keeps_finished_runs():
    jobs = [_logging_job("a/seed0", 0.1), Job("b/seed1", _suicide), Job("c/seed2", _sleep)]
    seen = []
    started = time.monotonic()
    with pytest.raises(WorkerDied, match=r"run b/seed1: its worker process \(pid \d+\) killed by SIGKILL") as err:
        for outcome in LocalPool(2, 1, "fork").execute(jobs, [0, 1, 2]):
            seen.append(outcome.index)
    assert time.monotonic() - started < 20   # not the 30 s the sleeping job would take: it was stopped
    assert "\n" not in str(err.value)
    assert seen in ([], [0])   # job a may or may not have finished first; it is never lost when it did


def _dies_right_after_returning(tracker):
    import threading

    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return _record("first")


def test_a_worker_that_dies_between_two_runs_fails_the_stage_naming_the_next_run():
    jobs = [Job("a/seed0", _dies_right_after_returning), Job("b/seed1", _sleep)]
    started = time.monotonic()
    seen = []
    with pytest.raises(WorkerDied, match=r"run b/seed1: its worker process \(pid \d+\) killed by SIGKILL"):
        for outcome in LocalPool(1, 1, "fork").execute(jobs, [0, 1]):
            seen.append(outcome.index)
    assert seen == [0] and time.monotonic() - started < 20


_STAGE_WITH_A_SLEEPING_WORKER = """
import os, sys, time
from pipeline.orchestration.executors import Job, LocalPool

def sleep(tracker):
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    list(LocalPool(1, 1, sys.argv[2]).execute([Job("a/seed0", sleep)], [0]))
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_killed_stage_takes_its_workers_with_it(tmp_path, start_method):
    """SIGKILL of the stage's process (which runs no cleanup) still ends its workers at once: they would otherwise
    train on to the end of their run, holding the CPU, GPU memory and the stage's stdout."""
    import subprocess
    import sys

    import psutil

    script, pid_file = tmp_path / "stage.py", tmp_path / "worker.pid"
    script.write_text(_STAGE_WITH_A_SLEEPING_WORKER)
    root = str(Path(__file__).resolve().parents[1])
    stage = subprocess.Popen([sys.executable, str(script), str(pid_file), start_method], cwd=root,
                             env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert stage.poll() is None and time.monotonic() < deadline, "the worker never started its job"
            time.sleep(0.05)
        worker = psutil.Process(int(pid_file.read_text()))
        stage.kill()
        stage.wait()
        worker.wait(timeout=10)   # raises psutil.TimeoutExpired if the worker outlives its stage
    finally:
        if stage.poll() is None:
            stage.kill()
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE


def test_spawned_workers_compute_what_the_main_process_computes(tmp_path, monkeypatch):
    params = shrunk_params(seeds=(0, 1), workers=1)
    loaded = _loaded()
    serial = train_teachers(params, loaded, tmp_path / "serial", RecordingTracker())
    # the spawn path a GPU takes, here on the CPU
    monkeypatch.setattr(parallel, "make_executor",
                        lambda *a, **k: LocalPool(2, 1, "spawn", shared_types=(LoadedDataset,)))
    spawned = train_teachers(params, loaded, tmp_path / "spawned", RecordingTracker())
    assert [dataclasses.replace(r, cost={}) for r in serial] == [dataclasses.replace(r, cost={}) for r in spawned]
    for seed in (0, 1):
        for role in ("mm", "m1", "m2"):
            assert ((tmp_path / "serial" / f"seed{seed}" / f"{role}.pt").read_bytes()
                    == (tmp_path / "spawned" / f"seed{seed}" / f"{role}.pt").read_bytes())


def test_pack_replaces_the_shared_dataset_by_a_key():
    loaded = _loaded()
    shared = SharedObjects((LoadedDataset,))
    job = Job("x", lambda tracker: float(loaded.data.m1.sum()))
    data, needed = pack(job, shared)
    assert needed == ["shared0"] and shared.objects["shared0"] is loaded
    assert len(data) < loaded.data.m1.numel()          # the tensors are not in the job's bytes
    again, needed_again = pack(Job("y", lambda tracker: len(loaded.data)), shared)
    assert needed_again == ["shared0"] and len(shared.objects) == 1
    restored = unpack(data, {"shared0": loaded})
    assert restored.run(None) == float(loaded.data.m1.sum())


class _DiesAfter:
    """An executor that runs jobs serially and 'loses its worker' at job `dies_at`."""

    def __init__(self, dies_at: int | None) -> None:
        self.dies_at = dies_at
        self.ran: list[int] = []

    def execute(self, jobs, indices):
        for outcome in SerialExecutor().execute(jobs, [i for i in indices if i != self.dies_at]):
            self.ran.append(outcome.index)
            yield outcome
            if self.dies_at is not None and outcome.index + 1 == self.dies_at:
                raise WorkerDied(f"run {jobs[self.dies_at].name}: its worker process died")


def _writing_job(name: str, out: Path, value: float):
    def run(tracker):
        with tracker.run(name, {"v": value}, {}) as logger:
            logger.log_metrics({"v": value}, step=0)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(f"{name}:{value}".encode())
        return [_record(name, value)]
    return Job(name, run, (out,))


def test_an_interrupted_stage_resumes_with_only_the_unfinished_runs(tmp_path):
    outs = [tmp_path / "models" / f"seed{i}.pt" for i in range(4)]
    jobs = [_writing_job(f"s/seed{i}", outs[i], i / 10) for i in range(4)]
    cache = RunCache("s@d", "key1", root=tmp_path / "cache")
    first = _DiesAfter(dies_at=2)
    tracker = RecordingTracker()
    with pytest.raises(WorkerDied):
        parallel.run_jobs(jobs, tracker, first, cache=cache)
    cache.release()                                                   # the attempt ended
    assert first.ran == [0, 1]
    assert [r.name for r in tracker.runs] == ["s/seed0", "s/seed1"]    # finished runs reach MLflow anyway
    for path in outs:                                                 # DVC deletes a stage's outputs
        path.unlink(missing_ok=True)
    second = _DiesAfter(dies_at=None)
    tracker = RecordingTracker()
    resumed = parallel.run_jobs(jobs, tracker, second, cache=RunCache("s@d", "key1", root=tmp_path / "cache"))
    assert second.ran == [2, 3]
    uninterrupted = parallel.run_jobs(jobs, RecordingTracker(), SerialExecutor())
    assert resumed == uninterrupted
    assert [p.read_bytes() for p in outs] == [f"s/seed{i}:{i / 10}".encode() for i in range(4)]
    assert [r.name for r in tracker.runs] == [f"s/seed{i}" for i in range(4)]
    assert [r.tags.get("pipeline.resumed") for r in tracker.runs] == ["true", "true", None, None]
    assert tracker.runs[0].start_ms <= tracker.runs[0].end_ms    # the replayed runs keep their real times


def test_a_changed_key_discards_the_cached_runs(tmp_path):
    out = tmp_path / "o.pt"
    job = _writing_job("s/seed0", out, 0.3)
    cache = RunCache("s@d", "key1", root=tmp_path)
    parallel.run_jobs([job], RecordingTracker(), SerialExecutor(), cache=cache)
    assert cache.get(job.name, job.outputs) is not None
    cache.release()
    other = RunCache("s@d", "key2", root=tmp_path)
    assert other.get(job.name, job.outputs) is None
    other.release()
    assert RunCache("s@d", "key1", root=tmp_path).get(job.name, job.outputs) is None   # discarded for good


def test_a_live_attempt_with_another_key_keeps_its_runs_and_one_with_the_same_key_is_refused(tmp_path):
    """Parallel `dvc exp` workers of one stage with other params never discard each other's runs."""
    import subprocess
    import sys
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from pipeline.orchestration.run_cache import RunCache
        cache = RunCache("s@d", "key1", root=Path({str(tmp_path)!r}))
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "s@d" / "key1" / "marker").write_text("x")
        other = RunCache("s@d", "key2", root=tmp_path)
        assert (tmp_path / "s@d" / "key1" / "marker").exists()        # in use: left alone
        with pytest.raises(RunCacheBusy, match="in use by another attempt of s@d"):
            RunCache("s@d", "key1", root=tmp_path)
        other.clear()
        assert (tmp_path / "s@d" / "key1").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: the kernel released its lock, and the next attempt with another key discards its runs
    RunCache("s@d", "key3", root=tmp_path).release()
    assert not (tmp_path / "s@d" / "key1").exists()


def test_tree_hash_follows_content_and_a_big_file_s_size_and_time(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.npy").write_bytes(b"123")
    first = tree_hash([tmp_path / "d"])
    os.utime(tmp_path / "d" / "a.npy", (1, 1))
    assert tree_hash([tmp_path / "d"]) == first
    (tmp_path / "d" / "a.npy").write_bytes(b"124")
    assert tree_hash([tmp_path / "d"]) != first
    # a file over the content limit is known by its size and modification time
    big = tree_hash([tmp_path / "d"], content_limit=2)
    os.utime(tmp_path / "d" / "a.npy", (5, 5))
    assert tree_hash([tmp_path / "d"], content_limit=2) != big


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_whole_lines_without_a_terminal_and_a_bar_with_one():
    plain = io.StringIO()
    progress = StageProgress("distill@av_digits-kd", 3, plain)
    progress.resumed(1)
    progress.start()
    progress.finished("distill/kd/mm/image/seed0", "image: test 61.20 %", 4.2)
    progress.finished("distill/kd/mm/audio/seed0", "audio: test 40.00 %", 3.0)
    progress.close()
    text = plain.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == ("distill@av_digits-kd: 1 of 3 runs finished in an interrupted attempt, taken from the run "
                        "cache; 2 to train")
    assert lines[2].startswith("[2/3] distill/kd/mm/image/seed0  image: test 61.20 %  4.2 s  ETA ")
    assert lines[3] == "[3/3] distill/kd/mm/audio/seed0  audio: test 40.00 %  3.0 s"
    tty = _Tty()
    bar = StageProgress("s", 2, tty)
    bar.start()
    bar.finished("r0", "done", 1.0)
    assert "s [############............] 1/2" in tty.getvalue() and "\r" not in tty.getvalue().split("\n")[0]
    bar.finished("r1", "done", 1.0)
    bar.close()
    assert tty.getvalue().endswith("\n")


def test_epoch_progress_is_rate_limited():
    stream = io.StringIO()
    quiet = EpochProgress("run", 3600, stream)
    for epoch in range(50):
        quiet.epoch("main", epoch, {"val_accuracy": 0.5})
    assert stream.getvalue() == ""
    chatty = EpochProgress("run", 1e-9, stream)
    time.sleep(0.01)
    chatty.epoch("main", 4, {"train_loss": 1.25, "val_accuracy": 0.5})
    assert stream.getvalue() == "  run: main epoch 5  train_loss 1.25  val_accuracy 0.5\n"
