"""
What a reward call accepts: the error naming a refused row ([`InvalidRow`]) and the checks behind it, of texts (text or
chat messages, valid Unicode, not empty where a text is needed) and of user ids (the stores' rule, bounded length).
`cut_text` bounds a text to a number of characters, keeping the side scoring keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data_utils import Messages
from .value_checks import is_integer, normalize_user_id

MAX_USER_ID_CHARS = 256
LOGGED_ID_CHARS = 32


class InvalidRow(ValueError):
    """A row the reward cannot score: `name` (the list: `prompts`, `completions`, `contexts`, `users`, `chosen`, ...),
    `row` (its index) and `problem` (what is wrong and the fix); the message is `` `name[row]` problem``."""

    def __init__(self, name: str, row: int, problem: str):
        self.name, self.row, self.problem = name, row, problem
        super().__init__(f"`{name}[{row}]` {problem}")


class InvalidUserId(InvalidRow, TypeError):
    """A user id of another type than `str` or `int` (a `TypeError` as well, as `normalize_user_id` raises)."""


def row_user_ids(values: Sequence, name: str) -> list[str | None]:
    """Each row's user id by the stores' rule (`normalize_user_id`), at most `MAX_USER_ID_CHARS` characters of valid
    Unicode; `None` stays "no user". A refused id raises [`InvalidUserId`] (wrong type) or [`InvalidRow`]."""
    return [None if value is None else user_id(value, name, row) for row, value in enumerate(values)]


def user_id(value: Any, name: str, row: int) -> str:
    """One row's user id (see `row_user_ids`)."""
    if is_integer(value) and int(value).bit_length() > 4 * MAX_USER_ID_CHARS:
        raise InvalidRow(name, row, f"is an integer of over {MAX_USER_ID_CHARS} digits; user ids are shorter.")
    try:
        user = normalize_user_id(value, f"{name}[{row}]")
    except TypeError:
        raise InvalidUserId(
            name,
            row,
            f"must be a str or an int (a user id; ints are read as their decimal string), got {type(value).__name__} "
            f"{preview(value)}. Convert the ids first, e.g. a float column with `int(...)`.",
        ) from None
    if len(user) > MAX_USER_ID_CHARS:
        raise InvalidRow(name, row, f"is {len(user)} characters long; a user id has at most {MAX_USER_ID_CHARS}.")
    check_unicode(user, name, row)
    return user


def preview(value: Any, limit: int = LOGGED_ID_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters (error messages never echo a whole input)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_unicode(text: str, name: str, row: int) -> None:
    """Refuse text that cannot be written as UTF-8 (a lone UTF-16 surrogate, as JSON's `\\ud800` decodes to)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRow(
            name,
            row,
            f"has a lone surrogate (U+{ord(text[error.start]):04X}) at character {error.start}: not valid Unicode. "
            "Encode the text as UTF-8 (a JSON string escapes surrogates only in pairs).",
        ) from None


def check_text(value: Any, name: str, row: int, allow_empty: bool = True, messages: bool = True) -> None:
    """
    Refuse a value that is not text (or, with `messages`, a list of chat messages: objects with a text `role` and a
    text `content`), that is not valid Unicode, or (without `allow_empty`) that is empty: an [`InvalidRow`] naming it.
    """
    if isinstance(value, str):
        check_unicode(value, name, row)
        if not allow_empty and not value.strip():
            raise InvalidRow(name, row, "is empty: send the text to score.")
        return
    if not messages or not isinstance(value, list):
        rule = (
            "every prompt and completion must be text or a list of chat messages"
            if messages
            else "a context must be text or None"
        )
        raise InvalidRow(name, row, f"is {type(value).__name__} {preview(value)}: {rule}. Drop or fill in that row.")
    if not allow_empty and not value:
        raise InvalidRow(name, row, "is an empty list of messages.")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidRow(
                name, row, f"message {index} must be an object with `role` and `content`, got {type(message).__name__}."
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise InvalidRow(
                name,
                row,
                f"message {index} needs a `role` that is text (system, user, assistant), got {preview(role)}.",
            )
        if not isinstance(content, str):
            raise InvalidRow(
                name,
                row,
                f"message {index} needs a `content` that is text, got {type(content).__name__}: only text is scored.",
            )
        check_unicode(role, name, row)
        check_unicode(content, name, row)
        if not allow_empty and not content.strip():
            raise InvalidRow(name, row, f"message {index} has empty content: send the text to score.")


def cut_text(value: str | Messages, max_chars: int, keep_end: bool = False) -> str | Messages:
    """
    `value` in at most `max_chars` characters of content: its beginning (a completion) or, with `keep_end`, its end (a
    prompt, as `truncate_completion` keeps a prompt's end). A list of messages keeps whole messages from that side and
    cuts the one that crosses the limit.
    """
    if isinstance(value, str):
        if len(value) <= max_chars:
            return value
        return value[len(value) - max_chars :] if keep_end else value[:max_chars]
    if sum(len(message["content"]) for message in value) <= max_chars:
        return value
    kept, room = [], max_chars
    for message in reversed(value) if keep_end else value:
        if room <= 0:
            break
        content = message["content"]
        if len(content) > room:
            content = content[len(content) - room :] if keep_end else content[:room]
        kept.append({**message, "content": content})
        room -= len(content)
    return kept[::-1] if keep_end else kept
