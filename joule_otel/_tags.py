"""``tags(team="search", customer="acme")``: free-form tags on every inference call in a block, for chargeback.

Tags sit beside the workload: a workload is what the code does, tags say who pays for it (team, customer, feature,
environment). Like ``workload()`` they are kept in a context variable (asyncio tasks and copied contexts follow
them) and in OTel baggage, one entry ``joule.tag.<key>`` each, so a propagator carries them to the services this
one calls. Nested blocks merge, the inner block winning a key they share. A call's tags are, lowest first: the
process's (``instrument(tags=…)``, ``JOULE_OTEL_TAGS``), the baggage's, the innermost block's.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from opentelemetry import baggage, context

from joule_otel._headers import clean_string

F = TypeVar("F", bound=Callable[..., Any])

MAX_TAGS = 16
"""Tags a call keeps; the rest are dropped and counted (``stats()["tags_dropped"]``), never an error in the app."""
TAG_PREFIX = "joule.tag."
"""The prefix of a tag in baggage and in span, resource and call-event attributes (``joule.tag.team``)."""
MAX_KEY = 64
_KEY = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,63}")
"""A tag key: lower case letters, digits, ``_``, ``.`` and ``-`` (it is a column name in reports and a header)."""

Tags = Mapping[str, str]

_frames: contextvars.ContextVar[tuple[tuple[tags, dict[str, str], object], ...]] = contextvars.ContextVar(
    "joule_otel_tags", default=()
)
"""The ``tags()`` blocks entered in this context, innermost last: (the object, the merged tags, the OTel token)."""
_EMPTY: dict[str, str] = {}


def clean_key(key: object) -> str | None:
    """A tag key as stored (lower case, trimmed), or None if it cannot be one."""
    if not isinstance(key, str):
        return None
    key = key.strip().lower()
    return key if _KEY.fullmatch(key) else None


def current_tags() -> dict[str, str]:
    """The innermost ``tags()`` block's tags (merged with the blocks around it); ``{}`` outside any. Never mutate."""
    frames = _frames.get()
    return frames[-1][1] if frames else _EMPTY


def baggage_tags(ctx: context.Context | None) -> dict[str, str]:
    """The ``joule.tag.*`` entries of an OpenTelemetry context's baggage, cleaned; ``{}`` when none."""
    if not ctx:
        return _EMPTY
    entries = baggage.get_all(ctx)
    if not entries:
        return _EMPTY
    return from_attributes(entries)


def from_attributes(attributes: Mapping[str, object] | Iterable[tuple[str, object]]) -> dict[str, str]:
    """``joule.tag.<key>`` attributes (or baggage entries) as tags; what cannot be a tag is left out."""
    items = attributes.items() if isinstance(attributes, Mapping) else attributes
    found: dict[str, str] = {}
    for name, value in items:
        if isinstance(name, str) and name.startswith(TAG_PREFIX):
            key = clean_key(name[len(TAG_PREFIX) :])
            cleaned = clean_string(str(value)) if key is not None and value is not None else None
            if key is not None and cleaned is not None:
                found[key] = cleaned
    return found


def merged(*layers: Tags) -> tuple[dict[str, str] | None, int]:
    """The tags of a call from its layers (lowest precedence first), and how many were dropped.

    At most :data:`MAX_TAGS` are kept, the highest layers' first; ``None`` when there are none.
    """
    if not any(layers):
        return None, 0
    found: dict[str, str] = {}
    for layer in reversed(layers):  # highest first, so a lower layer never pushes a higher one's tag out
        for key, value in layer.items():
            if key not in found:
                found[key] = value
    if len(found) <= MAX_TAGS:
        return found, 0
    kept = dict(list(found.items())[:MAX_TAGS])
    return kept, len(found) - MAX_TAGS


def parse(text: str, where: str = "JOULE_OTEL_TAGS") -> dict[str, str]:
    """``team=search,env=prod`` as tags.

    Raises:
        ValueError: an entry without ``=``, an invalid key or an empty value (the message names ``where``).
    """
    found: dict[str, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        _check(key, value if sep else None, where)
        found[key.strip().lower()] = clean_string(value)  # type: ignore[assignment]
    return found


def checked(given: Mapping[str, object], where: str) -> dict[str, str]:
    """Tags a caller gave in code, checked: what cannot be a tag is a clear error there.

    Raises:
        ValueError: an invalid key or a value that is not a non-empty string.
    """
    found: dict[str, str] = {}
    for key, value in given.items():
        _check(key, value, where)
        found[key.strip().lower()] = clean_string(value)  # type: ignore[arg-type, assignment]
    if len(found) > MAX_TAGS:
        raise ValueError(f"{where}: {len(found)} tags; a call keeps at most {MAX_TAGS}")
    return found


def _check(key: object, value: object, where: str) -> None:
    if clean_key(key) is None:
        raise ValueError(
            f"{where}: tag key {key!r} must be 1-{MAX_KEY} lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    if not isinstance(value, str) or clean_string(value) is None:
        raise ValueError(f"{where}: the value of tag {key!r} must be a non-empty string, not {value!r}")


class tags:
    """Tag inference calls for chargeback: ``team``, ``customer``, ``feature``, ``env``.

    Usage::

        with joule_otel.tags(team="search", customer="acme"):
            client.chat.completions.create(...)

        @joule_otel.tags(feature="summaries")
        async def summarise(...): ...

    Blocks nest: the inner block's tags are added to the outer's, and win a key both set. One object may be entered
    by several threads or tasks at once, each with its own nesting.
    """

    def __init__(self, **given: str) -> None:
        self.tags = checked(given, "joule_otel.tags()")

    def __enter__(self) -> tags:
        combined = {**current_tags(), **self.tags}
        ctx = context.get_current()
        for key, value in self.tags.items():
            ctx = baggage.set_baggage(TAG_PREFIX + key, value, ctx)
        token = context.attach(ctx)
        _frames.set((*_frames.get(), (self, combined, token)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        frames = _frames.get()
        for index in range(len(frames) - 1, -1, -1):  # normally the last one; never raise if it is not
            if frames[index][0] is self:
                _frames.set(frames[:index] + frames[index + 1 :])
                with contextlib.suppress(Exception):
                    context.detach(frames[index][2])  # type: ignore[arg-type]
                return

    async def __aenter__(self) -> tags:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)

    def __call__(self, func: F) -> F:
        """Use as a decorator on a function or a coroutine function."""
        given = self.tags
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with tags(**given):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with tags(**given):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
