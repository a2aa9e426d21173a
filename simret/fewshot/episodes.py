"""Reproducible N-way K-shot episodes as index arrays into a feature bank.

``sample_episodes(labels, n_way, n_shot, n_query, n_episodes, seed)`` draws, for every episode, ``n_way``
distinct classes uniformly without replacement, then ``n_shot + n_query`` distinct images of each class
uniformly without replacement; the first ``n_shot`` are the support, the rest the query, so support and query
never share an image.

Layout of an episode (class-major, as ``support_labels``/``query_labels`` say)::

    support        (E, n_way*n_shot)   [c0 s0, c0 s1, …, c0 s(K-1), c1 s0, …]   indices into the bank
    support_labels (E, n_way*n_shot)   [0, 0, …, 0, 1, …]                        0..n_way-1
    query          (E, n_way*n_query)  [c0 q0, …, c0 q(Q-1), c1 q0, …]
    query_labels   (E, n_way*n_query)
    classes        (E, n_way)          the bank label behind episode label 0..n_way-1 (a random order)

Reproducibility: the only random numbers used are the raw 64-bit outputs of NumPy's PCG64 seeded with
``SeedSequence(seed)`` — bit-generator streams are the part of NumPy's RNG that its compatibility policy
(NEP 19) keeps fixed across platforms and versions, unlike ``Generator`` methods — turned into doubles here
as ``(raw >> 11) · 2⁻⁵³`` (exact in IEEE arithmetic); classes are picked by sorting random keys, images by
Floyd's algorithm and a key sort, all in integer/IEEE arithmetic that gives the same result on every machine.
Every episode consumes a fixed number of doubles in order, so the first ``n`` episodes of a longer run are
exactly the episodes of a run with ``n_episodes=n``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

_CHUNK = 4096  # episodes drawn per vectorised step (does not change the result)


@dataclass(frozen=True, eq=False)
class Episodes:
    """A batch of ``E`` few-shot episodes: int64 index arrays into a feature bank (see the module docstring)."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray
    n_way: int
    n_shot: int
    n_query: int
    seed: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return int(self.support.shape[0])

    def __getitem__(self, index: Union[int, slice, np.ndarray]) -> Episodes:
        """Episodes ``index`` (an int keeps the batch dimension: ``episodes[3]`` has ``E = 1``)."""
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1) if index != -1 else slice(-1, None)
        return Episodes(self.support[index], self.support_labels[index], self.query[index], self.query_labels[index],
                        self.classes[index], self.n_way, self.n_shot, self.n_query, self.seed, dict(self.meta))

    @property
    def shape(self) -> str:
        return f"{len(self)} episodes, {self.n_way}-way {self.n_shot}-shot {self.n_query}-query"

    def __repr__(self) -> str:
        return f"Episodes({self.shape}, seed={self.seed})"


