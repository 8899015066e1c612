"""Shared fixtures. Every test that needs parameters shrinks the real params.yaml (never a pasted copy), and
builds networks, data and run contexts through the helpers here: a tiny AV-Digits build, small synthetic
two-modality datasets, and method setups as the pipeline makes them."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.pop("DVC_STAGE", None)  # tests are not DVC stages: params are never restricted here
warnings.filterwarnings("ignore", message=".*noload.*")

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"m1": (1, 28, 28), "m2": (1, 16, 16)}
ARCHS = {"mm": "cnn_i", "m1": "lenet5", "m2": "three_layer_cnn_a"}


def raw_params() -> dict:
    """params.yaml as YAML data (a fresh copy each call)."""
    return copy.deepcopy(_RAW)


_RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def shrunk_raw(seeds=(0,), epochs: int = 2, batch_size: int = 16, **overrides) -> dict:
    """The real params.yaml with few seeds and epochs (the tiny profile of the tests); `overrides` set
    top-level keys."""
    raw = raw_params()
    raw["seeds"] = list(seeds)
    for block in ("training", "teacher_training"):
        raw[block]["av_digits"].update(epochs=epochs, batch_size=batch_size, min_epochs=min(
            raw[block]["av_digits"].get("min_epochs", 0), epochs))
    raw["mst"]["collaborative_init_epochs"]["av_digits"] = epochs
    raw["mst"]["specialist_adaptation_epochs"]["av_digits"] = 1
    raw["fitnets"]["hint_epochs"]["av_digits"] = 1
    raw["mgdfr"]["co_epochs"]["av_digits"] = 1
    raw["mgdfr"]["repeat_permute"]["av_digits"] = 1
    # the segmentation stand-in (Table 2) at toy size: a few 32x32 scenes, the narrowest FuseNets
    raw["rgbd_digits"]["n_scenes"] = 20
    raw["fusenet"]["width"]["rgbd_digits"] = 0.0625
    for block in ("training", "teacher_training"):
        raw[block]["rgbd_digits"].update(epochs=min(epochs, 2), batch_size=4, patience=0, min_epochs=0)
    raw["mst"]["collaborative_init_epochs"]["rgbd_digits"] = 1
    raw["mst"]["specialist_adaptation_epochs"]["rgbd_digits"] = 1
    raw["fitnets"]["hint_epochs"]["rgbd_digits"] = 1
    raw["mgdfr"]["co_epochs"]["rgbd_digits"] = 1
    raw["mgdfr"]["repeat_permute"]["rgbd_digits"] = 1
    raw.update(overrides)
    return raw


def shrunk_params(**kwargs):
    from pipeline.orchestration.config import parse_params

    return parse_params(shrunk_raw(**kwargs))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when other processes load the two CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def params():
    """The repository's params.yaml, parsed (unshrunk)."""
    from pipeline.orchestration.config import load_params

    return load_params(REPO / "params.yaml", restrict=False)


def method_block(name: str, **changes) -> Any:
    """Method `name`'s block of the shrunk real params.yaml, with `changes` replaced."""
    params = shrunk_params()
    block = params.method(name)
    if name == "mst":  # the top-level topk, as the phase-3 stages pass it
        block = block.with_topk(params.topk)
    return dataclasses.replace(block, **changes) if changes else block


@pytest.fixture(scope="session")
def tiny_recipe():
    from pipeline.data.av_digits import AVDigitsRecipe

    return AVDigitsRecipe(samples_per_class=6, pca_variance_kept=0.25, snr_db_min=-6.0, snr_db_max=6.0,
                          spectrogram_size=16, babble_fraction=0.5, seed=3)


@pytest.fixture(scope="session")
def tiny_av_digits(tmp_path_factory, tiny_recipe) -> Path:
    """A 60-sample AV-Digits build in the AV-MNIST layout (built once per test session)."""
    from pipeline.data.av_digits import write_av_digits

    root = tmp_path_factory.mktemp("av_digits")
    write_av_digits(tiny_recipe, root, workers=2)
    return root


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (just now)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synthetic_dataset(n: int = 96, size: int = 16, seed: int = 0, device: str = "cpu"):
    """A learnable two-modality dataset: class-dependent blobs in both modalities, plus noise."""
    from pipeline.data.tensors import DeviceDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    m1 = rng.normal(0, 0.3, (n, 1, 28, 28)).astype(np.float32)
    m2 = rng.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    for i, c in enumerate(labels):
        m1[i, 0, 2 * c:2 * c + 6, 4:20] += 1.0
        m2[i, 0, c % size, :] += 1.0
    return DeviceDataset.from_arrays({"m1": m1, "m2": m2, "labels": labels.astype(np.int64)}, torch.device(device))


def synthetic_split(n: int = 96) -> dict[str, torch.Tensor]:
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": index[:a], "val": index[a:b], "test": index[b:]}


def role_network(role: str, device: str = "cpu"):
    """A fresh network of `role` ("mm", "m1", "m2") for the synthetic data's shapes."""
    from pipeline.models.registry import build_network

    inputs = ("m1", "m2") if role == "mm" else (role,)
    return build_network(ARCHS[role], inputs, 10, [SHAPES[k] for k in inputs]).to(device)


def run_context(data=None, split=None, *, epochs: int = 2, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                selection: str = "val_loss"):
    """A RunContext over (by default) the 96-sample synthetic dataset."""
    from pipeline.training.phases import RunContext

    data = data if data is not None else synthetic_dataset()
    split = split if split is not None else synthetic_split(len(data))
    return RunContext(data, split, batch_size, epochs, lr, 10, torch.Generator().manual_seed(seed),
                      selection=selection, eval_batch_size=batch_size)


def method_setup(method: str, config: str, target: str, data=None, *, block: Any = None, cache: bool = True,
                 teacher=None, seed: int = 0, **fields):
    """The MethodSetup the pipeline would give method `method` for (teacher config, target): fresh student,
    the teacher of the config (fresh, or `teacher`), the shrunk real params block unless `block` is given."""
    from pipeline.methods import MethodSetup

    torch.manual_seed(seed)
    data = data if data is not None else synthetic_dataset()
    other = {"m1": "m2", "m2": "m1"}.get(target)
    if teacher is None and config in ("mm", "cm"):
        teacher = role_network("mm" if config == "mm" else other)
    student = fields.pop("student", "fresh")
    return MethodSetup(student=role_network(target) if student == "fresh" else student, teacher=teacher,
                       teacher_config=config, target=target, dataset="av_digits", num_classes=10,
                       sample=data.batch(torch.arange(4)), build_network=role_network,
                       method_params=block if block is not None else method_block(method),
                       cache_frozen_outputs=cache, **fields)


def with_tap(pair, side: str, **changes):
    """A feature-tap pair (RKD, CRD) with fields of its `side` ("teacher" or "student") tap replaced."""
    return dataclasses.replace(pair, **{side: dataclasses.replace(getattr(pair, side), **changes)})
