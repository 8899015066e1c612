"""AV-MNIST loading: a valid layout loads normalised; bad input stops with the file and the expectation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.av_mnist import load_av_mnist, write_av_mnist_layout
from pipeline.data.validation import DataError, load_npy

N, N_TRAIN, S = 30, 20, 16


def _arrays(n: int = N, size: int = S, seed: int = 0):
    rs = np.random.RandomState(seed)
    images = rs.randint(0, 256, size=(n, 784)).astype(np.uint8)
    audio = rs.randint(0, 256, size=(n, size, size)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.int64)
    return images, audio, labels


def _write(root: Path, images=None, audio=None, labels=None, n_train: int = N_TRAIN) -> Path:
    default_images, default_audio, default_labels = _arrays()
    write_av_mnist_layout(root,
                          default_images if images is None else images,
                          default_audio if audio is None else audio,
                          default_labels if labels is None else labels,
                          n_train)
    return root


def _per_sample_min_max(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(len(array), -1).astype(np.float64)
    low = flat.min(axis=1, keepdims=True)
    high = flat.max(axis=1, keepdims=True)
    span = np.where(high > low, high - low, 1.0)
    return ((flat - low) / span).reshape(array.shape)


@pytest.fixture
def dataset(tmp_path):
    images, audio, labels = _arrays()
    images[3] = 7          # a constant image
    audio[5] = 200         # a constant spectrogram
    root = _write(tmp_path / "avmnist", images, audio, labels)
    return root, images, audio, labels


def test_write_layout_creates_the_six_files(dataset):
    """write_av_mnist_layout writes the MultiBench file names, split at n_train."""
    root = dataset[0]
    for name in ("image/train_data.npy", "image/test_data.npy", "audio/train_data.npy", "audio/test_data.npy",
                 "train_labels.npy", "test_labels.npy"):
        assert (root / name).is_file(), name
    assert np.load(root / "train_labels.npy").shape == (N_TRAIN,)
    assert np.load(root / "audio/test_data.npy").shape == (N - N_TRAIN, S, S)


def test_valid_dataset_shapes_and_dtypes(dataset):
    """A valid tiny dataset loads with the documented shapes and dtypes, train then test."""
    root, _, _, labels = dataset
    data = load_av_mnist(root, S)
    assert set(data) == {"m1", "m2", "labels"}
    assert data["m1"].shape == (N, 1, 28, 28)
    assert data["m2"].shape == (N, 1, S, S)
    assert data["labels"].shape == (N,)
    assert data["m1"].dtype == np.float32 and data["m2"].dtype == np.float32
    assert data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], labels)


def test_valid_dataset_is_per_sample_min_max_normalised(dataset):
    """Each sample is min-max scaled over its own values, matching an independent computation."""
    root, images, audio, _ = dataset
    data = load_av_mnist(root, S)
    expected_image = _per_sample_min_max(images).reshape(N, 1, 28, 28)
    expected_audio = _per_sample_min_max(audio).reshape(N, 1, S, S)
    np.testing.assert_allclose(data["m1"], expected_image, atol=1e-6)
    np.testing.assert_allclose(data["m2"], expected_audio, atol=1e-6)
    for key in ("m1", "m2"):
        values = data[key]
        assert values.min() >= 0 and values.max() <= 1
        assert np.isfinite(values).all()


def test_each_non_constant_sample_spans_zero_to_one(dataset):
    """Every non-constant sample has min exactly 0 and max exactly 1."""
    root = dataset[0]
    data = load_av_mnist(root, S)
    for key, constant in (("m1", 3), ("m2", 5)):
        flat = data[key].reshape(N, -1)
        others = np.delete(flat, constant, axis=0)
        np.testing.assert_array_equal(others.min(axis=1), 0.0)
        np.testing.assert_array_equal(others.max(axis=1), 1.0)


def test_constant_sample_maps_to_zeros(dataset):
    """A constant sample becomes all zeros, not NaN."""
    root = dataset[0]
    data = load_av_mnist(root, S)
    assert np.all(data["m1"][3] == 0)
    assert np.all(data["m2"][5] == 0)


def test_float_input_is_normalised_too(tmp_path):
    """Float32 arrays on an arbitrary scale are normalised the same way."""
    images, audio, labels = _arrays()
    images = images.astype(np.float32) * 3.5 - 100
    audio = audio.astype(np.float32) / 7 + 2
    root = _write(tmp_path / "d", images, audio, labels)
    data = load_av_mnist(root, S)
    np.testing.assert_allclose(data["m1"], _per_sample_min_max(images).reshape(N, 1, 28, 28), atol=1e-5)
    np.testing.assert_allclose(data["m2"], _per_sample_min_max(audio).reshape(N, 1, S, S), atol=1e-5)


def _assert_data_error(root: Path, path: Path, words: tuple[str, ...], size: int = S) -> None:
    with pytest.raises(DataError) as info:
        load_av_mnist(root, size)
    message = str(info.value)
    assert str(path) in message, message
    assert any(word in message for word in words), message


def test_missing_root_folder(tmp_path):
    """A missing dataset folder names the folder and the expected layout."""
    root = tmp_path / "no_such_dataset"
    _assert_data_error(root, root, ("not found",))
    with pytest.raises(DataError, match="image/train_data.npy"):
        load_av_mnist(root, S)


@pytest.mark.parametrize("name", ["audio/test_data.npy", "image/train_data.npy", "test_labels.npy"])
def test_missing_file(tmp_path, name):
    """A deleted file is reported by its path."""
    root = _write(tmp_path / "d")
    (root / name).unlink()
    _assert_data_error(root, root / name, ("not found",))


def test_truncated_file(tmp_path):
    """A .npy cut short names the file as unreadable/truncated."""
    root = _write(tmp_path / "d")
    path = root / "image/train_data.npy"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_data_error(root, path, ("truncated", "corrupt"))


def test_file_that_is_not_npy(tmp_path):
    """A file of text where a .npy is expected names the file."""
    root = _write(tmp_path / "d")
    path = root / "train_labels.npy"
    path.write_text("0,1,2,3\n")
    _assert_data_error(root, path, ("truncated", "corrupt", "readable"))


def test_audio_of_other_size(tmp_path):
    """Audio of S=20 loaded as S=16 names the audio file and the expected shape."""
    images, _, labels = _arrays()
    _, audio20, _ = _arrays(size=20)
    root = _write(tmp_path / "d", images, audio20, labels)
    _assert_data_error(root, root / "audio/train_data.npy", ("shape",))
    with pytest.raises(DataError, match=r"\(20, 16, 16\)"):
        load_av_mnist(root, S)


def test_image_with_783_columns(tmp_path):
    """An image array with 783 columns names the image file and the expected shape."""
    images, audio, labels = _arrays()
    root = _write(tmp_path / "d", images[:, :783], audio, labels)
    _assert_data_error(root, root / "image/train_data.npy", ("shape",))
    with pytest.raises(DataError, match=r"\(20, 784\)"):
        load_av_mnist(root, S)


def test_image_sample_count_differs_from_labels(tmp_path):
    """An image file with fewer rows than its labels file names the image file."""
    root = _write(tmp_path / "d")
    path = root / "image/test_data.npy"
    np.save(path, np.load(path)[:-1])
    _assert_data_error(root, path, ("shape",))


def test_labels_not_one_dimensional(tmp_path):
    """A 2-D labels file names the labels file."""
    root = _write(tmp_path / "d")
    path = root / "train_labels.npy"
    np.save(path, np.zeros((N_TRAIN, 1), dtype=np.int64))
    _assert_data_error(root, path, ("1-D",))


@pytest.mark.parametrize("modality, value", [("audio", np.nan), ("audio", np.inf), ("image", -np.inf)])
def test_non_finite_values(tmp_path, modality, value):
    """A NaN or infinite value names the file and says finite numbers are expected."""
    images, audio, labels = _arrays()
    images, audio = images.astype(np.float32), audio.astype(np.float32)
    target = audio if modality == "audio" else images
    target[N_TRAIN + 4].flat[3] = value  # a test-split sample
    root = _write(tmp_path / "d", images, audio, labels)
    path = root / f"{modality}/test_data.npy"
    _assert_data_error(root, path, ("NaN", "finite"))
    with pytest.raises(DataError, match="sample 4"):
        load_av_mnist(root, S)


@pytest.mark.parametrize("bad", [10, -1, 255])
def test_labels_out_of_range(tmp_path, bad):
    """A label outside 0..9 names the labels file and says out of range."""
    images, audio, labels = _arrays()
    labels[N_TRAIN + 2] = bad
    root = _write(tmp_path / "d", images, audio, labels)
    _assert_data_error(root, root / "test_labels.npy", ("range",))
    with pytest.raises(DataError, match="position 2"):
        load_av_mnist(root, S)


@pytest.mark.parametrize("bad", [2.5, np.nan])
def test_non_integer_labels(tmp_path, bad):
    """Non-whole-number labels name the labels file."""
    images, audio, labels = _arrays()
    labels = labels.astype(np.float64)
    labels[1] = bad
    root = _write(tmp_path / "d", images, audio, labels)
    _assert_data_error(root, root / "train_labels.npy", ("whole numbers",))


def test_whole_float_labels_are_accepted_as_int64(tmp_path):
    """Float labels holding whole numbers load as int64."""
    images, audio, labels = _arrays()
    root = _write(tmp_path / "d", images, audio, labels.astype(np.float32))
    data = load_av_mnist(root, S)
    assert data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], labels)


@pytest.mark.parametrize("name", ["train_labels.npy", "audio/train_data.npy"])
def test_pickled_object_array_is_refused(tmp_path, name):
    """An object array (needs unpickling) is refused without unpickling, naming the file."""
    root = _write(tmp_path / "d")
    path = root / name
    original = np.load(path)
    objects = np.empty(original.shape, dtype=object)
    objects[...] = original.tolist() if original.ndim == 1 else 0
    np.save(path, objects, allow_pickle=True)
    _assert_data_error(root, path, ("readable", "corrupt", "numeric"))


def test_string_array_is_refused(tmp_path):
    """A non-numeric (unicode) array names the file and says numeric values are expected."""
    root = _write(tmp_path / "d")
    path = root / "train_labels.npy"
    np.save(path, np.array([str(i % 10) for i in range(N_TRAIN)]))
    _assert_data_error(root, path, ("numeric",))


def test_load_npy_checks_shape_and_ndim(tmp_path):
    """load_npy itself names the file on shape and ndim mismatches."""
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((3, 4)))
    assert load_npy(path, shape=(3, 4)).shape == (3, 4)
    with pytest.raises(DataError, match="shape"):
        load_npy(path, shape=(4, 3))
    with pytest.raises(DataError, match="3-D"):
        load_npy(path, ndim=3)
    with pytest.raises(DataError) as info:
        load_npy(tmp_path / "b.npy", hint="run the build stage")
    assert str(tmp_path / "b.npy") in str(info.value) and "run the build stage" in str(info.value)


def test_data_error_is_a_value_error():
    """DataError subclasses ValueError."""
    assert issubclass(DataError, ValueError)
