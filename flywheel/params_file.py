"""Set dotted params in params.yaml by rewriting only the bytes of the values that change.

A YAML round trip (ruamel, or dvc's `exp run -S`) re-wraps lines, changes quotes and drops
trailing spaces elsewhere in the file, so every experiment commit carried noise. Here the file is
composed once to find where each value's text starts and ends, those spans are replaced with the
new values written as YAML flow text, and the result is read back: every other param must be
unchanged and the whole must pass the typed params before anything is written.
"""

from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from flywheel.config import get_dotted, parse_params, read_params_data
from flywheel.errors import ParamsError
from flywheel.io import atomic_path


def apply_overrides(path: str | Path, overrides: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set dotted params in params.yaml; returns {key: (old, new)} for the values that changed.

    Unchanged values leave the file untouched, so DVC sees no params change.
    """
    path = Path(path)
    current = read_params_data(path)
    changes = _changes(path, current, overrides)
    if not changes:
        return changes
    text = path.read_text()
    edited = _replace_values(text, {key: new for key, (_, new) in changes.items()})
    _check_only_these_changed(path, current, edited, changes)
    with atomic_path(path) as tmp:
        tmp.write_text(edited)
    return changes


def _changes(path: Path, current: dict, overrides: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} of the values that change. A mapping set over a section with the
    same keys is set key by key, so the section keeps its layout and comments."""
    changes = {}
    for key, value in overrides.items():
        try:
            old = get_dotted(current, key)
        except KeyError:
            raise ParamsError(f"{path}: cannot set {key!r}: no such param{did_you_mean(key, current)}") from None
        if isinstance(old, dict) and isinstance(value, dict) and value and set(value) <= set(old):
            changes.update(_changes(path, current, {f"{key}.{name}": item for name, item in value.items()}))
        elif old != value:
            changes[key] = (old, value)
    return changes


def did_you_mean(key: str, data: dict) -> str:
    """' (did you mean X?)' for the closest dotted key of data, or ''."""
    close = difflib.get_close_matches(key, list(_dotted_keys(data)), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _dotted_keys(data: dict, prefix: str = ""):
    for name, value in data.items():
        key = f"{prefix}{name}"
        yield key
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{key}.")


def _replace_values(text: str, values: dict[str, Any]) -> str:
    """Replace each dotted key's value text with the new value, from the end of the file back so
    the earlier spans keep their offsets."""
    spans = sorted(((*_value_span(text, key), value) for key, value in values.items()), reverse=True)
    for start, end, value in spans:
        old = text[start:end]
        kept_tail = old[len(old.rstrip()) :]  # a block value's span ends with the line break after it
        new = _flow_yaml(value)
        if start > 0 and text[start - 1] == ":":  # an empty value: `key:` needs a space before the new one
            new = " " + new
        rest = text[end:]
        if not kept_tail and (gap := len(rest) - len(rest.lstrip(" "))) and rest[gap:].startswith("#"):
            # The comment after the value stays in its column where the new value leaves room.
            rest = " " * max(1 if gap == 1 else 2, gap - (len(new) - len(old))) + rest[gap:]
        text = text[:start] + new + kept_tail + rest
    return text


def _value_span(text: str, key: str) -> tuple[int, int]:
    _, node = _key_and_value(text, key)
    return node.start_mark.index, node.end_mark.index


@lru_cache(maxsize=2)
def _composed(text: str) -> yaml.Node:
    """The file's node tree, composed once for all the keys asked of the same text."""
    return yaml.compose(text)


def _key_and_value(text: str, key: str) -> tuple[yaml.Node, yaml.Node]:
    name, node = None, _composed(text)
    for part in key.split("."):
        name, node = next((name, value) for name, value in node.value if name.value == part)
    return name, node


def comment_of(text: str, key: str) -> str:
    """What params.yaml says of a key: the comment after its value with the comment lines aligned
    under it, else the comment lines right above it; '' when it says nothing."""
    lines = text.splitlines()
    name, value = _key_and_value(text, key)
    line = lines[name.start_mark.line]
    after = value.end_mark.column if value.end_mark.line == name.start_mark.line else len(line)
    column = line.find("#", after)
    if column >= 0:
        said = [line[column:]]
        for below in lines[name.start_mark.line + 1 :]:
            if below.find("#") != column or below[:column].strip():
                break
            said.append(below[column:])
    else:
        said = []
        for above in reversed(lines[: name.start_mark.line]):
            if not above.lstrip().startswith("#"):
                break
            said.insert(0, above.strip())
    return " ".join(part.lstrip("#").strip() for part in said).strip()


def choices_in(comment: str, choices: list) -> dict[str, str]:
    """What a comment says of each allowed value, written as 'full: every weight | lora: adapters'
    ({'full': 'full: every weight', ...}); {} unless it names every choice."""
    said = {}
    for part in comment.split(" | "):
        value = part.split(":", 1)[0].strip()
        said[value] = part.strip()
    return {str(choice): said[str(choice)] for choice in choices} if all(str(c) in said for c in choices) else {}


def _flow_yaml(value: Any) -> str:
    """One value as YAML on one line, quoted as it must be inside a flow mapping ({a: 'x, y'}):
    500, 5.0e-05, 'a: b', [q_proj, v_proj], {r: 8}, null."""
    dumped = yaml.safe_dump(
        [value], default_flow_style=True, width=float("inf"), allow_unicode=True, sort_keys=False
    ).strip()
    return dumped.removesuffix("...").strip()[1:-1]  # the one element of the flow sequence


def _check_only_these_changed(path: Path, current: dict, edited: str, changes: dict) -> None:
    try:
        result = yaml.safe_load(edited)
    except yaml.YAMLError as error:  # a value's text that YAML reads differently in its place
        raise ParamsError(f"{path}: setting {sorted(changes)} would not leave valid YAML: {error}") from None
    expected = copy.deepcopy(current)
    for key, (_, new) in changes.items():
        *parents, leaf = key.split(".")
        node = expected
        for part in parents:
            node = node[part]
        node[leaf] = new
    if result != expected:
        raise ParamsError(f"{path}: setting {sorted(changes)} in place changed other params; set them by hand")
    parse_params(result, source=f"{path} with {sorted(changes)} set")
