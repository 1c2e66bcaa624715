"""The canonical record and the mappings from raw items to it.

Records: id, prompt, response, context, system, source, license, ingested_at (the raw file's
modification time), metadata (JSON).
Preference pairs: the same with chosen/rejected in place of response.
A raw item that cannot be mapped raises Rejected with a named reason (the quarantine reason).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson
import pyarrow as pa

from flywheel.config import SourceParams

_COMMON_TAIL = [
    ("context", pa.string()),
    ("system", pa.string()),
    ("source", pa.string()),
    ("license", pa.string()),
    ("ingested_at", pa.timestamp("s", tz="UTC")),
    ("metadata", pa.string()),  # JSON: file, line, history (earlier turns), extra (unmapped fields)
]
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string())] + _COMMON_TAIL)
PREFERENCE_SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())] + _COMMON_TAIL
)

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class Rejected(Exception):
    """A raw item that cannot become a record; `reason` is the quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def content_id(*parts: Any) -> str:
    """Stable id from content alone: the same example from two files or runs gets the same id."""
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()[:24]


def metadata_of(row: dict) -> dict:
    return json.loads(row["metadata"] or "{}")


def history_of(row: dict) -> list:
    """The conversation's earlier turns, kept in the metadata."""
    return metadata_of(row).get("history", [])


def origin_of(pair: dict) -> str:
    """Where a preference pair came from: ingest, feedback, on_policy or retain."""
    return metadata_of(pair).get("origin", "ingest")


def map_item(value: Any, source: SourceParams) -> tuple[str, dict]:
    """Map one raw item to ('record' | 'preference', fields). Raises Rejected."""
    if not isinstance(value, dict):
        raise Rejected("not_an_object", f"expected an object, got {type(value).__name__}")
    if source.kind == "pair":
        fields = _map_pair(value, source)
    elif source.kind == "messages":
        fields = _map_conversation(_messages_turns(value, source), source, value)
    elif source.kind == "transcript":
        fields = _map_conversation(
            parse_transcript(_text(value, source, "text", required=True)),
            source,
            value,
            system=_text(value, source, "system", required=False),
        )
    else:
        return "preference", _map_preference(value, source)
    fields["id"] = content_id(
        fields["prompt"], fields["response"], fields["context"], fields["system"], fields["history"]
    )
    return "record", fields


def _text(item: dict, source: SourceParams, role: str, *, required: bool) -> str | None:
    name = source.field_for(role)
    value = item.get(name) if name else None
    if value is None:
        if required:
            raise Rejected(f"missing_field:{role}", f"no field {name!r}")
        return None
    if not isinstance(value, str):
        raise Rejected(f"wrong_type:{role}", f"field {name!r} is {type(value).__name__}, not a string")
    if not value.strip():
        if required:
            raise Rejected(f"empty_field:{role}", f"field {name!r} is empty")
        return None
    return value


def _extra(item: dict, source: SourceParams) -> dict:
    """The raw fields no role maps: kept in metadata so nothing the source said is lost."""
    mapped = source.role_fields.values()
    return {key: value for key, value in item.items() if key not in mapped}


def _map_pair(item: dict, source: SourceParams) -> dict:
    return {
        "prompt": _text(item, source, "prompt", required=True),
        "response": _text(item, source, "response", required=True),
        "context": _text(item, source, "context", required=False),
        "system": _text(item, source, "system", required=False),
        "history": [],
        "extra": _extra(item, source),
    }


def _messages_turns(item: dict, source: SourceParams) -> list[tuple[str, str]]:
    name = source.field_for("messages")
    messages = item.get(name)
    if messages is None:
        raise Rejected("missing_field:messages", f"no field {name!r}")
    if not isinstance(messages, list):
        raise Rejected("wrong_type:messages", f"field {name!r} is {type(messages).__name__}, not a list")
    turns = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Rejected("bad_messages", f"message {position} is not an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise Rejected("bad_messages", f"message {position} needs a known role and text content")
        turns.append((ROLE_ALIASES[role], content))
    return turns


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Split a '\\n\\nHuman: … \\n\\nAssistant: …' transcript into (role, text) turns."""
    parts = _TRANSCRIPT_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise Rejected("bad_transcript", "expected turns starting with 'Human:' or 'Assistant:'")
    role_of = {"Human": "user", "Assistant": "assistant"}
    return [(role_of[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def split_conversation(turns: list[tuple[str, str]]) -> tuple[str | None, list[dict], str, str]:
    """(system, history, prompt, response): the last user turn and the assistant reply to it."""
    system = "\n\n".join(text for role, text in turns if role == "system" and text.strip()) or None
    dialogue = [(role, text) for role, text in turns if role != "system"]
    if len(dialogue) < 2 or dialogue[-1][0] != "assistant" or dialogue[-2][0] != "user":
        raise Rejected("bad_conversation", "must end with a user turn followed by an assistant reply")
    prompt, response = dialogue[-2][1], dialogue[-1][1]
    if not prompt.strip():
        raise Rejected("empty_field:prompt", "the last user turn is empty")
    if not response.strip():
        raise Rejected("empty_field:response", "the assistant reply is empty")
    history = [{"role": role, "content": text} for role, text in dialogue[:-2]]
    return system, history, prompt, response


def _map_conversation(turns, source: SourceParams, item: dict, system: str | None = None) -> dict:
    turn_system, history, prompt, response = split_conversation(turns)
    return {
        "prompt": prompt,
        "response": response,
        "context": None,
        "system": system or turn_system,
        "history": history,
        "extra": _extra(item, source),
    }


def _map_preference(item: dict, source: SourceParams) -> dict:
    chosen = _text(item, source, "chosen", required=True)
    rejected = _text(item, source, "rejected", required=True)
    context = _text(item, source, "context", required=False)
    system = _text(item, source, "system", required=False)
    history: list[dict] = []
    if source.field_for("prompt") is not None:
        prompt = _text(item, source, "prompt", required=True)
    else:
        # Whole transcripts: they must share every turn but the last assistant reply.
        chosen_turns, rejected_turns = parse_transcript(chosen), parse_transcript(rejected)
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise Rejected(
                "preference_prefix_mismatch", "chosen and rejected transcripts differ before their last turn"
            )
        turn_system, history, prompt, chosen = split_conversation(chosen_turns)
        _, _, _, rejected = split_conversation(rejected_turns)
        system = system or turn_system
    fields = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "context": context,
        "system": system,
        "history": history,
        "extra": _extra(item, source),
    }
    fields["id"] = content_id(prompt, chosen, rejected, context, system, history)
    return fields
