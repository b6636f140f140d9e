"""Near-duplicate images: a perceptual hash per decoded image and groups of images whose hashes
differ in few bits, so that prepare can keep lightly changed copies (re-saved, resized, cropped
a little, brightened) in one split instead of leaking a test image into training.

The hash is a DCT "pHash" (grey levels averaged down to 32 x 32, their 2-D DCT, one bit per
low-frequency coefficient: above or below the coefficients' median) with two changes that make
it hold on small, centred, look-alike images such as Fashion-MNIST, where the classic 64-bit
hash of the whole frame both misses cropped copies and joins distinct images:
- the 32 x 32 grid covers a window centred on the image's content (what differs from the border
  colour) and sized to its spread, so a crop or shift of a few per cent moves the window with
  the content instead of moving the content in the window;
- the hash keeps the top-left 16 x 16 coefficients instead of 8 x 8, so distinct images of
  similar shape lie far apart: 256 bits, the DC term's always 0 (brightness, not content).
Plain numpy (matrix products); a hash is HASH_WORDS uint64 words, compared by Hamming distance.

A second test on the same coefficients links what the hash's one bit per coefficient loses: the
ranks of the 255 AC coefficients (int8, centred), compared by their correlation (Spearman's rho
of the two images' coefficients). A crop plus a resize of a garment that fills the frame moves
many coefficients across the median (the hash's bits flip) while their order changes little.
A third test links the copies both miss, in the manner of Lowe's ratio test for matching image
features: two images that are each other's nearest neighbour by that correlation, at least
NEAREST_MIN_CORRELATION, and much nearer to each other than to anything else: (1 - rho) at most
NEAREST_MAX_RATIO times (1 - the runner-up's rho; the runner-up: the mean of the two images'
next nearest). A copy stands out from its original's look-alikes; a look-alike has other
look-alikes about as near.
Two images are linked when any test passes. Mutual nearest neighbours under a looser ratio
(LOOK_ALIKE_MAX_RATIO, Lowe's own cut) are look-alikes: not reported as near-duplicates, but
kept in one split, since keeping two look-alikes together costs nothing and splitting a copy
the tests missed leaks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# hashes at most this many bits apart are near-duplicates: chosen on Fashion-MNIST at 96 px
# (injected JPEG / resize / crop / brightness copies found, distinct images rarely joined)
MAX_DISTANCE = 32
_SMALL = 32  # the grey grid the DCT sees
_LOW = 16  # the top-left block of DCT coefficients that makes the hash
HASH_BITS = _LOW * _LOW
HASH_WORDS = HASH_BITS // 64
_WINDOW = 3.5  # the window's side, in radii of gyration of the content around its centre
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601 luma
# images whose coefficient ranks correlate at least this much are linked too: chosen on copies
# and clean images synthesised from Fashion-MNIST train images (bench/neardup.py)
MIN_CORRELATION = 0.92
# mutual nearest neighbours by rank correlation are linked when they correlate at least this
# much and (1 - rho) is at most NEAREST_MAX_RATIO of (1 - the runner-up's rho): chosen on the
# same synthesis, kept apart from bench/doctor.py's data (bench/neardup.py)
NEAREST_MIN_CORRELATION = 0.8
NEAREST_MAX_RATIO = 0.5
# look-alikes: mutual nearest neighbours that pass Lowe's own cut (a distance ratio of 0.8; for
# standardised ranks 1 - rho is half the squared distance, so 0.8 ** 2 on 1 - rho) but not the
# test above are kept in one split without being reported as near-duplicates: a false link costs
# no one any attention, a missed copy leaks a test image (bench/neardup.py)
LOOK_ALIKE_MIN_CORRELATION = 0.5
LOOK_ALIKE_MAX_RATIO = 0.8**2
# pairwise distances are computed this many (hash, hash) cells at a time: memory stays bounded
_BLOCK_CELLS = 1 << 18  # 2 MiB per uint64 temporary
_RANK_BLOCK_CELLS = 1 << 18  # 1 MiB per float32 block of correlations


def _window_matrices(size: int, starts: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """(N, 32, size): row i of matrix n averages the source pixels under output pixel i of the
    window [starts[n], starts[n] + widths[n]), each weighted by the part of it inside (a box
    filter at any scale; the window may reach past the image, whose outside adds nothing)."""
    cell = widths[:, None, None] / _SMALL
    left = starts[:, None, None] + np.arange(_SMALL)[None, :, None] * cell
    pixels = np.arange(size)[None, None, :]
    overlap = np.minimum(left + cell, pixels + 1) - np.maximum(left, pixels)
    return np.clip(overlap, 0, None) / cell


def _aligned_grey(arrays: np.ndarray) -> np.ndarray:
    """(N, 32, 32): each image's grey levels minus its border colour (the median of its edge
    pixels: the background, so that the outside of the image, 0, and the background agree),
    averaged over a window that follows the content, what differs from the background:
    centred on its centre of mass, _WINDOW radii of gyration wide (kept within 1/4 to 2 image
    sides; a flat image: the whole frame)."""
    count, size = arrays.shape[:2]
    grey = arrays @ _GREY
    border = np.concatenate([grey[:, 0], grey[:, -1], grey[:, 1:-1, 0], grey[:, 1:-1, -1]], axis=1)
    grey -= np.median(border, axis=1)[:, None, None]
    weight = np.abs(grey)
    by_row, by_column = weight.sum(axis=2), weight.sum(axis=1)
    total = by_row.sum(axis=1)
    flat = total <= 1e-9 * size * size
    total = np.where(flat, 1.0, total)
    centres = np.arange(size) + 0.5
    row, column = by_row @ centres / total, by_column @ centres / total
    spread = (
        (by_row * (centres - row[:, None]) ** 2).sum(axis=1)
        + (by_column * (centres - column[:, None]) ** 2).sum(axis=1)
    ) / total
    width = np.clip(_WINDOW * np.sqrt(spread), size / 4, 2 * size)
    row, column = np.where(flat, size / 2, row), np.where(flat, size / 2, column)
    width = np.where(flat, float(size), width)
    rows = _window_matrices(size, row - width / 2, width)
    columns = _window_matrices(size, column - width / 2, width)
    return rows @ grey @ columns.transpose(0, 2, 1)


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """The orthonormal DCT-II matrix of order 32: D @ x @ D.T is the 2-D DCT of x."""
    k = np.arange(_SMALL)[:, None]
    n = np.arange(_SMALL)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * _SMALL)) * np.sqrt(2 / _SMALL)
    matrix[0] /= np.sqrt(2)
    return matrix


def _coefficients(arrays: np.ndarray, caller: str) -> np.ndarray:
    """(N, HASH_BITS): the low-frequency DCT coefficients of the content-centred grey images,
    the DC term first."""
    arrays = np.asarray(arrays)
    if arrays.ndim != 4 or arrays.shape[1] != arrays.shape[2] or arrays.shape[3] != 3:
        raise ValueError(f"{caller}: expected N x S x S x 3 images, got shape {arrays.shape}")
    low_pass = _dct_matrix()[:_LOW]
    return (low_pass @ _aligned_grey(arrays) @ low_pass.T).reshape(len(arrays), HASH_BITS)


def phashes(arrays: np.ndarray) -> np.ndarray:
    """The perceptual hashes (uint64, N x HASH_WORDS) of N square RGB images (uint8
    N x S x S x 3, as prepare decodes them)."""
    return _hashes(_coefficients(arrays, "phashes"))


def _hashes(low: np.ndarray) -> np.ndarray:
    median = np.median(low[:, 1:], axis=1, keepdims=True)
    bits = low > median
    bits[:, 0] = False  # the DC term
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


RANK_LENGTH = HASH_BITS - 1  # the AC coefficients
_RANK_CENTRE = RANK_LENGTH // 2  # ranks 0..254 minus 127: -127..127, an int8
# every rank vector is a permutation of the same values: one squared norm for all
_RANK_NORM = float(sum((rank - _RANK_CENTRE) ** 2 for rank in range(RANK_LENGTH)))


def _ranks(low: np.ndarray, rows: int = 512) -> np.ndarray:
    """int8 ranks, `rows` images at a time (argsort's int64 temporaries stay small)."""
    ranks = np.empty((len(low), RANK_LENGTH), dtype=np.int8)
    values = np.arange(RANK_LENGTH, dtype=np.int16)[None, :] - _RANK_CENTRE
    for start in range(0, len(low), rows):
        order = np.argsort(low[start : start + rows, 1:], axis=1, kind="stable")
        block = np.empty(order.shape, dtype=np.int16)
        np.put_along_axis(block, order, values, axis=1)
        ranks[start : start + rows] = block
    return ranks


def signatures(arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(perceptual hashes, coefficient ranks) of N square RGB images (uint8 N x S x S x 3): the
    hashes as `phashes` gives them, the ranks int8 N x RANK_LENGTH (compare with
    `correlation` / `correlated_pairs`)."""
    low = _coefficients(arrays, "signatures")
    return _hashes(low), _ranks(low)


def phash(array: np.ndarray) -> np.ndarray:
    """The perceptual hash (uint64, HASH_WORDS) of one square RGB image (uint8 S x S x 3)."""
    return phashes(np.asarray(array)[None])[0]


_BYTE_BITS = np.array([bin(n).count("1") for n in range(256)], dtype=np.uint8)


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (uint8 result): numpy's own instruction where it has one (>= 2.0),
    a byte lookup table otherwise."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    per_byte = _BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8)
    return per_byte.sum(axis=-1, dtype=np.uint8)


def distance(first: np.ndarray, second: np.ndarray) -> int:
    """The Hamming distance between two hashes."""
    return int(popcount(np.bitwise_xor(first, second)).sum())


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    """The correlation of two images' coefficient ranks (1: the same order)."""
    return float(np.dot(first.astype(np.float64), second.astype(np.float64)) / _RANK_NORM)


@dataclass(frozen=True)
class NearDuplicates:
    """What `group` found: `groups`, each the ascending indices of images linked by chains of
    close pairs (two or more per group, ordered by their first index), and `pairs`, every
    linked (i, j, Hamming distance) with i < j: within the distance threshold, or over it and
    linked by their ranks' correlation (those also in `correlated`, with the correlation), as
    distinct nearest neighbours (in `nearest`) or by a person (in `reviewed`). `look_alikes`:
    mutual nearest neighbours under the looser ratio, not linked otherwise ((rho, runner-up)
    per pair); `units`: the groups that go to one split whole, `groups` joined through them."""

    groups: list[list[int]]
    pairs: list[tuple[int, int, int]]
    correlated: dict[tuple[int, int], float] = field(default_factory=dict)
    reviewed: set[tuple[int, int]] = field(default_factory=set)  # linked by the review file
    # linked as distinct nearest neighbours: (rho, the runner-up's rho)
    nearest: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    look_alikes: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    units: list[list[int]] = field(default_factory=list)


def close_pairs(hashes: np.ndarray, max_distance: int = MAX_DISTANCE) -> list[tuple[int, int, int]]:
    """Every (i, j, distance), i < j, of hashes (uint64, N x words) at most `max_distance` bits
    apart. Every pair is compared (exact: none missed), a block of rows at a time against the
    rows after it and one word at a time, so memory stays bounded for tens of thousands."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.ndim != 2:
        raise ValueError(f"close_pairs: expected N x words hashes, got shape {hashes.shape}")
    if not 0 <= max_distance <= 64 * hashes.shape[1]:
        raise ValueError(f"max_distance must be in [0, {64 * hashes.shape[1]}], got {max_distance}")
    count = len(hashes)
    words = np.ascontiguousarray(hashes.T)  # one row per word: contiguous slices below
    rows = max(1, _BLOCK_CELLS // max(count, 1))
    found: list[tuple[int, int, int]] = []
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        distances = np.zeros((stop - start, count - start), dtype=np.uint16)
        for word in words:
            distances += popcount(word[start:stop, None] ^ word[None, start:])
        first, second = np.nonzero(distances <= max_distance)
        later = second > first  # the upper triangle: each pair once, no image with itself
        first, second = first[later], second[later]
        near = distances[first, second]
        found += zip(
            (first + start).tolist(), (second + start).tolist(), near.tolist(), strict=True
        )
    return found


def components(count: int, pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    """Union-find over `count` items joined by `pairs`: the groups of two or more, each
    ascending, ordered by their first member."""
    parent = list(range(count))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    for first, second, _ in pairs:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for item in sorted({i for pair in pairs for i in pair[:2]}):
        members.setdefault(root(item), []).append(item)
    return sorted(members.values())


def _two_best(block: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The two largest values along `axis` of `block` and their positions (k x 2 each; -inf and
    -1 where the axis is shorter than two). Two argmax passes: cheaper than sorting."""
    block = block if axis == 1 else block.T
    count, length = block.shape
    values = np.full((count, 2), -np.inf, dtype=np.float32)
    where = np.full((count, 2), -1, dtype=np.int64)
    lines = np.arange(count)
    for rank in range(min(2, length)):
        where[:, rank] = np.argmax(block, axis=1)
        values[:, rank] = block[lines, where[:, rank]]
        if rank == 0 and length > 1:
            block[lines, where[:, 0]] = -np.inf
    if length > 1:
        block[lines, where[:, 0]] = values[:, 0]  # put the best back
    return values, where


def _keep_top(
    values: np.ndarray,
    index: np.ndarray,
    rows: np.ndarray,
    found: tuple[np.ndarray, np.ndarray],
    columns: np.ndarray,
) -> None:
    """Merge two best candidates per entry of `rows` (values, positions into `columns`) into the
    running two best (`values`, `index`, N x 2) of those rows."""
    merged_values = np.concatenate([values[rows], found[0]], axis=1)
    positions = found[1]
    merged_index = np.concatenate(
        [index[rows], np.where(positions >= 0, columns[positions], -1)], axis=1
    )
    best = np.argsort(-merged_values, axis=1, kind="stable")[:, :2]
    values[rows] = np.take_along_axis(merged_values, best, axis=1)
    index[rows] = np.take_along_axis(merged_index, best, axis=1)


def rank_scan(
    ranks: np.ndarray, min_correlation: float
) -> tuple[list[tuple[int, int, float]], np.ndarray, np.ndarray]:
    """One pass over every pair of coefficient ranks (int8, N x RANK_LENGTH), a block of rows
    at a time against the rows from the block on: the (i, j, correlation), i < j, at least
    `min_correlation`, and each image's two nearest others (correlations and indices, N x 2;
    -inf and -1 where there are fewer)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != RANK_LENGTH:
        raise ValueError(f"rank_scan: expected N x {RANK_LENGTH} ranks, got {ranks.shape}")
    count = len(ranks)
    scaled = ranks.astype(np.float32) / np.float32(np.sqrt(_RANK_NORM))
    values = np.full((count, 2), -np.inf, dtype=np.float32)
    index = np.full((count, 2), -1, dtype=np.int64)
    rows = max(1, _RANK_BLOCK_CELLS // max(count, 1))
    found: list[tuple[int, int, float]] = []
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        similar = scaled[start:stop] @ scaled[start:].T
        block = np.arange(stop - start)
        similar[block, block] = -np.inf  # each image with itself
        first, second = np.nonzero(similar >= min_correlation)
        later = second > first
        first, second = first[later], second[later]
        found += zip(
            (first + start).tolist(),
            (second + start).tolist(),
            similar[first, second].astype(float).tolist(),
            strict=True,
        )
        # the rows see every image from `start` on; the images after the block see the
        # block's rows here (the rows before `start` saw them in their own blocks)
        columns = np.arange(start, count)
        _keep_top(values, index, columns[: stop - start], _two_best(similar, 1), columns)
        if stop < count:
            after = _two_best(similar[:, stop - start :], 0)
            _keep_top(values, index, columns[stop - start :], after, columns[: stop - start])
    return found, values, index


def correlated_pairs(
    ranks: np.ndarray, min_correlation: float = MIN_CORRELATION
) -> list[tuple[int, int, float]]:
    """Every (i, j, correlation), i < j, of coefficient ranks (int8, N x RANK_LENGTH) that
    correlate at least `min_correlation`: every pair compared, a block of rows at a time."""
    return rank_scan(ranks, min_correlation)[0]


def nearest_pairs(
    values: np.ndarray,
    index: np.ndarray,
    min_correlation: float = NEAREST_MIN_CORRELATION,
    max_ratio: float = NEAREST_MAX_RATIO,
) -> list[tuple[int, int, float, float]]:
    """(i, j, rho, runner-up rho), i < j: images that are each other's nearest neighbour
    (`values`, `index`: each image's two nearest, as `rank_scan` gives them), correlate at least
    `min_correlation`, and are far nearer to each other than to their next nearest:
    1 - rho <= max_ratio * (1 - runner-up), the runner-up the mean of the two next nearest's
    correlations (the larger alone linked one copy fewer in 1,000 on bench/neardup.py's
    synthesis, and flagged no fewer clean images)."""
    found = []
    for i, j in enumerate(index[:, 0].tolist()):
        if j <= i or index[j, 0] != i:
            continue  # each mutual pair once
        rho = float(values[i, 0])
        runner_up = (float(values[i, 1]) + float(values[j, 1])) / 2
        if runner_up == -np.inf:
            continue  # two images: nothing to stand out from
        if rho >= min_correlation and 1 - rho <= max_ratio * (1 - runner_up):
            found.append((i, j, rho, runner_up))
    return found


def group(
    hashes: np.ndarray,
    max_distance: int = MAX_DISTANCE,
    ranks: np.ndarray | None = None,
    min_correlation: float = MIN_CORRELATION,
    together: Sequence[tuple[int, int]] = (),
) -> NearDuplicates:
    """The near-duplicate groups of `hashes` (uint64, N x words): images within
    `max_distance` bits of another in the group, or (with `ranks`, from `signatures`) whose
    coefficient ranks correlate at least `min_correlation` or who are distinct nearest
    neighbours (`nearest_pairs`), transitively (a chain of small changes is still one group).
    `together`: (i, j) pairs a person linked (the review file's
    `together`), whatever their distance (in `reviewed`)."""
    pairs = close_pairs(hashes, max_distance)
    linked = {(i, j) for i, j, _ in pairs}
    reviewed = {(min(i, j), max(i, j)) for i, j in together if i != j} - linked
    pairs += [(i, j, distance(hashes[i], hashes[j])) for i, j in sorted(reviewed)]
    correlated: dict[tuple[int, int], float] = {}
    nearest: dict[tuple[int, int], tuple[float, float]] = {}
    look_alikes: dict[tuple[int, int], tuple[float, float]] = {}
    if ranks is not None:
        if len(ranks) != len(hashes):
            raise ValueError(f"group: {len(hashes)} hashes but {len(ranks)} rank rows")
        linked |= reviewed
        above, values, index = rank_scan(ranks, min_correlation)
        for i, j, rho in above:
            if (i, j) not in linked:
                correlated[i, j] = round(rho, 4)
                pairs.append((i, j, distance(hashes[i], hashes[j])))
        linked |= set(correlated)
        strict = {(i, j) for i, j, *_ in nearest_pairs(values, index)}
        loose = nearest_pairs(values, index, LOOK_ALIKE_MIN_CORRELATION, LOOK_ALIKE_MAX_RATIO)
        for i, j, rho, runner_up in loose:  # the strict ones among them
            if (i, j) in linked:
                continue
            if (i, j) in strict:
                nearest[i, j] = (round(rho, 4), round(runner_up, 4))
                pairs.append((i, j, distance(hashes[i], hashes[j])))
            else:
                look_alikes[i, j] = (round(rho, 4), round(runner_up, 4))
    pairs.sort()
    units = components(len(hashes), pairs + [(i, j, 0) for i, j in look_alikes])
    return NearDuplicates(
        components(len(hashes), pairs), pairs, correlated, reviewed, nearest, look_alikes, units
    )
