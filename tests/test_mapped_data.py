"""Data larger than memory: prepared arrays left memory-mapped on the host give the same batches and the same
trained network as arrays copied to the device; `auto` keeps them mapped when they do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.tensors import DeviceDataset, MappedModality, choose_residency
from pipeline.methods import method_class
from pipeline.training.engine import train
from tests.conftest import method_setup, run_context, synthetic_dataset, synthetic_split


@pytest.fixture(scope="module")
def mapped_files(tmp_path_factory):
    """The 96-sample synthetic dataset written as .npy files and opened memory-mapped, as read_prepared does."""
    data = synthetic_dataset()
    folder = tmp_path_factory.mktemp("prepared")
    arrays = {}
    for key, tensor in (("m1", data.m1), ("m2", data.m2), ("labels", data.y)):
        np.save(folder / f"{key}.npy", tensor.numpy())
        arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r")
    return data, arrays


def test_mapped_batches_equal_device_batches_in_order(mapped_files):
    data, arrays = mapped_files
    mapped = DeviceDataset.from_arrays(arrays, torch.device("cpu"), "mapped")
    assert mapped.mapped and isinstance(mapped.m1, MappedModality) and mapped.m1.shape == data.m1.shape
    index = torch.tensor([5, 0, 93, 5, 17])           # unsorted, with a repeat: gathered in the asked order
    assert torch.equal(mapped.batch(index)["m1"], data.m1[index])
    split = synthetic_split()["train"]
    for a, b in zip(mapped.batches(split, 16, torch.Generator().manual_seed(3)),
                    data.batches(split, 16, torch.Generator().manual_seed(3)), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("m1", "m2", "y", "index"))


def test_training_on_mapped_data_equals_training_on_device_data(mapped_files):
    """Same seed, same split: the KD student's metrics and weights are identical whichever residency."""
    data, arrays = mapped_files
    outcomes = []
    for dataset in (data, DeviceDataset.from_arrays(arrays, torch.device("cpu"), "mapped")):
        method = method_class("kd").from_setup(method_setup("kd", "mm", "m1", dataset))
        result = train(method, run_context(dataset, synthetic_split(), epochs=2))
        test = {name: (e.loss, e.accuracy, e.confusion.tolist()) for name, e in result.test.items()}
        outcomes.append((result.final.best_metrics, test, method.student.state_dict()))
    (metrics_a, test_a, weights_a), (metrics_b, test_b, weights_b) = outcomes
    assert metrics_a == metrics_b and test_a == test_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_auto_residency_maps_what_does_not_fit(monkeypatch, mapped_files):
    _, arrays = mapped_files
    import pipeline.data.tensors as tensors

    size = arrays["m1"].nbytes + arrays["m2"].nbytes
    monkeypatch.setattr(tensors, "device_budget_bytes", lambda device: size - 1)
    assert choose_residency(arrays, torch.device("cpu"), "auto") == "mapped"
    monkeypatch.setattr(tensors, "device_budget_bytes", lambda device: size)
    assert choose_residency(arrays, torch.device("cpu"), "auto") == "device"
    assert choose_residency(arrays, torch.device("cpu"), "mapped") == "mapped"
