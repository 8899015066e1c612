"""The training engine: determinism on CPU, checkpoint selection, evaluation, and the phase machinery
(phases in order, selection or none, restoring the selected modules, hooks, the last-epoch test)."""

from __future__ import annotations

import copy
import mmap
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.ce import CrossEntropyOnly
from pipeline.params import ParamsError
from pipeline.training.engine import train
from pipeline.training.evaluation import evaluate
from pipeline.training.phases import Phase
from pipeline.training.runtime import resolve_device, seed_everything
from tests.conftest import role_network, run_context, synthetic_dataset, synthetic_split


def _run(seed: int, selection: str = "val_loss"):
    data = synthetic_dataset()
    seed_everything(seed)
    net = role_network("m1")
    method = CrossEntropyOnly(net)
    result = train(method, run_context(data, synthetic_split(), epochs=4, lr=3e-3, seed=seed, selection=selection))
    return result, net


def test_same_seed_gives_identical_metrics():
    (first, net_a), (second, net_b) = _run(0), _run(0)
    assert first.final.history == second.final.history
    assert first.test["student"].accuracy == second.test["student"].accuracy
    assert first.test["student"].loss == second.test["student"].loss
    assert first.final.best_epoch == second.final.best_epoch
    (state_a,), (state_b,) = first.final.best_states, second.final.best_states
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert all(torch.equal(v, net_b.state_dict()[k]) for k, v in net_a.state_dict().items())


def test_different_seed_gives_different_training():
    assert _run(0)[0].final.history != _run(1)[0].final.history


@pytest.mark.parametrize("selection", ["val_loss", "val_accuracy"])
def test_selected_checkpoint_is_the_best_validation_epoch(selection):
    result, net = _run(0, selection)
    final = result.final
    assert [p.name for p in result.phases] == ["main"] and final.epochs == 4 and len(final.history) == 4
    values = [h[selection] for h in final.history]
    best = values.index(min(values)) if selection == "val_loss" else values.index(max(values))
    assert final.best_epoch == best
    assert final.history[-1]["best_epoch"] == best
    assert final.best_metrics["val_loss"] == pytest.approx(final.history[best]["val_loss"])
    # the student holds the selected weights after training
    (state,) = final.best_states
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_evaluate_counts_accuracy_and_confusion():
    data = synthetic_dataset()
    seed_everything(0)
    net = role_network("m1")
    index = torch.arange(40)
    result = evaluate(net, data, index, 10, batch_size=16)
    with torch.no_grad():
        pred = net.eval()(data.batch(index)).argmax(1)
    assert result.accuracy == pytest.approx((pred == data.y[index]).float().mean().item())
    assert result.confusion.sum() == 40 and result.confusion.trace() == (pred == data.y[index]).sum().item()
    assert result.confusion[data.y[0].item(), pred[0].item()] >= 1


