"""Which steps of the AV-Digits build depend on the CPU: every intermediate, under emulated CPUs.

    python -m benchmarks.av_digits_cpu_dependence [--samples-per-class 2] [--clips 12]
                                                  [--configs native numpy_x86_v2 ...] [--module-file FILE]

Another machine cannot be borrowed, but the libraries that pick CPU-specific code can be told to pick
another CPU's code, through environment variables read before Python starts. Each configuration
(CONFIGS) therefore runs in a fresh Python process: numpy's SIMD dispatch (NPY_DISABLE_CPU_FEATURES),
OpenBLAS's kernel (OPENBLAS_CORETYPE) and thread count, glibc's libm ifuncs (GLIBC_TUNABLES, glibc
>= 2.33 spelling: `-AVX2,-FMA,...`; the old `-AVX2_Usable` spelling is silently ignored) and numba's
target CPU. The child builds a small AV-Digits (params.yaml's recipe with fewer samples), re-renders
the first clips of that build step by step, speaks a fixed list of utterances (every variant the
build uses) and saves each intermediate:

    espeak       raw int16 samples of the fixed utterances (a fresh process, so eSpeak's hidden state matches)
    pca_axes     the float principal axes before they are rounded to a grid   (module's `principal_axes`)
    pca_images   the PCA-degraded uint8 images of all 5,000 digits
    mixture      the noisy, normalised clips of the build's first samples
    mel_power    their mel power spectrograms before dB                       (module's `mel_power`)
    levels       their dB values on the 0..255 scale, before rint             (module's `spectrogram_levels`)
    spectrogram  their uint8 spectrograms (checked against the build's own)
    final_*      the arrays `build_av_digits` returns

The report gives each intermediate's sha256 (12 hex digits, over dtype, shape and bytes) per
configuration and, where it differs from the first configuration (the reference; by default `native`,
this shell's environment as is), the largest absolute difference and how many elements differ. For
the two rounding steps that absorb float noise (the PCA axes onto their grid, the levels onto uint8)
it prints, in grid units, the reference's nearest value to a rounding boundary, the largest
difference, and the expected number of values pushed across a boundary (sum of 2|difference|).
Steps a module version lacks read "n/a"; `--module-file` probes another version of av_digits.py
(e.g. `git show REV:pipeline/data/av_digits.py > old.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
NUMPY_NO_AVX512 = "X86_V4 AVX512_ICL AVX512_SPR"  # numpy 2.4's dispatch targets above X86_V3
NUMPY_BASELINE = "X86_V3 " + NUMPY_NO_AVX512  # leaves numpy's baseline, X86_V2 (SSE4.2)
GLIBC_NO_FMA = "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"  # libm's exp/pow/sin/cos fall back to the SSE2 ifuncs
# name -> environment changes (None: unset the variable). "native" is this process's environment as is.
CONFIGS: dict[str, dict[str, str | None]] = {
    "native": {},
    "threads_1": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    "threads_2": {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"},
    "blas_autodetect": {"OPENBLAS_CORETYPE": None},
    "blas_skylakex": {"OPENBLAS_CORETYPE": "SkylakeX"},
    "blas_haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "blas_sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge"},
    "blas_prescott": {"OPENBLAS_CORETYPE": "Prescott"},
    "numpy_x86_v3": {"NPY_DISABLE_CPU_FEATURES": NUMPY_NO_AVX512},
    "numpy_x86_v2": {"NPY_DISABLE_CPU_FEATURES": NUMPY_BASELINE},
    "glibc_no_fma": {"GLIBC_TUNABLES": GLIBC_NO_FMA},
    "numba_generic": {"NUMBA_CPU_NAME": "generic"},
    # Whole machines: an AVX2 CPU without AVX-512 (e.g. Zen 2, Haswell) and a pre-2013 one (Sandy Bridge).
    "avx2_machine": {"NPY_DISABLE_CPU_FEATURES": NUMPY_NO_AVX512, "OPENBLAS_CORETYPE": "Haswell",
                     "OPENBLAS_NUM_THREADS": "1", "NUMBA_CPU_NAME": "haswell"},
    "old_machine": {"NPY_DISABLE_CPU_FEATURES": NUMPY_BASELINE, "OPENBLAS_CORETYPE": "Sandybridge",
                    "GLIBC_TUNABLES": GLIBC_NO_FMA, "NUMBA_CPU_NAME": "generic", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1"},
}


def utterances(variants: list[str]) -> list[tuple[str, str, int, int, int]]:
    """A fixed list of (word, voice, rate, pitch, pitch range) using every variant, and every language."""
    from pipeline.data.av_digits import BABBLE_WORDS, DIGIT_WORDS, PITCH, PITCH_RANGE, RATE_WPM
    from pipeline.data.espeak import ENGLISH_LANGUAGES

    words = DIGIT_WORDS + BABBLE_WORDS[:5]
    return [(words[i % len(words)], f"{ENGLISH_LANGUAGES[i % len(ENGLISH_LANGUAGES)]}+{variant}",
             RATE_WPM[0] + (37 * i) % (RATE_WPM[1] - RATE_WPM[0] + 1), PITCH[0] + (13 * i) % (PITCH[1] - PITCH[0] + 1),
             PITCH_RANGE[0] + (29 * i) % (PITCH_RANGE[1] - PITCH_RANGE[0] + 1)) for i, variant in enumerate(variants)]


def _load_module(module_file: str | None):
    """pipeline.data.av_digits, or another version of it from `module_file` registered under the same name."""
    if module_file:
        spec = importlib.util.spec_from_file_location("pipeline.data.av_digits", module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pipeline.data.av_digits"] = module  # the build's worker processes unpickle by this name
        spec.loader.exec_module(module)
        return module
    import pipeline.data.av_digits as module

    return module


def _cpu_in_use() -> dict[str, str]:
    """What the emulation changed, as the libraries report it (numpy's exp target, OpenBLAS's kernel)."""
    info = {"numpy_exp_f64": np.lib.introspect.opt_func_info(func_name="exp")["exp"]["dd"]["current"]}
    try:
        import threadpoolctl

        blas = [lib for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "openblas"]
        info["openblas"] = ", ".join(f"{lib.get('architecture')} x{lib['num_threads']}" for lib in blas)
    except ImportError:  # optional: only for the report
        pass
    return info


def child(out: Path, samples_per_class: int, clips: int, module_file: str | None) -> None:
    """Compute every intermediate in this process (one configuration) and save them to `out` (.npz)."""
    av = _load_module(module_file)
    block = {**yaml.safe_load((REPO / "params.yaml").read_text())["av_digits"], "samples_per_class": samples_per_class}
    recipe = av.AVDigitsRecipe(**block)
    start = time.perf_counter()
    # The build first: its workers fork from this process, whose eSpeak must not have spoken yet.
    built = av.build_av_digits(recipe, workers=1)
    build_s = time.perf_counter() - start
    arrays = {f"final_{key}": built[key] for key in ("image", "audio", "labels")}
    images, _ = av.load_mnist_5k()
    if hasattr(av, "principal_axes"):
        arrays["pca_axes"] = av.principal_axes(images, recipe.pca_variance_kept)[0]
    arrays["pca_images"] = av.pca_degrade(images, recipe.pca_variance_kept)[0]
    # The build's first clips again, as its first chunk renders them (eSpeak here is as fresh as a worker's).
    variants = av.deterministic_variants()
    steps: dict[str, list[np.ndarray]] = {"mixture": [], "mel_power": [], "levels": [], "spectrogram": []}
    for position, label in enumerate(built["labels"][:clips]):
        clip = av.spoken_digit(int(label), recipe, np.random.default_rng([recipe.seed, position]), variants)
        steps["mixture"].append(clip)
        if hasattr(av, "mel_power"):
            power = av.mel_power(clip, recipe.spectrogram_size)
            steps["mel_power"].append(power)
            steps["levels"].append(av.spectrogram_levels(power, recipe.spectrogram_size))
        steps["spectrogram"].append(av.log_mel(clip, recipe.spectrogram_size))
    arrays.update({name: np.stack(values) for name, values in steps.items() if values})
    if not np.array_equal(arrays["spectrogram"], built["audio"][:clips]):
        raise SystemExit("the step-by-step clips do not match the build's: the probe is out of date")
    espeak = av.get_espeak()
    spoken = [np.rint(espeak.synthesize(*u) * 32768).astype(np.int16) for u in utterances(variants)]
    arrays["espeak"] = np.concatenate(spoken)
    arrays["espeak_lengths"] = np.array([len(s) for s in spoken])
    meta = {**_cpu_in_use(), "build_s": round(build_s, 1), "pca_components": int(built["pca_components"])}
    if hasattr(av, "PCA_AXIS_SCALE"):
        meta["pca_axis_scale"] = float(av.PCA_AXIS_SCALE)
    np.savez(out, meta=json.dumps(meta), **arrays)


def run_config(name: str, samples_per_class: int, clips: int, module_file: str | None, folder: Path) -> Path:
    """Run the child for configuration `name` in a fresh interpreter with its environment; returns its .npz."""
    env = dict(os.environ)
    for key, value in CONFIGS[name].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = folder / f"{name}.npz"
    args = [sys.executable, "-m", "benchmarks.av_digits_cpu_dependence", "--child", str(out),
            "--samples-per-class", str(samples_per_class), "--clips", str(clips)]
    args += ["--module-file", module_file] if module_file else []
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"configuration {name} failed:\n{result.stdout}\n{result.stderr}")
    return out


def sha(array: np.ndarray) -> str:
    """First 12 hex digits of the sha256 of an array's bytes, dtype and shape."""
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def difference(ref: np.ndarray, other: np.ndarray) -> str:
    """'same', or the largest absolute difference and the count of differing elements."""
    if ref.shape != other.shape:
        return f"shape {other.shape} vs {ref.shape}"
    if np.array_equal(ref, other):
        return "same"
    a, b = ref.astype(np.float64), other.astype(np.float64)
    differs = int(np.count_nonzero(a != b))
    return f"DIFF max|d|={np.max(np.abs(a - b)):.2e} in {differs}/{a.size}"


