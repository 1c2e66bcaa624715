"""split: deterministic train / eval / test split by id hash, with decontamination.

Input:  data/interim/clean/records.parquet
Output: data/processed/{train,eval,test}.parquet
        data/processed/decontaminated.parquet  train records removed because they exactly or nearly
                                               duplicate an eval/test record, with that record's id
A record's split depends only on its id and the salt, so adding data never moves old records
between splits. Counts add up: in = train + eval + test + decontaminated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa

from flywheel import paths, text
from flywheel.config import Params, SplitParams
from flywheel.data import minhash
from flywheel.data.records import RECORD_SCHEMA
from flywheel.io import ParquetChunkWriter, atomic_path, read_records

SPLITS = tuple(paths.SPLITS)
DECONTAMINATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("matches", pa.string()),
        ("similarity", pa.float64()),
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)


def assign(record_id: str, config: SplitParams) -> str:
    """The split of an id: a uniform number from hash(salt, id) against the cumulative fractions."""
    digest = hashlib.sha256(f"{config.salt}\x1f{record_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += config.fractions[name]
        if point < cumulative:
            return name
    return SPLITS[-1]


def contaminated(records: list[dict], splits: list[str], params: Params) -> dict[int, tuple[str, str, float]]:
    """train position -> (reason, id of the eval/test record it duplicates, similarity)."""
    config = params.split
    held_out = [i for i, name in enumerate(splits) if name != "train"]
    found: dict[int, tuple[str, str, float]] = {}
    if config.decontaminate_exact:
        # The same prompt in train and in eval/test leaks the answer, whatever the response says.
        held_out_keys = {text.prompt_key(records[i]): records[i]["id"] for i in held_out}
        for i, name in enumerate(splits):
            match = held_out_keys.get(text.prompt_key(records[i])) if name == "train" else None
            if match is not None:
                found[i] = ("exact_contamination", match, 1.0)
    if config.decontaminate_near and held_out:
        settings = dataclasses.replace(
            minhash.settings_from(params.clean.dedup.minhash), threshold=config.decontamination_threshold
        )
        signatures = minhash.MinHasher(settings).signatures(map(minhash.dedup_text, records))
        pairs, similarity = minhash.near_duplicate_pairs(signatures, settings)
        for (a, b), value in zip(pairs.tolist(), similarity.tolist()):
            for train, other in ((a, b), (b, a)):
                if splits[train] == "train" and splits[other] != "train" and train not in found:
                    found[train] = ("near_contamination", records[other]["id"], value)
    return found


def run(params: Params, root: Path = Path(".")) -> dict:
    # Decontamination compares every train record with every held-out one, so the split holds
    # the cleaned records in memory (text only; signatures are computed in batches).
    records = read_records(paths.CLEAN_RECORDS.require(root))
    splits = [assign(record["id"], params.split) for record in records]
    removed = contaminated(records, splits, params)

    counts = Counter()
    reasons = Counter()
    with contextlib.ExitStack() as stack:
        writers = {
            name: ParquetChunkWriter(stack.enter_context(atomic_path(root / path)), RECORD_SCHEMA)
            for name, path in paths.SPLITS.items()
        }
        dropped = ParquetChunkWriter(
            stack.enter_context(atomic_path(root / paths.DECONTAMINATED)), DECONTAMINATED_SCHEMA
        )
        for position, (record, name) in enumerate(zip(records, splits)):
            if position in removed:
                reason, match, similarity = removed[position]
                dropped.add(
                    {
                        "id": record["id"],
                        "reason": reason,
                        "matches": match,
                        "similarity": similarity,
                        "prompt": record["prompt"],
                        "response": record["response"],
                    }
                )
                reasons[reason] += 1
            else:
                writers[name].add(record)
                counts[name] += 1
        for writer in (*writers.values(), dropped):
            writer.close()

    return {
        "in": len(records),
        **{name: counts[name] for name in SPLITS},
        "decontaminated": sum(reasons.values()),
        "decontaminated_by_reason": dict(sorted(reasons.items())),
        "fractions": dict(params.split.fractions),
    }


def report(metrics: dict) -> str:
    lines = [
        f"split: {metrics['in']:,} records -> train {metrics['train']:,}, eval {metrics['eval']:,}, "
        f"test {metrics['test']:,}; {metrics['decontaminated']:,} train records removed as "
        "contaminated"
    ]
    lines += [f"  {reason}: {count:,}" for reason, count in metrics["decontaminated_by_reason"].items()]
    lines.append(f"  wrote {', '.join(map(str, paths.SPLITS.values()))}, {paths.DECONTAMINATED}")
    return "\n".join(lines)
