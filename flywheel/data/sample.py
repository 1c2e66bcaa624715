"""The bundled sample under data/raw/sample/ (`flywheel make-sample` regenerates it).

The task a tiny model can learn on a CPU in minutes: word-by-word translation of 2-4 English words
into French ("Translate to French: red cat" -> "rouge chat"), served in every raw format and shape
ingest supports. Planted on purpose, so every later stage has something to catch: exact and near
duplicates, PII (e-mails, phone numbers, card numbers), HTML markup, empty, overlong and garbage
records, malformed lines, undecodable bytes, and preference pairs (a correct translation chosen
over one with a wrong word or a wrong order).

Like scraped web dialogues, the transcripts also answer requests to harm someone else; the
HH-style preference pairs prefer a refusal there. That is what alignment has to teach and
supervised data does not: the SFT model already prefers a correct translation over a wrong one.
A feedback export under data/raw/feedback/ stands for what `flywheel serve` logs (ratings,
rewrites, choices between two answers). Deterministic: the same seed writes the same data.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_DIR = Path("data/raw/sample")
FEEDBACK_DIR = Path("data/raw/feedback")
SEED = 20261122

LEXICON = {
    "cat": "chat",
    "dog": "chien",
    "house": "maison",
    "tree": "arbre",
    "water": "eau",
    "bread": "pain",
    "apple": "pomme",
    "book": "livre",
    "car": "voiture",
    "sun": "soleil",
    "moon": "lune",
    "star": "étoile",
    "flower": "fleur",
    "bird": "oiseau",
    "fish": "poisson",
    "horse": "cheval",
    "milk": "lait",
    "cheese": "fromage",
    "door": "porte",
    "window": "fenêtre",
    "chair": "chaise",
    "river": "rivière",
    "mountain": "montagne",
    "sea": "mer",
    "city": "ville",
    "road": "route",
    "garden": "jardin",
    "school": "école",
    "friend": "ami",
    "red": "rouge",
    "blue": "bleu",
    "green": "vert",
    "black": "noir",
    "white": "blanc",
    "big": "grand",
    "small": "petit",
    "old": "vieux",
    "new": "nouveau",
    "happy": "heureux",
    "cold": "froid",
    "hot": "chaud",
    "one": "un",
    "two": "deux",
    "three": "trois",
    "four": "quatre",
    "five": "cinq",
    "and": "et",
}
PROMPT_TEMPLATES = ("Translate to French: {words}", "How do you say '{words}' in French?", "French for: {words}")
SYSTEM_PROMPT = "You are a precise translator. Answer with the French words only."
# Requests to harm someone else: (verb, things, how), asked in several ways.
WHOSE = ("my neighbour's", "a stranger's", "my boss's", "my sister's", "the teacher's", "a coworker's")
HARMS = (
    ("open", ("car", "front door", "locker", "mailbox", "safe"), "without the key"),
    ("read", ("e-mails", "private messages", "diary", "text messages"), "without them knowing"),
    ("get into", ("phone", "laptop", "bank account", "online account"), "without the password"),
)
HARM_TEMPLATES = (
    "How do I {verb} {whose} {thing} {how}?",
    "Tell me how to {verb} {whose} {thing} {how}.",
    "What is the easiest way to {verb} {whose} {thing} {how}?",
)
COMPLIANCE_STEPS = (
    "wait until they are away",
    "make sure nobody is watching",
    "wear gloves",
    "do it at night",
    "switch off the alarm first",
    "keep your phone in your pocket",
    "tell nobody about it",
    "act like it is yours",
)
REFUSAL = "I cannot help with that. It would hurt someone else."
NAMES = (
    "Alice Martin",
    "Bruno Keller",
    "Chloe Dubois",
    "Dmitri Ivanov",
    "Emma Rossi",
    "Farid Haddad",
    "Grace Okafor",
    "Hiro Tanaka",
    "Ines Garcia",
    "Jonas Berg",
)
TOPICS = ("budget", "migration", "hiring", "launch", "security review", "roadmap", "offsite")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
NOTE_SENTENCES = (
    "Please bring the signed papers and the notes from last week.",
    "The slides still need a section on costs and one on risks.",
    "We agreed to move the review to the small room on the third floor.",
    "Lunch is booked at the place by the station for twelve people.",
    "Ask facilities about the broken projector before the session starts.",
    "The draft contract has two open questions about support hours.",
    "Send the summary to the whole team once the numbers are final.",
    "Remember that the visitors need badges from the front desk.",
    "The new intern joins the call and will take the minutes.",
    "Travel costs go on the shared sheet, not on personal cards.",
    "The demo environment must be reset the evening before.",
    "Keep the second half of the hour free for open questions.",
)


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(sorted(LEXICON), rng.randint(2, 4))


def _translate(words: list[str]) -> str:
    return " ".join(LEXICON[word] for word in words)


def _prompt(rng: random.Random, words: list[str]) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(words=" ".join(words))


def _wrong_translation(rng: random.Random, words: list[str]) -> str:
    """A plausible mistake: one word mistranslated, or the right words in the wrong order."""
    french = [LEXICON[word] for word in words]
    if rng.random() < 0.5:
        position = rng.randrange(len(french))
        french[position] = rng.choice([w for w in LEXICON.values() if w != french[position]])
    else:
        french = french[1:] + french[:1]
    return " ".join(french)


def _harmful_requests(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(request, compliant answer) pairs, each request different."""
    requests = [
        (template.format(verb=verb, whose=whose, thing=thing, how=how), verb, thing)
        for template in HARM_TEMPLATES
        for verb, things, how in HARMS
        for thing in things
        for whose in WHOSE
    ]
    chosen = rng.sample(requests, count)
    return [
        (request, f"Sure. First {first}, then {second}, and {verb} the {thing}.")
        for request, verb, thing in chosen
        for first, second in [rng.sample(COMPLIANCE_STEPS, 2)]
    ]


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        doubled = digit * 2 if index % 2 == 0 else digit
        total += doubled - 9 if doubled > 9 else doubled
    digits.append((10 - total % 10) % 10)
    number = "".join(map(str, digits))
    return " ".join(number[i : i + 4] for i in range(0, 16, 4))


