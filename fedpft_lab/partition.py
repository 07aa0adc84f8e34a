"""Split one labelled dataset across simulated clients: IID, or label-skewed with a Dirichlet prior.

Federated learning is hard mostly because clients see *different* label mixes. A Dirichlet
distribution with a concentration ``alpha`` dials that skew: large alpha -> every client looks like
the global data (IID), small alpha -> each client holds one or two labels.

Two conventions for alpha are in use, and they are NOT the same number:

* ``convention="flgo"`` (FLGo, used by the official FedPFT code). Every client k draws its own label
  mix ``q_k ~ Dir(alpha * p)``, where ``p`` is the global label distribution, so alpha is the *total*
  concentration spread over all K labels. Client sizes stay (nearly) equal, and the draws are
  redone until the size-weighted mix of all clients matches ``p``, so every example can be handed out.
* ``convention="per-class"`` (Yurochkin et al. 2019, flwr-datasets, most FL papers). For every label
  c, the share of that label held by each client is drawn from ``Dir(alpha * 1_N)``: alpha is the
  concentration *per client*, and client sizes vary freely.

Roughly, FLGo alpha ~ K * per-class alpha for K labels (FLGo alpha=1.0 on 2 labels looks like
per-class alpha=0.5). When you compare with a paper, check which convention it used.

Every function returns one int64 index array per client (indices into ``labels``); every example is
assigned exactly once, no client is empty, and the same seed gives the same split.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpft_lab.config import PARTITION_CONVENTIONS as CONVENTIONS, PARTITION_SCHEMES as SCHEMES
from fedpft_lab.errors import ConfigError, check_choice, check_range

MIX_TOLERANCE = 1e-6          # squared error allowed between the clients' mixture and p (FLGo)
TRIES_PER_TOLERANCE = 500     # loosen the tolerance x10 after this many unsuccessful redraws
MAX_MIX_TRIES = 5000          # hard bound on redraws (tolerance is 1e4 by then, so always met)
CANDIDATES_PER_TRY = 8        # fresh Dirichlet draws compared at each redraw
MAX_SPLIT_TRIES = 1000        # bounded restarts when a client would be left empty


# ----------------------------------------------------------------------------- small helpers

def _as_label_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"labels must be a non-empty 1-D sequence, got shape {arr.shape}")
    return arr


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= num_examples:
        raise ConfigError(f"num_clients must be in [1, {num_examples}] (the number of examples), "
                          f"got {num_clients!r}")


def largest_remainder_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts proportional to ``weights`` that sum exactly to ``total``.

    Plain rounding can lose or invent an example; the largest-remainder (Hamilton) method floors
    every share and hands the leftover units to the largest fractional parts.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if total == 0:
        return np.zeros(len(weights), dtype=np.int64)
    if weights.sum() <= 0:
        weights = np.ones(len(weights))
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    if leftover > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def _equal_sizes(num_examples: int, num_clients: int) -> np.ndarray:
    """floor(n/N) each, +1 for the first n mod N clients (the IID sizes)."""
    sizes = np.full(num_clients, num_examples // num_clients, dtype=np.int64)
    sizes[: num_examples % num_clients] += 1
    return sizes


def _indices_from_counts(label_ids: np.ndarray, counts: np.ndarray,
                         rng: np.random.Generator) -> list[np.ndarray]:
    """Turn a (labels x clients) count matrix into shuffled per-client index arrays."""
    num_labels, num_clients = counts.shape
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_labels):
        idx = rng.permutation(np.flatnonzero(label_ids == c))
        bounds = np.cumsum(counts[c])[:-1]
        for k, chunk in enumerate(np.split(idx, bounds)):
            pieces[k].append(chunk)
    return [rng.permutation(np.concatenate(p)).astype(np.int64) for p in pieces]


def _dirichlet(rng: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    """One Dirichlet draw that never returns NaN or all zeros.

    For tiny concentrations the draw can underflow; the limit of Dir(a) as a -> 0 is a one-hot
    vector on label c with probability a_c / sum(a), so we fall back to exactly that.
    """
    for _ in range(10):
        q = rng.dirichlet(concentration)
        if np.all(np.isfinite(q)) and q.sum() > 0:
            return q / q.sum()
    q = np.zeros(len(concentration))
    q[rng.choice(len(concentration), p=concentration / concentration.sum())] = 1.0
    return q


# ----------------------------------------------------------------------------- IID

def partition_iid(labels: Sequence[int] | np.ndarray, num_clients: int,
                  seed: int = 0) -> list[np.ndarray]:
    """Shuffle, then cut into equal consecutive chunks: every client sees the global label mix."""
    labels = _as_label_array(labels)
    _check_num_clients(num_clients, len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum(_equal_sizes(len(labels), num_clients))[:-1]
    return [chunk.astype(np.int64) for chunk in np.split(order, bounds)]


# ----------------------------------------------------------------------------- Dirichlet, FLGo

def _mixture_error(mix_sum: np.ndarray, p: np.ndarray) -> float:
    mix = mix_sum / mix_sum.sum()
    return float(((mix - p) ** 2).sum())


def _flgo_label_mixes(p: np.ndarray, sizes: np.ndarray, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Draw q_k ~ Dir(alpha * p) per client, redrawing single clients until sum_k n_k q_k / n ~ p.

    Each try picks the next client (round robin), draws a few candidates for it and keeps the one
    that shrinks the mixture error most (or keeps the old mix if none helps). The tolerance
    loosens x10 every TRIES_PER_TOLERANCE tries, so the loop always ends.
    """
    num_clients = len(sizes)
    mixes = np.stack([_dirichlet(rng, alpha * p) for _ in range(num_clients)])   # [N, C]
    mix_sum = sizes @ mixes
    error = _mixture_error(mix_sum, p)
    tolerance = MIX_TOLERANCE
    for attempt in range(MAX_MIX_TRIES):
        if attempt > 0 and attempt % TRIES_PER_TOLERANCE == 0:
            tolerance *= 10
        if error <= tolerance:
            break
        k = attempt % num_clients
        without_k = mix_sum - sizes[k] * mixes[k]
        candidates = np.stack([_dirichlet(rng, alpha * p) for _ in range(CANDIDATES_PER_TRY)])
        errors = [_mixture_error(without_k + sizes[k] * q, p) for q in candidates]
        best = int(np.argmin(errors))
        if errors[best] < error:
            mixes[k], error = candidates[best], errors[best]
            mix_sum = without_k + sizes[k] * mixes[k]
    return mixes