def sample_episodes(labels: Sequence[Any], n_way: int, n_shot: int, n_query: int, n_episodes: int,
                    seed: int = 0, *, class_names: Optional[Sequence[str]] = None) -> Episodes:
    """Draw ``n_episodes`` reproducible ``n_way``-way ``n_shot``-shot episodes with ``n_query`` queries per class.

    Args:
        labels: ``(N,)`` class of every image of the bank (ints, or any sortable values).
        n_way: classes per episode (drawn without replacement).
        n_shot: support images per class.
        n_query: query images per class (disjoint from the support).
        n_episodes: how many episodes ``E``.
        seed: non-negative int; the same seed gives the same episodes on every machine.
        class_names: optional names for the label values ``0..C-1`` (used in error messages only).

    Returns:
        ``Episodes`` with int64 arrays ``support``/``support_labels`` ``(E, n_way*n_shot)``,
        ``query``/``query_labels`` ``(E, n_way*n_query)`` and ``classes`` ``(E, n_way)``.

    Raises:
        ValueError: bad sizes, ``n_way`` above the number of classes, or any class with fewer than
            ``n_shot + n_query`` images (every such class is named with its count).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    for name, value, low in (("n_way", n_way, 1), ("n_shot", n_shot, 1), ("n_query", n_query, 1),
                             ("n_episodes", n_episodes, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n_way, n_shot, n_query, n_episodes = int(n_way), int(n_shot), int(n_query), int(n_episodes)

    values, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_classes = len(values)
    per_class = n_shot + n_query

    def name(c: int) -> str:
        value = values[c]
        if class_names is not None:
            try:
                return str(class_names[int(value)])
            except (IndexError, TypeError, ValueError):
                pass
        return str(value.item() if hasattr(value, "item") else value)

    if n_way > n_classes:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes, but the labels hold only {n_classes}")
    small = np.flatnonzero(counts < per_class)
    if small.size:
        listed = ", ".join(f"{name(c)} ({counts[c]} image{'' if counts[c] == 1 else 's'})" for c in small[:8])
        more = f" and {small.size - 8} more" if small.size > 8 else ""
        raise ValueError(f"{small.size} class(es) have fewer than shot + query = {n_shot} + {n_query} = {per_class} "
                         f"images: {listed}{more}")

    order = np.argsort(class_of, kind="stable").astype(np.int64)  # bank indices grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    counts = counts.astype(np.int64)

    bits = np.random.PCG64(np.random.SeedSequence(int(seed)))
    draws = n_classes + 2 * n_way * per_class  # doubles consumed by one episode, always in this order
    support = np.empty((n_episodes, n_way * n_shot), dtype=np.int64)
    query = np.empty((n_episodes, n_way * n_query), dtype=np.int64)
    chosen = np.empty((n_episodes, n_way), dtype=np.int64)
    for begin in range(0, n_episodes, _CHUNK):
        e = min(_CHUNK, n_episodes - begin)
        keys = _uniforms(bits, (e, draws))
        classes = np.argsort(keys[:, :n_classes], axis=1, kind="stable")[:, :n_way]  # (e, W) distinct
        picks = _floyd(counts[classes], keys[:, n_classes:n_classes + n_way * per_class].reshape(e, n_way, per_class))
        shuffle = np.argsort(keys[:, n_classes + n_way * per_class:].reshape(e, n_way, per_class), axis=2,
                             kind="stable")
        picks = np.take_along_axis(picks, shuffle, axis=2)  # a uniformly random ordered sample of each class
        bank = order[starts[classes][:, :, None] + picks]  # (e, W, K+Q)
        support[begin:begin + e] = bank[:, :, :n_shot].reshape(e, -1)
        query[begin:begin + e] = bank[:, :, n_shot:].reshape(e, -1)
        chosen[begin:begin + e] = classes
    support_labels = np.broadcast_to(np.repeat(np.arange(n_way, dtype=np.int64), n_shot), support.shape).copy()
    query_labels = np.broadcast_to(np.repeat(np.arange(n_way, dtype=np.int64), n_query), query.shape).copy()
    class_values = values[chosen]
    if np.issubdtype(class_values.dtype, np.integer):
        class_values = class_values.astype(np.int64)
    return Episodes(support, support_labels, query, query_labels, class_values, n_way, n_shot, n_query, int(seed))


def _uniforms(bits: np.random.PCG64, shape: tuple) -> np.ndarray:
    """Uniform doubles in [0, 1) from the bit generator's raw stream: the top 53 bits of each 64-bit output
    times 2⁻⁵³ (what ``Generator.random`` computes today, but fixed here whatever NumPy's methods become)."""
    raw = bits.random_raw(int(np.prod(shape))).reshape(shape)
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _floyd(sizes: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Floyd's sampling of ``k`` distinct positions in ``[0, size)``, vectorised over leading dimensions.

    ``sizes`` ``(...)`` int64 (each ``>= k``), ``uniforms`` ``(..., k)`` doubles in [0, 1) → ``(..., k)`` int64.
    Step ``t`` draws ``r`` uniform in ``[0, j]`` with ``j = size - k + t``; it keeps ``r`` unless already taken,
    else ``j`` — every ``k``-subset comes out equally likely.
    """
    k = uniforms.shape[-1]
    picks = np.empty(uniforms.shape, dtype=np.int64)
    for t in range(k):
        j = sizes - k + t
        r = np.minimum(np.floor(uniforms[..., t] * (j + 1)).astype(np.int64), j)
        taken = (picks[..., :t] == r[..., None]).any(axis=-1)
        picks[..., t] = np.where(taken, j, r)
    return picks
