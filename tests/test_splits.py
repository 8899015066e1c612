"""The authors' split protocol: 20 seeded permutations, sliced 60/20/20 by the int() rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.splits import (AUTHORS_SPLIT_SEED, Split, make_permutations, read_split_column,
                                  split_positions, write_split_file)
from pipeline.data.validation import DataError


def _reference_permutations(n: int, count: int = 20, seed: int = 19980427) -> list[np.ndarray]:
    rs = np.random.RandomState(seed)
    return [rs.permutation(n) for _ in range(count)]


def test_authors_seed_constant():
    """The split seed is the authors' 19980427."""
    assert AUTHORS_SPLIT_SEED == 19980427


@pytest.mark.parametrize("n", [1, 10, 1449])
def test_make_permutations_equals_successive_randomstate_draws(n):
    """Column j is the j-th successive RandomState(19980427).permutation(n) draw."""
    perms = make_permutations(n, 20, 19980427)
    reference = _reference_permutations(n)
    assert perms.shape == (n, 20)
    for j in range(20):
        np.testing.assert_array_equal(perms[:, j], reference[j])


def test_make_permutations_defaults_are_authors_protocol():
    """Default count and seed are 20 and the authors' seed."""
    np.testing.assert_array_equal(make_permutations(50), make_permutations(50, 20, 19980427))


def test_make_permutations_other_seed_and_count():
    """Seed and count are honoured (a different seed gives a different stream)."""
    perms = make_permutations(30, 3, 7)
    assert perms.shape == (30, 3)
    reference = _reference_permutations(30, 3, 7)
    for j in range(3):
        np.testing.assert_array_equal(perms[:, j], reference[j])
    assert not np.array_equal(perms[:, 0], make_permutations(30, 1)[:, 0])


def test_each_column_is_a_permutation():
    """Every column holds each of 0..n-1 exactly once."""
    n = 1440
    perms = make_permutations(n)
    for j in range(perms.shape[1]):
        np.testing.assert_array_equal(np.sort(perms[:, j]), np.arange(n))


def test_column_zero_for_ten_is_stable():
    """Column 0 for n=10 under seed 19980427 is a fixed, known permutation."""
    expected = np.random.RandomState(19980427).permutation(10)
    column = make_permutations(10)[:, 0]
    np.testing.assert_array_equal(column, expected)
    np.testing.assert_array_equal(column, make_permutations(10)[:, 0])  # deterministic across calls
    np.testing.assert_array_equal(column, [0, 8, 2, 1, 4, 3, 5, 7, 6, 9])


@pytest.mark.parametrize("n, sizes", [(70000, (42000, 14000, 14000)), (1440, (864, 288, 288)),
                                      (1449, (869, 290, 290))])
def test_split_sizes_match_spec_table(n, sizes):
    """Train/val/test sizes follow the spec's table."""
    split = split_positions(np.arange(n))
    assert (len(split.train), len(split.val), len(split.test)) == sizes


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 1000, 1449, 70000])
def test_split_partitions_column_in_order(n):
    """train = first int(0.6n), val up to int(0.8n), test = the rest, in column order."""
    column = make_permutations(n, 1)[:, 0]
    split = split_positions(column, 0.6, 0.2)
    train_end, val_end = int(0.6 * n), int(0.8 * n)
    np.testing.assert_array_equal(split.train, column[:train_end])
    np.testing.assert_array_equal(split.val, column[train_end:val_end])
    np.testing.assert_array_equal(split.test, column[val_end:])
    np.testing.assert_array_equal(np.concatenate([split.train, split.val, split.test]), column)


def test_split_to_device_gives_tensors():
    """Split.to returns a dict of tensors with the same positions."""
    split = split_positions(np.arange(10))
    tensors = split.to(torch.device("cpu"))
    assert set(tensors) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        assert torch.equal(tensors[name], torch.from_numpy(getattr(split, name)))
    assert isinstance(split, Split)


def test_write_read_round_trip(tmp_path):
    """Every column written by write_split_file reads back identically."""
    n = 37
    perms = make_permutations(n)
    path = tmp_path / "nested" / "splits.csv"
    write_split_file(path, perms)
    for seed in range(20):
        column = read_split_column(path, seed, n)
        assert column.dtype == np.int64
        np.testing.assert_array_equal(column, perms[:, seed])