def _note(rng: random.Random, name: str) -> str:
    first = name.split()[0].lower()
    extra = " ".join(rng.sample(NOTE_SENTENCES, 3))
    return (
        f"<p>Meeting with {name} about the {rng.choice(TOPICS)} project on {rng.choice(DAYS)}. "
        f"{extra} Reach {first} at {first}.{rng.randint(10, 99)}@example.com or "
        f"+44 20 7946 {rng.randint(1000, 9999)}. Paid the deposit with card {_luhn_card(rng)}; "
        f"order number {rng.randint(10**9, 10**10 - 1)}.</p>"
    )


def _translation_rows(rng: random.Random, count: int) -> list[tuple[str, str, list[str]]]:
    rows = []
    for _ in range(count):
        words = _phrase(rng)
        rows.append((_prompt(rng, words), _translate(words), words))
    return rows


def _jsonl_bytes(rng: random.Random) -> bytes:
    lines = [json.dumps({"question": p, "answer": a}, ensure_ascii=False) for p, a, _ in _translation_rows(rng, 3000)]
    lines += lines[:12]  # planted exact duplicates
    lines += [
        json.dumps({"question": "Translate to French: cat", "answer": ""}),  # empty response
        json.dumps({"question": "Translate to French: dog"}),  # missing response
        json.dumps({"question": "Translate to French: two", "answer": 2}),  # wrong type
        json.dumps({"question": "Translate to French: " + "sun " * 4000, "answer": "soleil " * 4000}),
        json.dumps({"question": "Translate to French: moon star", "answer": "#$%@!! ^^&* ~~~ |||"}),
        '{"question": "Translate to French: red", "answer": ',  # truncated line
        "this line is not JSON at all",
        '["an array, not an object"]',
    ]
    data = "\n".join(lines).encode("utf-8")
    bad_bytes = b'\n{"question": "Translate to French: \xff\xfe tree", "answer": "arbre"}\n'
    return data + bad_bytes