def _flgo_counts(label_ids: np.ndarray, num_labels: int, num_clients: int, alpha: float,
                 rng: np.random.Generator) -> np.ndarray:
    """(labels x clients) counts: label c split across clients in proportion to n_k q_k[c]."""
    label_totals = np.bincount(label_ids, minlength=num_labels)
    p = label_totals / label_totals.sum()
    sizes = _equal_sizes(len(label_ids), num_clients)
    mixes = _flgo_label_mixes(p, sizes, alpha, rng)
    wanted = sizes[:, None] * mixes                                              # [N, C]
    return np.stack([largest_remainder_counts(int(label_totals[c]), wanted[:, c])
                     for c in range(num_labels)])


# ----------------------------------------------------------------------------- Dirichlet, per class

def _per_class_counts(label_ids: np.ndarray, num_labels: int, num_clients: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(labels x clients) counts: each label's examples spread over clients by Dir(alpha * 1_N)."""
    label_totals = np.bincount(label_ids, minlength=num_labels)
    concentration = np.full(num_clients, alpha)
    return np.stack([largest_remainder_counts(int(label_totals[c]), _dirichlet(rng, concentration))
                     for c in range(num_labels)])


def partition_dirichlet(labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float,
                        seed: int = 0, convention: str = "flgo") -> list[np.ndarray]:
    """Label-skewed split; smaller ``alpha`` means more skew. See the module docstring for conventions.

    A draw that leaves some client empty is redone (bounded); if that keeps failing the request is
    infeasible in practice and we raise ConfigError instead of silently returning an empty client.
    """
    labels = _as_label_array(labels)
    check_range("alpha", alpha, 0, float("inf"), lo_open=True, hi_open=True)
    check_choice("convention", convention, CONVENTIONS)
    _check_num_clients(num_clients, len(labels))

    _, label_ids = np.unique(labels, return_inverse=True)
    label_ids = label_ids.reshape(-1)
    num_labels = int(label_ids.max()) + 1
    draw_counts = _flgo_counts if convention == "flgo" else _per_class_counts
    # FLGo draws are expensive (mixture matching) and almost never leave a client empty.
    tries = 20 if convention == "flgo" else MAX_SPLIT_TRIES
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        counts = draw_counts(label_ids, num_labels, num_clients, float(alpha), rng)
        if counts.sum(axis=0).min() >= 1:
            return _indices_from_counts(label_ids, counts, rng)
    raise ConfigError(
        f"could not give each of num_clients={num_clients} clients at least one example with "
        f"alpha={alpha:g} (convention {convention!r}) in {tries} tries; use a larger alpha "
        f"(e.g. alpha >= 0.1), fewer clients (num_clients must be in [1, {len(labels)}]), "
        f"or convention='flgo'")


# ----------------------------------------------------------------------------- front door

def partition(labels: Sequence[int] | np.ndarray, num_clients: int, scheme: str = "iid",
              alpha: float = 1.0, seed: int = 0, convention: str = "flgo") -> list[np.ndarray]:
    """Dispatch to ``partition_iid`` or ``partition_dirichlet`` (alpha/convention ignored for IID)."""
    check_choice("scheme", scheme, SCHEMES)
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed=seed)
    return partition_dirichlet(labels, num_clients, alpha, seed=seed, convention=convention)


def label_count_matrix(parts: list[np.ndarray], labels: Sequence[int] | np.ndarray,
                       num_labels: int | None = None) -> np.ndarray:
    """How many examples of each label each client holds: int64 [clients, labels], for heatmaps."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ConfigError(f"labels must be non-negative integers, got {int(labels.min())}")
    width = int(labels.max()) + 1 if labels.size else 0
    if num_labels is None:
        num_labels = width
    elif num_labels < width:
        raise ConfigError(f"num_labels must be in [{width}, inf) (largest label + 1), got {num_labels}")
    counts = np.zeros((len(parts), num_labels), dtype=np.int64)
    for k, part in enumerate(parts):
        counts[k] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_labels)
    return counts