def test_batches_are_index_slices_covering_the_split_once():
    data = synthetic_dataset()
    index = torch.arange(0, 50)
    seen = torch.cat([b["index"] for b in data.batches(index, 16, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(50))
    batch = data.batch(torch.tensor([3, 7]))
    assert set(batch) == {"m1", "m2", "y", "index"} and torch.equal(batch["m1"][1], data.m1[7])
    # the run context's batches are the same slices of its split, shuffled by the run's generator
    split = synthetic_split()
    context = run_context(data, split)
    shuffled = torch.cat([b["index"] for b in context.batches("train", shuffle=True)])
    assert sorted(shuffled.tolist()) == sorted(split["train"].tolist())
    assert torch.cat([b["index"] for b in context.batches("val")]).tolist() == split["val"].tolist()


def test_device_auto_picks_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="device") as err:
            resolve_device("cuda")
        assert "CUDA is not available" in str(err.value)
        assert "auto" in str(err.value) and "cpu" in str(err.value)


def test_evaluate_loss_is_the_mean_of_per_batch_means_however_it_is_chunked():
    """40 samples in batches of 16: the authors' score weighs the last batch of 8 like a full one."""
    data = synthetic_dataset()
    seed_everything(0)
    net = role_network("m1").eval()
    index = torch.arange(40)
    with torch.no_grad():
        naive = [F.cross_entropy(net(data.batch(index[i:i + 16])), data.y[index[i:i + 16]]).item()
                 for i in range(0, 40, 16)]
    expected = sum(naive) / len(naive)
    for chunk in (7, 16, 1024):
        assert evaluate(net, data, index, 10, batch_size=16, chunk_size=chunk).loss == pytest.approx(expected, rel=1e-6)


# ---- the phase machinery, with hand-made phases around a LeNet5 ----


class _Declared(nn.Module):
    """A minimal trainable: the phases it is given, and one evaluated network."""

    def __init__(self, net: nn.Module, phases) -> None:
        super().__init__()
        self.net = net
        self._phases = phases

    def phases(self, context):
        return self._phases(context)

    def evaluated_networks(self):
        return {"student": self.net}


def _phase(name, net, context, epochs, events, score=None, selected=(), snapshots=None):
    """A CE phase on `net`; `events` records the hooks in order, `snapshots` each epoch's weights."""

    def validate(epoch):
        events.append(f"{name}:validate{epoch}")
        if snapshots is not None:
            snapshots.append(copy.deepcopy(net.state_dict()))
        return context.evaluate(net, "val").as_dict("val")

    def optimizer():
        events.append(f"{name}:optimizer")
        return torch.optim.Adam(net.parameters(), lr=3e-3)

    return Phase(name, epochs, lambda batch, epoch: {"ce": F.cross_entropy(net(batch), batch["y"])}, optimizer,
                 train_modules=[net], validate=validate, score=score, selected=selected,
                 before=lambda: events.append(f"{name}:before"), after=lambda: events.append(f"{name}:after"))


def _same(state, net) -> bool:
    return all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_phases_run_in_order_with_their_own_histories_names_and_hooks_once():
    torch.manual_seed(0)
    net, context, events = role_network("m1"), run_context(), []
    method = _Declared(net, lambda c: [_phase("first", net, c, 2, events), _phase("second", net, c, 3, events)])
    result = train(method, context)
    assert [(p.name, p.epochs, len(p.history)) for p in result.phases] == [("first", 2, 2), ("second", 3, 3)]
    assert result.final is result.phases[-1]
    for phase in result.phases:
        assert [h["epoch"] for h in phase.history] == list(range(phase.epochs))
        assert {"train_loss", "train_ce", "val_loss", "val_accuracy", "best_epoch"} <= set(phase.history[0])
    # before() once before the optimiser is built, validation every epoch, after() once at the end
    assert events == ["first:before", "first:optimizer", "first:validate0", "first:validate1", "first:after",
                      "second:before", "second:optimizer", "second:validate0", "second:validate1",
                      "second:validate2", "second:after"]
    assert set(result.test) == set(result.test_last) == {"student"}


def test_a_phase_without_score_keeps_the_last_epoch():
    torch.manual_seed(0)
    net, context, events, snapshots = role_network("m1"), run_context(), [], []
    result = train(_Declared(net, lambda c: [_phase("only", net, c, 3, events, selected=[net],
                                                    snapshots=snapshots)]), context)
    final = result.final
    assert final.best_epoch == 2 and final.best_states is None
    assert [h["best_epoch"] for h in final.history] == [0, 1, 2]
    assert final.best_metrics["val_loss"] == final.history[-1]["val_loss"]
    assert _same(snapshots[-1], net)
    # nothing restored, so the last and the "selected" test evaluations are the same weights
    assert result.test["student"].loss == result.test_last["student"].loss


def test_selected_modules_are_restored_to_the_best_epoch_and_test_last_precedes_the_restore():
    torch.manual_seed(0)
    net, other = role_network("m1"), role_network("m1")
    context, events, snapshots, other_snapshots = run_context(), [], [], []
    last_test = {}

    def phases(c):
        first = _phase("warmup", other, c, 2, events, snapshots=other_snapshots)
        final = _phase("main", net, c, 3, events, score=lambda metrics, epoch: 0.0 if epoch == 1 else 1.0,
                       selected=[net], snapshots=snapshots)
        validate = final.validate

        def validate_and_test(epoch):
            metrics = validate(epoch)
            if epoch == 2:
                last_test["evaluation"] = c.evaluate(net, "test")
            return metrics
        final.validate = validate_and_test
        return [first, final]

    result = train(_Declared(net, phases), context)
    final = result.final
    assert final.best_epoch == 1 and [h["best_epoch"] for h in final.history] == [0, 1, 1]
    assert final.best_metrics == {k: v for k, v in final.history[1].items() if k not in ("epoch", "best_epoch")}
    # the selected module holds epoch 1's weights; it moved on after it, so the restore changed something
    assert _same(snapshots[1], net) and not _same(snapshots[2], net)
    (best_state,) = final.best_states
    assert _same(best_state, net)
    assert _same(other_snapshots[-1], other)  # the first phase (no score) kept its last epoch
    # test_last: the final phase's last-epoch weights, evaluated before the restore; test: the selected ones
    assert result.test_last["student"].loss == last_test["evaluation"].loss
    assert result.test_last["student"].accuracy == last_test["evaluation"].accuracy
    expected = context.evaluate(net, "test")
    assert result.test["student"].loss == expected.loss and result.test["student"].loss != result.test_last[
        "student"].loss


def test_a_method_without_phases_is_an_error():
    with pytest.raises(ValueError, match="at least one phase"):
        train(_Declared(role_network("m1"), lambda c: []), run_context())


def _stopping_phase(scores: list[float], patience: int, min_epochs: int, losses: list[float] | None = None):
    """A one-parameter phase whose validation score per epoch is scripted (and its training loss, optionally)."""
    weight = nn.Parameter(torch.zeros(1))
    epochs = len(scores)
    losses = losses or [1.0] * epochs
    seen = []

    def terms(batch, epoch):
        seen.append(epoch)
        return {"ce": (weight * 0 + losses[epoch]).sum()}

    phase = Phase("main", epochs, terms, lambda: torch.optim.SGD([weight], lr=0.0), train_modules=[],
                  validate=lambda epoch: {"val_loss": scores[epoch]}, score=lambda m, e: m["val_loss"],
                  selected=[], patience=patience, min_epochs=min_epochs)
    return phase, seen


@pytest.mark.parametrize("patience, min_epochs, ran, stopped", [
    (0, 0, 10, "completed"),          # off: every epoch
    (3, 0, 5, "early_stopping"),      # best at epoch 1, no gain for 3 epochs -> stops after epoch 4
    (3, 8, 8, "early_stopping"),      # ... but never before min_epochs
    (20, 0, 10, "completed"),         # patience longer than the budget
])
def test_early_stopping_counts_epochs_without_improvement_after_min_epochs(patience, min_epochs, ran, stopped):
    from pipeline.training.engine import run_phase

    scores = [5.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    phase, _ = _stopping_phase(scores, patience, min_epochs)
    result = run_phase(phase, run_context(synthetic_dataset(), synthetic_split(), epochs=10))
    assert (result.epochs, result.stopped, result.best_epoch, result.max_epochs) == (ran, stopped, 1, 10)
    assert len(result.history) == ran


def test_a_plateau_that_keeps_improving_a_little_is_not_stopped():
    """Early stopping compares with the best score, so RKD's slowly sinking plateau (2.303, 2.302, ...) runs on."""
    from pipeline.training.engine import run_phase

    scores = [2.303 - 1e-4 * e for e in range(12)]
    phase, _ = _stopping_phase(scores, patience=2, min_epochs=0)
    result = run_phase(phase, run_context(synthetic_dataset(), synthetic_split(), epochs=12))
    assert result.stopped == "completed" and result.best_epoch == 11


def test_a_non_finite_training_loss_stops_the_phase_and_keeps_the_earlier_selection():
    from pipeline.training.engine import run_phase

    phase, seen = _stopping_phase([3.0, 2.0, 1.0, 0.5, 0.4], patience=0, min_epochs=0,
                                  losses=[1.0, 1.0, float("nan"), 1.0, 1.0])
    result = run_phase(phase, run_context(synthetic_dataset(), synthetic_split(), epochs=5))
    assert result.stopped == "non_finite_loss" and result.epochs == 3 and result.best_epoch == 1
    assert max(seen) == 2  # nothing trained after the non-finite epoch
    assert result.history[-1]["epoch"] == 2 and "val_loss" not in result.history[-1]


def _fresh_pages(size: int) -> mmap.mmap:
    """`size` bytes of new anonymous memory, every page touched: resident whatever the allocator keeps cached
    (a 64 MiB torch tensor can reuse pages an earlier test in the same worker freed)."""
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_peak_memory_sees_a_transient_allocation_on_cpu():
    from pipeline.training.runtime import PeakMemory

    with PeakMemory(torch.device("cpu")) as meter:
        block = _fresh_pages(64 * 2**20)  # 64 MiB, touched, held past a few samples, then freed
        time.sleep(0.1)
        block.close()
    assert meter.peak_mb is not None, "Linux exposes /proc/self/status"
    assert 48 <= meter.peak_mb <= 200


def test_peak_memory_falls_back_on_sampling_where_the_kernel_keeps_no_high_water_mark(monkeypatch):
    """As on a CI sandbox: the clear_refs reset is accepted but VmHWM only ever equals the current size."""
    from pipeline.training import runtime

    real = runtime._status_kib
    monkeypatch.setattr(runtime, "_status_kib", lambda name: real("VmRSS"))
    with runtime.PeakMemory(torch.device("cpu")) as meter:
        block = _fresh_pages(64 * 2**20)
        time.sleep(0.1)
        block.close()
    assert 48 <= meter.peak_mb <= 200
