"""Which of clean's surviving records are exact or near duplicates, and of which record.

The rules, the same in this process and on a Ray cluster:
- exact: records with the same exact key form a group; the one with the smallest id (then the
  earliest position) is kept, the others are removed as its duplicates.
- near (over the records exact dedup kept): LSH candidate pairs, verified against the threshold
  on their estimated similarity, joined into clusters by connected components; within a cluster
  members are visited by id and one is removed only if it is at least `threshold` similar to a
  member already kept, so a chain a~b~c never removes c for being like a only through b.

On Ray (as Data-Juicer and NeMo Curator do it) both are shuffles: each partition's exact keys are
cut into shards by key, and its LSH band keys by band, so equal keys meet in one reduce task. A
band's reducer pairs each bucket with its first member (the smallest position, as locally),
verifies the pairs against the signatures in the object store and returns a union-find forest of
what it joined; the driver merges the forests (connected components over at most one edge per
record), and tasks make the per-cluster decisions, which need only the clustered records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flywheel.data import minhash
from flywheel.data.executor import Executor, RayExecutor

SIMILARITY_CHUNK = 65_536  # pairs compared at once: bounds a reducer's memory


@dataclass
class Survivors:
    """What clean's first pass keeps per surviving record: enough to decide duplicates."""

    ids: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)


Decisions = dict[int, tuple[str, int, float]]  # position -> (reason, position kept in its place, similarity)


def id_rank(ids: list[str]) -> np.ndarray:
    """Each position's rank by (id, position): the smallest rank of a group is the record kept."""
    rank = np.empty(len(ids), dtype=np.int64)
    rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    return rank


def decide(
    survivors: Survivors, exact: bool, near: bool, settings: minhash.MinHashSettings, executor: Executor
) -> Decisions:
    if not survivors.ids:
        return {}
    rank = id_rank(survivors.ids)
    signatures = np.concatenate(survivors.signatures) if near else None
    if isinstance(executor, RayExecutor):
        return _decide_on_ray(survivors, rank, signatures, exact, settings, executor)
    decisions: Decisions = {}
    if exact:
        decisions.update(_exact_locally(survivors.keys, rank))
    if near:
        candidates = np.array([p for p in range(len(survivors.ids)) if p not in decisions], dtype=np.int64)
        pairs, _ = minhash.near_duplicate_pairs(signatures[candidates], settings)
        clusters = _clusters(len(candidates), pairs)
        decisions.update(_keep_first_by_id([candidates[c] for c in clusters], signatures, rank, settings.threshold))
    return decisions


def _exact_locally(keys: list[bytes], rank: np.ndarray) -> Decisions:
    best: dict[bytes, int] = {}
    for position, key in enumerate(keys):
        kept = best.get(key)
        if kept is None or rank[position] < rank[kept]:
            best[key] = position
    return {p: ("exact_duplicate", best[key], 1.0) for p, key in enumerate(keys) if best[key] != p}


def _clusters(count: int, pairs: np.ndarray) -> list[np.ndarray]:
    """The components of more than one member, each as its members' indices."""
    labels = minhash.cluster_labels(count, pairs)
    clustered = np.flatnonzero(np.bincount(labels)[labels] > 1)
    order = clustered[np.argsort(labels[clustered], kind="stable")]
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, boundaries) if len(order) else []


def _keep_first_by_id(
    clusters: list[np.ndarray], signatures: np.ndarray, rank: np.ndarray, threshold: float
) -> Decisions:
    removed: Decisions = {}
    for members in clusters:
        kept: list[int] = []
        for position in sorted(members.tolist(), key=rank.__getitem__):
            best = max(((float((signatures[position] == signatures[k]).mean()), k) for k in kept), default=(0.0, -1))
            if best[0] >= threshold:
                removed[position] = ("near_duplicate", best[1], best[0])
            else:
                kept.append(position)
    return removed


