"""Client partitioning: exactly-once assignment, determinism, and the skew that alpha promises."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedpft_lab.errors import ConfigError
from fedpft_lab.partition import (label_count_matrix, largest_remainder_counts, partition,
                                  partition_dirichlet, partition_iid)


def assert_valid_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 for p in parts)
    assert min(len(p) for p in parts) >= 1, "no client may be empty"
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(n)), "each example exactly once"


def skewed_labels(seed: int, n: int = 3000, num_labels: int = 4) -> np.ndarray:
    probs = np.array([0.4, 0.3, 0.2, 0.1])[:num_labels]
    return np.random.default_rng(seed).choice(num_labels, size=n, p=probs / probs.sum())


# ----------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 300), num_labels=st.integers(1, 6),
       alpha=st.floats(0.01, 1e4), convention=st.sampled_from(["flgo", "per-class"]),
       seed=st.integers(0, 2**16))
def test_dirichlet_assigns_every_example_once(data, n, num_labels, alpha, convention, seed):
    labels = np.random.default_rng(seed).integers(0, num_labels, size=n)
    num_clients = data.draw(st.integers(1, min(n, 12)))
    try:
        parts = partition_dirichlet(labels, num_clients, alpha, seed=seed, convention=convention)
    except ConfigError as err:   # only allowed when skew makes an empty client unavoidable
        assert "alpha" in str(err) and "num_clients" in str(err)
        return
    assert_valid_partition(parts, n, num_clients)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), data=st.data(), seed=st.integers(0, 2**16))
def test_iid_sizes_and_exactly_once(n, data, seed):
    num_clients = data.draw(st.integers(1, n))
    parts = partition_iid(np.zeros(n, dtype=int), num_clients, seed=seed)
    assert_valid_partition(parts, n, num_clients)
    expected = [n // num_clients + (k < n % num_clients) for k in range(num_clients)]
    assert [len(p) for p in parts] == expected


@settings(max_examples=50, deadline=None)
@given(total=st.integers(0, 1000),
       weights=st.lists(st.floats(0, 10), min_size=1, max_size=10))
def test_largest_remainder_sums_exactly(total, weights):
    counts = largest_remainder_counts(total, np.array(weights))
    assert counts.sum() == total and counts.min() >= 0


def test_dirichlet_common_settings_never_fail():
    labels = skewed_labels(0)
    for convention in ("flgo", "per-class"):
        for alpha in (0.1, 0.5, 1.0, 10.0):
            parts = partition(labels, 10, "dirichlet", alpha, seed=1, convention=convention)
            assert_valid_partition(parts, len(labels), 10)


# ----------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("scheme,convention", [("iid", "flgo"), ("dirichlet", "flgo"),
                                               ("dirichlet", "per-class")])
def test_seeded_determinism(scheme, convention):
    labels = skewed_labels(1)
    a = partition(labels, 7, scheme, alpha=0.3, seed=5, convention=convention)
    b = partition(labels, 7, scheme, alpha=0.3, seed=5, convention=convention)
    c = partition(labels, 7, scheme, alpha=0.3, seed=6, convention=convention)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def label_shares(parts, labels) -> np.ndarray:
    counts = label_count_matrix(parts, labels).astype(float)
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("convention", ["flgo", "per-class"])
def test_large_alpha_is_nearly_iid(convention):
    labels = skewed_labels(2, n=5000)
    parts = partition_dirichlet(labels, 5, 1e4, seed=0, convention=convention)
    global_share = np.bincount(labels) / len(labels)
    assert np.abs(label_shares(parts, labels) - global_share).max() < 0.03


@pytest.mark.parametrize("convention", ["flgo", "per-class"])
def test_small_alpha_is_strongly_skewed(convention):
    labels = skewed_labels(3, n=5000)
    parts = partition_dirichlet(labels, 10, 0.05, seed=0, convention=convention)
    assert label_shares(parts, labels).max(axis=1).mean() > 0.8


def test_flgo_keeps_client_sizes_nearly_equal():
    labels = skewed_labels(4, n=4000)
    sizes = [len(p) for p in partition_dirichlet(labels, 8, 0.5, seed=0, convention="flgo")]
    assert max(sizes) - min(sizes) <= 0.05 * 4000 / 8


def test_string_labels_are_fine_for_partitioning():
    labels = np.array(["cat", "dog", "cat", "bird", "dog", "cat"] * 5)
    assert_valid_partition(partition(labels, 3, "dirichlet", 1.0), len(labels), 3)


def test_label_count_matrix_matches_hand_count():
    labels = [0, 1, 1, 2, 0, 2, 2, 1]
    parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7])]
    expected = np.array([[1, 2, 0],
                         [1, 0, 1],
                         [0, 1, 2]])
    got = label_count_matrix(parts, labels)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert label_count_matrix(parts, labels, num_labels=5).shape == (3, 5)


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_parameter():
    labels = list(range(37))
    with pytest.raises(ConfigError, match=r"num_clients must be in \[1, 37\].*got 50"):
        partition(labels, 50)
    with pytest.raises(ConfigError, match=r"num_clients must be in \[1, 37\].*got 0"):
        partition(labels, 0, "dirichlet")
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, inf\), got -1"):
        partition(labels, 3, "dirichlet", alpha=-1)
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, inf\)"):
        partition(labels, 3, "dirichlet", alpha=float("inf"))
    with pytest.raises(ConfigError, match="scheme must be one of 'iid', 'dirichlet'"):
        partition(labels, 3, "pathological")
    with pytest.raises(ConfigError, match="convention must be one of 'flgo', 'per-class'"):
        partition(labels, 3, "dirichlet", convention="flwr")
    with pytest.raises(ConfigError, match="labels must be a non-empty"):
        partition([], 1)
    with pytest.raises(ConfigError, match="num_labels must be in"):
        label_count_matrix([np.array([0])], [3], num_labels=2)


def test_impossible_skew_raises_instead_of_empty_client():
    labels = np.repeat([0, 1], 20)   # two labels, 30 clients, per-class alpha tiny: clients starve
    with pytest.raises(ConfigError, match=r"num_clients=30.*alpha=0\.001"):
        partition_dirichlet(labels, 30, 0.001, convention="per-class")