def test_split_file_header_and_index_column(tmp_path):
    """The header is ',group_0,...,group_19' and the first column is the row index."""
    n = 5
    path = tmp_path / "splits.csv"
    write_split_file(path, make_permutations(n))
    lines = path.read_text().splitlines()
    assert lines[0] == "," + ",".join(f"group_{j}" for j in range(20))
    assert len(lines) == n + 1
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(n))


def test_single_row_file_round_trips(tmp_path):
    """A one-sample split file still reads as a 1-D column."""
    path = tmp_path / "splits.csv"
    write_split_file(path, make_permutations(1))
    np.testing.assert_array_equal(read_split_column(path, 3, 1), [0])


def test_seed_beyond_columns_names_missing_group(tmp_path):
    """Reading seed 25 from a 20-column file raises DataError mentioning group_25."""
    path = tmp_path / "splits.csv"
    write_split_file(path, make_permutations(10))
    with pytest.raises(DataError) as info:
        read_split_column(path, 25, 10)
    assert "group_25" in str(info.value)
    assert str(path) in str(info.value)


def _write_raw_split(path, column):
    rows = [",group_0"] + [f"{i},{v}" for i, v in enumerate(column)]
    path.write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("column", [[0, 1, 1, 3], [0, 1, 2, 4], [3, 2, 1, -1]],
                         ids=["duplicate", "out-of-range", "negative"])
def test_column_not_a_permutation_names_file(tmp_path, column):
    """A column that is not a permutation of 0..n-1 raises DataError naming the file."""
    path = tmp_path / "splits.csv"
    _write_raw_split(path, column)
    with pytest.raises(DataError) as info:
        read_split_column(path, 0, 4)
    assert str(path) in str(info.value)
    assert "permutation" in str(info.value)


@pytest.mark.parametrize("n_file, n_expected", [(10, 11), (10, 9)])
def test_wrong_length_names_file(tmp_path, n_file, n_expected):
    """A column of the wrong length for the dataset raises DataError naming the file."""
    path = tmp_path / "splits.csv"
    write_split_file(path, make_permutations(n_file))
    with pytest.raises(DataError) as info:
        read_split_column(path, 0, n_expected)
    assert str(path) in str(info.value)
    assert f"{n_file} entries" in str(info.value)


def test_non_integer_entries_name_file(tmp_path):
    """A column holding non-integers raises DataError naming the file."""
    path = tmp_path / "splits.csv"
    _write_raw_split(path, ["0", "1.5", "2"])
    with pytest.raises(DataError) as info:
        read_split_column(path, 0, 3)
    assert str(path) in str(info.value)


def test_missing_split_file(tmp_path):
    """A missing split file raises DataError naming it."""
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError) as info:
        read_split_column(path, 0, 10)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_group_disjoint_split_keeps_each_group_in_one_part():
    """RAVDESS-like: 24 actors of 60 clips -> 14 / 5 / 5 actors, no actor in two parts, every clip once; the
    group order comes from the authors' seeded generator (the same permutation of the 24 actor ids)."""
    from pipeline.data.splits import make_group_permutations

    groups = np.repeat(np.arange(1, 25), 60)
    columns = make_group_permutations(groups, count=3, seed=AUTHORS_SPLIT_SEED)
    assert columns.shape == (1440, 3)
    first_groups = groups[columns[::60, 0]]
    assert np.array_equal(first_groups, np.arange(1, 25)[np.random.RandomState(AUTHORS_SPLIT_SEED).permutation(24)])
    for j in range(3):
        split = split_positions(columns[:, j], 0.6, 0.2, groups=groups)
        parts = [set(groups[getattr(split, name)]) for name in ("train", "val", "test")]
        assert [len(p) for p in parts] == [14, 5, 5]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert np.array_equal(np.sort(np.concatenate([split.train, split.val, split.test])), np.arange(1440))


def test_a_column_not_listed_group_by_group_is_refused():
    groups = np.repeat(np.arange(4), 3)
    with pytest.raises(DataError, match="group by group"):
        split_positions(np.arange(12)[::-1].copy()[[0, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]], groups=groups)
