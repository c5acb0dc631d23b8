"""Queue and namespace naming rules.

A namespace is ``[a-z][a-z0-9_]*`` of at most 30 characters, so that its queue
``worker_<ns>_queue``, its dead-letter queue ``worker_<ns>_queue_dlq`` and every table and
index pgmq derives from them stay within PostgreSQL's 63-byte identifiers. The same rules are
enforced in SQL (``tasker.validate_namespace``) so that plain-SQL producers get them too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tasker_worker.errors import InvalidName

NAMESPACE_MAX_LEN = 30
QUEUE_PREFIX = "worker_"
QUEUE_SUFFIX = "_queue"
DLQ_SUFFIX = "_dlq"
HANDLER_MAX_LEN = 100

#: The rules as patterns (JSON Schema and ``re`` alike), for the API's models and its OpenAPI document.
NAMESPACE_PATTERN = r"^[a-z][a-z0-9_]*$"
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"

# Characters a name or label shown to people may not contain: control characters (C0, DEL,
# C1) and the invisible ones that reorder or hide text (soft hyphen, zero-width and
# bidirectional marks, line/paragraph separators, BOM, the interlinear annotations and the two
# non-characters). Lone surrogates are no text at all: the API refuses them while decoding.
_UNPRINTABLE = (
    r"\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ufffe\uffff"
)
_SPACES = r"\x20\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
#: Printable text with no space at either end: worker names, hostnames, ids, reasons.
TEXT_PATTERN = rf"^[^{_UNPRINTABLE}{_SPACES}](?:[^{_UNPRINTABLE}]*[^{_UNPRINTABLE}{_SPACES}])?$"
#: ``TEXT_PATTERN`` without ``/``: a worker id, which is a path segment of the API.
WORKER_ID_PATTERN = rf"^[^{_UNPRINTABLE}{_SPACES}/](?:[^{_UNPRINTABLE}/]*[^{_UNPRINTABLE}{_SPACES}/])?$"

_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN[1:-1])
_HANDLER_RE = re.compile(HANDLER_PATTERN[1:-1])
_TEXT_RE = re.compile(TEXT_PATTERN)
_WORKER_ID_RE = re.compile(WORKER_ID_PATTERN)
_QUEUE_RE = re.compile(r"worker_([a-z][a-z0-9_]*)_queue")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is valid, else raise ``InvalidName`` saying why."""
    if not isinstance(namespace, str) or not namespace:
        raise InvalidName("namespace must be a non-empty string")
    if len(namespace) > NAMESPACE_MAX_LEN:
        raise InvalidName(
            f"namespace {namespace[:40]!r}... is {len(namespace)} characters; the limit is {NAMESPACE_MAX_LEN}"
        )
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidName(
            f"namespace {namespace!r} is invalid: use lowercase letters, digits and '_', starting with a letter"
        )
    return namespace


def validate_handler_name(name: str) -> str:
    """Return ``name`` if it is a valid handler name, else raise ``InvalidName``."""
    if not isinstance(name, str) or not name or len(name) > HANDLER_MAX_LEN:
        raise InvalidName(f"handler name must be 1..{HANDLER_MAX_LEN} characters")
    if not _HANDLER_RE.fullmatch(name):
        raise InvalidName(f"handler name {name!r} is invalid: use letters, digits, '_', '.', ':' or '-'")
    return name


def is_text(value: str) -> bool:
    """Whether ``value`` matches ``TEXT_PATTERN`` (printable, no space at either end)."""
    return _TEXT_RE.fullmatch(value) is not None


def is_worker_id(value: str) -> bool:
    """Whether ``value`` matches ``WORKER_ID_PATTERN``."""
    return _WORKER_ID_RE.fullmatch(value) is not None


def queue_name(namespace: str) -> str:
    """The pgmq queue of a namespace: ``worker_<namespace>_queue``."""
    return f"{QUEUE_PREFIX}{validate_namespace(namespace)}{QUEUE_SUFFIX}"


def dlq_name(queue: str) -> str:
    """The dead-letter queue of a queue: ``<queue>_dlq``."""
    return f"{queue}{DLQ_SUFFIX}"


def namespace_of(queue: str) -> str | None:
    """The namespace of a worker queue name, or ``None`` if it is not ``worker_<ns>_queue``."""
    match = _QUEUE_RE.fullmatch(queue)
    if match is None or len(match.group(1)) > NAMESPACE_MAX_LEN:
        return None
    return match.group(1)


def checked_namespaces(names: Iterable[str]) -> list[str]:
    """``names``, each validated; ``ValueError`` with the reason otherwise, which a pydantic
    validator reports as an error of its field (config, the API's registration)."""
    try:
        return [validate_namespace(name) for name in names]
    except InvalidName as exc:
        raise ValueError(str(exc)) from None