# --- on Ray: hash shuffles -------------------------------------------------------------------


def _shard_of(values: np.ndarray, shards: int) -> np.ndarray:
    return (values % np.uint64(shards)).astype(np.int64)


def _split_by_shard(shards: int, shard: np.ndarray, *columns: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    pieces = [tuple(column[shard == s] for column in columns) for s in range(shards)]
    return pieces if shards > 1 else pieces[0]  # Ray returns one object, not a list, for num_returns=1


def shard_exact_keys(keys: np.ndarray, rank: np.ndarray, start: int, shards: int):
    """Map: this partition's (key, position, rank) rows, cut into shards by key."""
    positions = np.arange(start, start + len(keys), dtype=np.int64)
    prefix = np.ascontiguousarray(keys.view(np.uint8).reshape(len(keys), -1)[:, :8]).view("<u8").ravel()
    return _split_by_shard(shards, _shard_of(prefix, shards), keys, positions, rank)


def first_of_each_key(*pieces: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reduce: (removed positions, the position kept for each) for one shard of the keys."""
    keys, positions, rank = (np.concatenate(column) for column in zip(*pieces))
    order = np.lexsort((rank, keys))
    keys, positions = keys[order], positions[order]
    is_first = np.ones(len(keys), dtype=bool)
    is_first[1:] = keys[1:] != keys[:-1]
    kept = positions[np.flatnonzero(is_first)[np.cumsum(is_first) - 1]]
    return positions[~is_first], kept[~is_first]


def shard_band_keys(signatures: np.ndarray, start: int, excluded: np.ndarray, bands: int, rows: int, shards: int):
    """Map: this partition's (band key, position) rows, band b going to shard b % shards, as
    [(keys, positions) of each of the shard's bands]; records already removed as exact
    duplicates take no part, as locally."""
    positions = np.arange(start, start + len(signatures), dtype=np.int64)
    taking_part = ~excluded[positions]
    signatures, positions = signatures[taking_part], positions[taking_part]
    pieces = [
        [(minhash.band_keys(signatures, band, rows), positions) for band in range(shard, bands, shards)]
        for shard in range(shards)
    ]
    return pieces if shards > 1 else pieces[0]


def _rows_at(parts: list[np.ndarray], starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    which = np.searchsorted(starts, positions, side="right") - 1
    rows = np.empty((len(positions), parts[0].shape[1]), dtype=parts[0].dtype)
    for part in np.unique(which):
        here = which == part
        rows[here] = parts[part][positions[here] - starts[part]]
    return rows


def verified_forest(starts: np.ndarray, threshold: float, signature_refs: list, *pieces) -> np.ndarray:
    """Reduce: one shard's bands -> star pairs per bucket -> the pairs at least
    `threshold` similar -> (record, root) edges of the components they form (union-find)."""
    import ray

    # Each piece is one partition's rows of this shard's bands; a band's rows from all of them,
    # in partition order, have ascending positions, as star_pairs needs.
    found = []
    for band_pieces in zip(*pieces):
        keys, positions = (np.concatenate(column) for column in zip(*band_pieces))
        found.append(minhash.star_pairs(keys, positions))
    pairs = minhash.unique_pairs(found)
    if not len(pairs):
        return np.empty((0, 2), dtype=np.int64)
    parts = ray.get(signature_refs)  # zero-copy on this node's object store
    similar = np.zeros(len(pairs), dtype=bool)
    for offset in range(0, len(pairs), SIMILARITY_CHUNK):
        chunk = pairs[offset : offset + SIMILARITY_CHUNK]
        left, right = _rows_at(parts, starts, chunk[:, 0]), _rows_at(parts, starts, chunk[:, 1])
        similar[offset : offset + len(chunk)] = (left == right).mean(axis=1) >= threshold
    pairs = pairs[similar]
    nodes, local = np.unique(pairs, return_inverse=True)
    labels = minhash.cluster_labels(len(nodes), local.reshape(-1, 2))
    roots = np.full(labels.max() + 1 if len(labels) else 0, len(nodes), dtype=np.int64)
    np.minimum.at(roots, labels, np.arange(len(nodes)))
    return np.stack([nodes, nodes[roots[labels]]], axis=1)


def _shuffle(mapper, inputs: list[tuple], reducer, shards: int, *reducer_args) -> list:
    """A Ray hash shuffle: a map task per input (argument tuple) cuts its output into `shards`;
    the reduce task of each shard gets that shard of every map output. The reducers' results."""
    import ray

    map_task = ray.remote(mapper).options(num_returns=shards)
    mapped = [map_task.remote(*arguments, shards) for arguments in inputs]
    mapped = [refs if shards > 1 else [refs] for refs in mapped]
    reduce_task = ray.remote(reducer)
    return ray.get([reduce_task.remote(*reducer_args, *[refs[shard] for refs in mapped]) for shard in range(shards)])


def _decide_on_ray(
    survivors: Survivors,
    rank: np.ndarray,
    signatures: np.ndarray | None,
    exact: bool,
    settings: minhash.MinHashSettings,
    executor: RayExecutor,
) -> Decisions:
    import ray

    count, partition_rows, shards = len(survivors.ids), executor.partition_rows, executor.cpus()
    starts = np.arange(0, count, partition_rows, dtype=np.int64)
    decisions: Decisions = {}
    if exact:
        keys = np.array(survivors.keys, dtype=f"S{len(survivors.keys[0])}")
        inputs = [(keys[s : s + partition_rows], rank[s : s + partition_rows], int(s)) for s in starts]
        for removed, kept in _shuffle(shard_exact_keys, inputs, first_of_each_key, shards):
            decisions.update((int(p), ("exact_duplicate", int(k), 1.0)) for p, k in zip(removed, kept))
    if signatures is not None:
        excluded = np.zeros(count, dtype=bool)
        excluded[list(decisions)] = True
        excluded_ref = ray.put(excluded)
        signature_refs = [ray.put(signatures[s : s + partition_rows]) for s in starts]
        inputs = [(ref, int(s), excluded_ref, settings.bands, settings.rows) for ref, s in zip(signature_refs, starts)]
        band_shards = min(shards, settings.bands)
        forests = _shuffle(
            shard_band_keys, inputs, verified_forest, band_shards, starts, settings.threshold, signature_refs
        )
        clusters = _clusters(count, np.concatenate([np.empty((0, 2), dtype=np.int64), *forests]))
        decisions.update(_decide_clusters_on_ray(clusters, signatures, rank, settings.threshold, shards))
    return decisions


def _decide_clusters_on_ray(
    clusters: list[np.ndarray], signatures: np.ndarray, rank: np.ndarray, threshold: float, tasks: int
) -> Decisions:
    import ray

    keeper = ray.remote(keep_first_in_clusters)
    running = []
    for group in np.array_split(np.arange(len(clusters)), tasks):
        members = np.concatenate([np.empty(0, dtype=np.int64), *(clusters[c] for c in group)])
        sizes = [len(clusters[c]) for c in group]
        running.append(keeper.remote(members, sizes, signatures[members], rank[members], threshold))
    return {position: decision for part in ray.get(running) for position, decision in part.items()}


def keep_first_in_clusters(
    members: np.ndarray, sizes: list[int], signatures: np.ndarray, rank: np.ndarray, threshold: float
) -> Decisions:
    """A task: the per-cluster decisions for some clusters, whose members (positions) come one
    cluster after another, with their signatures and ranks in the same order."""
    rows = np.split(np.arange(len(members)), np.cumsum(sizes)[:-1]) if sizes else []
    decided = _keep_first_by_id(rows, signatures, rank, threshold)
    return {int(members[row]): (reason, int(members[kept]), sim) for row, (reason, kept, sim) in decided.items()}