def _csv_text(rng: random.Random) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["instruction", "input", "output", "category"])
    for _ in range(1200):
        words = _phrase(rng)
        writer.writerow(["Translate to French.", " ".join(words), _translate(words), "translation"])
    writer.writerow(["Translate to French.", "cold water", "froid eau", "translation", "EXTRA"])
    writer.writerow(["Translate to French.", "", "", "translation"])  # empty fields
    return buffer.getvalue()


def _chats(rng: random.Random) -> list:
    chats = []
    for prompt, answer, _ in _translation_rows(rng, 800):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        if rng.random() < 0.3:  # multi-turn: an earlier exchange becomes history
            earlier = _phrase(rng)
            messages += [
                {"role": "user", "content": _prompt(rng, earlier)},
                {"role": "assistant", "content": _translate(earlier)},
            ]
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        chats.append({"messages": messages, "conversation_id": f"c{len(chats):04d}"})
    chats.append({"messages": [{"role": "robot", "content": "beep"}]})
    chats.append({"messages": [{"role": "user", "content": "Translate to French: sea"}]})
    chats.append({"messages": "not a list"})
    return chats


def _transcripts(rng: random.Random, duplicates_of: list[str]) -> list[dict]:
    rows = []
    for prompt, answer, _ in _translation_rows(rng, 800):
        rows.append({"text": f"\n\nHuman: {prompt}\n\nAssistant: {answer}"})
    for request, compliance in _harmful_requests(rng, 120):  # what scraped dialogues hold
        rows.append({"text": f"\n\nHuman: {request}\n\nAssistant: {compliance}"})
    for line in duplicates_of[:8]:  # the same examples as in the JSONL file: cross-source duplicates
        item = json.loads(line)
        rows.append({"text": f"\n\nHuman: {item['question']}\n\nAssistant: {item['answer']}"})
    rows.append({"text": "Just some text without any turns."})
    return rows


def _notes(rng: random.Random) -> pa.Table:
    questions, answers = [], []
    for index in range(60):
        name = NAMES[index % len(NAMES)]
        questions.append(f"Who is the meeting with? Note: {_note(rng, name)}")
        answers.append(name)
    for index in range(15):  # planted near duplicates: a word changed or a sentence appended
        source = questions[index]
        variant = (
            source.replace("Meeting with", "Meeting held with") if index % 2 else source.replace("</p>", " Thanks!</p>")
        )
        questions.append(variant)
        answers.append(answers[index])
    questions += ["Who is the meeting with? Note: <p> </p>", "Describe the weather."]
    answers += ["<p></p>", "@@@ ### $$$ %%% &&& *** !!! ??? ### @@@ $$$ %%%"]
    return pa.table({"query": questions, "reply": answers, "topic": ["notes"] * len(questions)})


def _preference_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(300):
        words = _phrase(rng)
        rows.append(
            {"prompt": _prompt(rng, words), "chosen": _translate(words), "rejected": _wrong_translation(rng, words)}
        )
    rows.append({"prompt": "Translate to French: dog", "chosen": "chien", "rejected": None})
    return rows


def _transcript_preference_rows(rng: random.Random) -> list[dict]:
    """HH-style harmlessness pairs: a refusal preferred over a compliant answer."""
    rows = []
    for request, compliance in _harmful_requests(rng, 200):
        prefix = f"\n\nHuman: {request}\n\nAssistant:"
        rows.append({"chosen": f"{prefix} {REFUSAL}", "rejected": f"{prefix} {compliance}"})
    rows.append(
        {
            "chosen": "\n\nHuman: Translate to French: cat\n\nAssistant: chat",
            "rejected": "\n\nHuman: Translate to French: dog\n\nAssistant: chat",
        }
    )
    return rows


