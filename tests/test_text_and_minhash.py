import random

import numpy as np

from flywheel import text
from flywheel.data import minhash


def test_normalize():
    raw = "<p>Caf\u00e9\u200b  \uff21\uff22\tC\x07</p>\r\n\r\n\r\n<b>bold</b> &amp; more  "
    assert text.normalize(raw, markup=True) == "Café AB C\n\nbold & more"
    assert text.normalize("<b>kept</b>") == "<b>kept</b>"  # markup stripping is optional
    assert text.normalize("  \u200b \n ") == ""
    assert text.normalize(None) is None


def test_strip_markup_removes_html_and_keeps_angle_bracketed_prose():
    prose = [
        "Assistant: <long answer>",  # Anthropic HH transcripts
        "<repeats himself in response to the second question>",
        "Write a post titled <title> for <name>",  # template placeholders
        "if a<b and c>d then stop",
        "<a few words> in brackets",
    ]
    for text_with_prose in prose:
        assert text.strip_markup(text_with_prose) == (text_with_prose, 0)
    assert text.strip_markup("with <b>Battery and nail filer</b>") == ("with Battery and nail filer", 2)
    assert text.strip_markup("the result:\n\n<pre><h3>") == ("the result:\n\n\n\n", 2)  # an unclosed fragment
    assert text.strip_markup('<a href="x">link</a><br/><!-- note --><img src=a.png>') == ("link\n", 5)
    assert text.strip_markup("<script>if (a<b) go()</script>ok &amp; done") == (" ok & done", 1)


def test_quality_signals():
    assert text.duplicate_line_fraction("a\nb\na\na") == 0.5
    words = ("buy now " * 20).split()
    assert text.duplicate_ngram_char_fraction(words, 3) == 1.0
    assert text.duplicate_ngram_char_fraction("a quick brown fox jumps over it".split(), 3) == 0.0
    assert text.duplicate_ngram_char_fraction("the answer is 4 the answer is 4".split(), 4) == 1.0
    assert text.duplicate_ngram_char_fraction("too short to repeat".split(), 4) == 0.0
    assert text.symbol_word_ratio("### ... hello @@".split()) == 0.75
    assert text.non_alpha_ratio("ab12") == 0.5


def test_signatures_estimate_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = rng.choices(vocab, k=200)
    edited = list(base)
    for position in rng.sample(range(200), 10):  # 10 substitutions: about 0.74 true Jaccard
        edited[position] = "zz"
    hasher = minhash.MinHasher(minhash.MinHashSettings(num_perm=256))
    signatures = hasher.signatures([" ".join(base), " ".join(edited), " ".join(rng.choices(vocab, k=200))])

    def shingles(words):
        return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}

    true = len(shingles(base) & shingles(edited)) / len(shingles(base) | shingles(edited))
    estimate = (signatures[0] == signatures[1]).mean()
    assert abs(estimate - true) < 0.08
    assert (signatures[0] == signatures[2]).mean() < 0.05


def test_signatures_do_not_depend_on_batching_or_neighbours():
    docs = ["one two three four", "", "a", "a b", "five six seven eight nine"]
    hasher = minhash.MinHasher(minhash.MinHashSettings())
    together = hasher.signatures(docs, batch_size=512)
    alone = np.concatenate([hasher.signatures([doc]) for doc in docs])
    assert (together == alone).all()
    assert (hasher.signatures(docs[::-1])[::-1] == together).all()


def test_near_duplicate_pairs_and_clusters():
    docs = [
        "the cat sat on the mat by the door in the sun",
        "the cat sat on the mat by the door in the sun today",
        "completely unrelated words about rivers and stones and trees",
        "x",
        "x",
    ]
    settings = minhash.MinHashSettings()
    pairs, similarity = minhash.near_duplicate_pairs(minhash.MinHasher(settings).signatures(docs), settings)
    assert pairs.tolist() == [[0, 1], [3, 4]]
    assert (similarity >= settings.threshold).all()
    assert minhash.cluster_labels(5, pairs).tolist() == [0, 0, 1, 2, 2]