def boundary_margin(values: np.ndarray, scale: float) -> float:
    """Smallest distance of values*scale to a rounding boundary (k + 1/2), in grid units."""
    scaled = np.asarray(values, np.float64) * scale
    return float(np.min(np.abs(scaled - np.floor(scaled) - 0.5)))


def report(results: dict[str, dict[str, np.ndarray]]) -> None:
    """Print the per-configuration table of hashes and differences against the first configuration."""
    names = list(results)
    ref = results[names[0]]
    keys = [k for k in ref if k not in ("meta", "espeak_lengths")]
    for name in names:
        meta = json.loads(str(results[name]["meta"]))
        print(f"\n[{name}] env {CONFIGS[name] or '(as is)'}\n  in use: {meta}")
        for key in keys:
            if key not in results[name]:
                print(f"  {key:14s} n/a")
                continue
            value = results[name][key]
            print(f"  {key:14s} {sha(value)}  {difference(ref[key], value)}")
    meta = json.loads(str(ref["meta"]))
    grids = {"pca_axes": meta.get("pca_axis_scale"), "levels": 1.0}  # rounded intermediate -> its grid scale
    print(f"\nrounding steps, in grid units of each: the reference's ({names[0]}) nearest value to a rounding "
          "boundary, the largest cross-config difference, and the expected boundary crossings (sum of 2|d|) "
          "of the worst configuration")
    for key, scale in grids.items():
        if key not in ref or scale is None:
            continue
        crossings = {n: 2 * scale * float(np.sum(np.abs(results[n][key] - ref[key].astype(np.float64))))
                     for n in names}
        worst = max(crossings, key=crossings.get)
        largest = max(scale * float(np.max(np.abs(results[n][key] - ref[key].astype(np.float64)))) for n in names)
        print(f"  {key:10s} grid 1/{scale:g}: nearest {boundary_margin(ref[key], scale):.2e}, largest difference "
              f"{largest:.2e}, expected crossings {crossings[worst]:.1e} ({worst}, {ref[key].size} values)")
    print("\nsummary: configurations whose intermediate differs from the reference")
    for key in keys:
        differ = [n for n in names if key in results[n] and not np.array_equal(results[n][key], ref[key])]
        print(f"  {key:14s} {', '.join(differ) if differ else '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to run; the first is the reference")
    p.add_argument("--samples-per-class", type=int, default=2, help="size of the small build (default 2)")
    p.add_argument("--clips", type=int, default=12, help="clips re-rendered step by step (default 12, at most 100)")
    p.add_argument("--module-file", help="probe this av_digits.py instead of the installed one")
    p.add_argument("--keep", type=Path, help="keep the per-configuration .npz files in this folder")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.samples_per_class, args.clips, args.module_file)
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="avd-cpu-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.configs:
        start = time.perf_counter()
        with np.load(run_config(name, args.samples_per_class, args.clips, args.module_file, folder)) as data:
            results[name] = {k: data[k] for k in data.files}
        print(f"ran {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    report(results)


if __name__ == "__main__":
    main()