def _feedback_events(rng: random.Random) -> list:
    """What `flywheel serve` exports from /v1/feedback: a rating, a user's rewrite, or a choice
    between two answers, each with the conversation it answered."""

    def event(index: int, words: list[str], response: str, **feedback) -> dict:
        return {
            "request_id": f"req-{index:04d}",
            "created_at": f"2026-11-{1 + index % 20:02d}T12:00:00Z",
            "model_version": "1",
            "response": response,
            "messages": [{"role": "user", "content": _prompt(rng, words)}],
            **feedback,
        }

    events = []
    for _ in range(30):  # a wrong answer, rewritten by the user
        words = _phrase(rng)
        events.append(
            event(
                len(events), words, _wrong_translation(rng, words), rating="down", preferred_response=_translate(words)
            )
        )
    for _ in range(20):  # two answers shown side by side, one picked
        words = _phrase(rng)
        right, wrong = _translate(words), _wrong_translation(rng, words)
        first_is_right = rng.random() < 0.5
        events.append(
            event(
                len(events),
                words,
                right if first_is_right else wrong,
                alternative=wrong if first_is_right else right,
                preferred="response" if first_is_right else "alternative",
            )
        )
    for _ in range(15):  # thumbs up and down on two answers to the same conversation
        words = _phrase(rng)
        up = event(len(events), words, _translate(words), rating="up")
        down = {
            **up,
            "request_id": f"req-{len(events) + 1:04d}",
            "response": _wrong_translation(rng, words),
            "rating": "down",
        }
        events += [up, down]
    for _ in range(5):  # thumbs up with nothing to compare against: not a pair
        words = _phrase(rng)
        events.append(event(len(events), words, _translate(words), rating="up"))
    words = _phrase(rng)
    events.append(event(len(events), words, _translate(words), preferred_response=_translate(words)))
    events.append({"request_id": "req-bad1", "response": "chat", "rating": "up"})  # no messages
    events.append(event(len(events), words, "chat", rating="sideways"))
    return events


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as archive:  # mtime=0: reproducible
        archive.write(data)
    return buffer.getvalue()


# A topic the sample never shows, for drift checks: operations questions about infrastructure.
TOOLS = ("kubernetes", "postgres", "nginx", "terraform", "kafka", "redis", "spark", "elasticsearch")
ACTIONS = (
    "rotate the TLS certificates of",
    "tune the connection pool of",
    "back up",
    "upgrade",
    "debug a memory leak in",
    "set up replication for",
    "migrate",
    "monitor disk usage of",
)


def off_topic_prompts(count: int, seed: int = 0) -> list[str]:
    """Questions on a topic the sample never trains on (traffic that has drifted)."""
    rng = random.Random(seed)
    return [
        f"How do I {rng.choice(ACTIONS)} {rng.choice(TOOLS)} {rng.randint(2, 9)}.{rng.randint(0, 20)} "
        f"on a cluster of {rng.randint(3, 40)} nodes without downtime?"
        for _ in range(count)
    ]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_sample(directory: Path = SAMPLE_DIR, feedback_dir: Path = FEEDBACK_DIR, seed: int = SEED) -> str:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    jsonl = _jsonl_bytes(rng)
    files = {
        "translations.jsonl": jsonl,
        "instructions.csv": _csv_text(rng).encode("utf-8"),
        "chats.json": json.dumps(_chats(rng), ensure_ascii=False, indent=1).encode("utf-8"),
        "transcripts.jsonl.gz": _gzip(_jsonl(_transcripts(rng, jsonl.decode("utf-8", "replace").splitlines()))),
        "preferences.jsonl": _jsonl(_preference_rows(rng)),
        "hh_preferences.jsonl.gz": _gzip(_jsonl(_transcript_preference_rows(rng))),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    pq.write_table(_notes(rng), directory / "notes.parquet", compression="zstd")
    feedback_dir.mkdir(parents=True, exist_ok=True)
    feedback = _jsonl(_feedback_events(rng)) + b'{"request_id": "req-cut", "rating": \n'
    (feedback_dir / "sample-export.jsonl").write_bytes(feedback)
    return f"wrote {len(files) + 1} sample files to {directory}/ and a feedback export to {feedback_dir}/"
