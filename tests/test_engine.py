"""The training engine: determinism on CPU, checkpoint selection, evaluation."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods.ce import CrossEntropyOnly
from pipeline.models.registry import build_network
from pipeline.training.engine import EngineConfig, evaluate, train
from pipeline.training.runtime import resolve_device, seed_everything
from tests.conftest import synthetic_dataset, synthetic_split


def _run(seed: int, selection: str = "val_loss"):
    data = synthetic_dataset()
    seed_everything(seed)
    net = build_network("lenet5", ["m1"], 10, [(1, 28, 28)])
    return train(CrossEntropyOnly(net), data, synthetic_split(), EngineConfig(4, 16, 3e-3, selection=selection), 10,
                 torch.Generator().manual_seed(seed))


def test_same_seed_gives_identical_metrics():
    first, second = _run(0), _run(0)
    assert first.history == second.history
    assert first.test.accuracy == second.test.accuracy and first.best_epoch == second.best_epoch
    assert all(torch.equal(first.best_state[k], second.best_state[k]) for k in first.best_state)


def test_different_seed_gives_different_training():
    assert _run(0).history != _run(1).history


@pytest.mark.parametrize("selection", ["val_loss", "val_accuracy"])
def test_selected_checkpoint_is_the_best_validation_epoch(selection):
    result = _run(0, selection)
    key = "val_loss" if selection == "val_loss" else "val_accuracy"
    values = [h[key] for h in result.history]
    best = values.index(min(values)) if selection == "val_loss" else values.index(max(values))
    assert result.best_epoch == best
    assert result.history[-1]["best_epoch"] == best
    assert result.best_val.loss == pytest.approx(result.history[best]["val_loss"])


def test_evaluate_counts_accuracy_and_confusion():
    data = synthetic_dataset()
    seed_everything(0)
    net = build_network("lenet5", ["m1"], 10, [(1, 28, 28)])
    index = torch.arange(40)
    result = evaluate(net, data, index, 10, batch_size=16)
    with torch.no_grad():
        pred = net(data.batch(index)).argmax(1)
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


def test_device_auto_picks_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_evaluate_loss_is_the_mean_of_per_batch_means_however_it_is_chunked():
    """40 samples in batches of 16: the authors' score weighs the last batch of 8 like a full one."""
    data = synthetic_dataset()
    seed_everything(0)
    net = build_network("lenet5", ["m1"], 10, [(1, 28, 28)]).eval()
    index = torch.arange(40)
    with torch.no_grad():
        naive = [torch.nn.functional.cross_entropy(net(data.batch(index[i:i + 16])), data.y[index[i:i + 16]]).item()
                 for i in range(0, 40, 16)]
    expected = sum(naive) / len(naive)
    for chunk in (7, 16, 1024):
        assert evaluate(net, data, index, 10, batch_size=16, chunk_size=chunk).loss == pytest.approx(expected, rel=1e-6)
