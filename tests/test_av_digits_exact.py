"""AV-Digits is the same bytes on every x86-64 CPU: pinned hashes, and builds under an emulated other CPU.

The emulation (benchmarks/av_digits_cpu_dependence.py runs the full set) makes numpy dispatch its
baseline SSE code instead of AVX-512, OpenBLAS use its Sandy Bridge kernels on one thread, and glibc's
libm pick its non-FMA variants. Each is read before Python starts, hence the subprocesses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.av_digits import PCA_AXIS_SCALE, AVDigitsRecipe, build_av_digits
from tests.conftest import REPO, raw_params

# sha256 of the arrays' bytes for params.yaml's av_digits recipe at 2 samples per class (20 samples),
# computed on an AMD EPYC (Zen 4, AVX-512); re-pin only on a deliberate change of the recipe or the code.
PINNED = {"image": "1df88bb4e20b08343a50fab5fe30b29d5061d47cf2d3ff47073b5d3797c92afb",
          "audio": "a2a0f5d3530388d7abc400555b7de8d5de2101c40a9597de83634fa93f0df817",
          "labels": "a5dd58d49b9d4a1776d21e09082f78fd38a056d94b889bb4bdba54ce3cd55ae9"}
SHAPES = {"image": ((20, 784), "uint8"), "audio": ((20, 16, 16), "uint8"), "labels": ((20,), "int64")}
OTHER_CPU = {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Sandybridge",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
             "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"}
# Run in a fresh interpreter: build the recipe (JSON, argv[1]), save the float values just before the two
# rounding steps (PCA axes, first clips' spectrogram levels) and what the CPU emulation selected to
# argv[2], and print the arrays' sha256 as JSON. The clips are re-rendered after the build, in a process
# whose eSpeak has not spoken yet, as the build's first chunk renders them.
_BUILD_AND_HASH = """
import hashlib, json, sys
import numpy as np
import threadpoolctl
from pipeline.data import av_digits as av
recipe = av.AVDigitsRecipe(**json.loads(sys.argv[1]))
arrays = av.build_av_digits(recipe, workers=1)
variants = av.deterministic_variants()
size = recipe.spectrogram_size
clips = [av.spoken_digit(int(label), recipe, np.random.default_rng([recipe.seed, i]), variants)
         for i, label in enumerate(arrays["labels"][:4])]
np.savez(sys.argv[2], levels=np.stack([av.spectrogram_levels(av.mel_power(clip, size), size) for clip in clips]),
         axes=av.principal_axes(av.load_mnist_5k()[0], recipe.pca_variance_kept)[0],
         numpy_exp=np.lib.introspect.opt_func_info(func_name="exp")["exp"]["dd"]["current"],
         openblas=[lib.get("architecture") for lib in threadpoolctl.threadpool_info()
                   if lib["internal_api"] == "openblas"])
print(json.dumps({k: hashlib.sha256(arrays[k].tobytes()).hexdigest() for k in ("image", "audio", "labels")}))
"""


@pytest.fixture(scope="module")
def small_recipe() -> AVDigitsRecipe:
    """params.yaml's AV-Digits recipe, shrunk to 2 samples per class."""
    return dataclasses.replace(AVDigitsRecipe(**raw_params()["av_digits"]), samples_per_class=2)


def _build_in_subprocess(recipe: AVDigitsRecipe, env_changes: dict[str, str], out) -> tuple[dict, dict]:
    """Digests and saved intermediates of a build in a fresh interpreter with `env_changes` applied."""
    env = {**os.environ, **env_changes, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _BUILD_AND_HASH, json.dumps(dataclasses.asdict(recipe)), str(out)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with np.load(out) as saved:
        return json.loads(result.stdout.strip().splitlines()[-1]), {k: saved[k] for k in saved.files}


@pytest.fixture(scope="module")
def this_cpu(small_recipe, tmp_path_factory):
    return _build_in_subprocess(small_recipe, {}, tmp_path_factory.mktemp("this_cpu") / "saved.npz")


@pytest.fixture(scope="module")
def other_cpu(small_recipe, tmp_path_factory):
    return _build_in_subprocess(small_recipe, OTHER_CPU, tmp_path_factory.mktemp("other_cpu") / "saved.npz")


def test_build_matches_the_pinned_hashes(small_recipe):
    arrays = build_av_digits(small_recipe, workers=2)
    assert {k: (arrays[k].shape, str(arrays[k].dtype)) for k in SHAPES} == SHAPES
    digests = {k: hashlib.sha256(arrays[k].tobytes()).hexdigest() for k in PINNED}
    assert digests == PINNED, "AV-Digits changed bits: see benchmarks/av_digits_cpu_dependence.py"


def test_emulated_other_cpu_gives_the_pinned_hashes(other_cpu):
    digests, saved = other_cpu
    assert str(saved["numpy_exp"]) == "baseline(X86_V2)" and set(saved["openblas"]) == {"Sandybridge"}  # emulated
    assert digests == PINNED


def test_cpu_noise_stays_far_from_the_rounding_steps(this_cpu, other_cpu):
    """The values just before rounding may differ between CPUs, but by orders of magnitude less than the
    grid (float32 spectrograms differed by up to 5e-5 of a uint8 step)."""
    (_, here), (_, there) = this_cpu, other_cpu
    assert np.max(np.abs(here["axes"] - there["axes"])) * PCA_AXIS_SCALE < 1e-8
    assert np.max(np.abs(here["levels"] - there["levels"])) < 1e-9
