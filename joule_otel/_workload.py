"""``workload(name)``: tag every inference call inside a block, function or coroutine.

The tag is kept in a context variable (so it follows asyncio tasks and threads started with
``contextvars.copy_context()``) and in OTel baggage under ``joule.workload``, so a propagator
carries it to the services this one calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import baggage, context

from joule_otel._attributes import JOULE_WORKLOAD
from joule_otel._headers import clean_string

F = TypeVar("F", bound=Callable[..., Any])

_frames: contextvars.ContextVar[tuple[tuple[workload, str, object], ...]] = contextvars.ContextVar(
    "joule_otel_workload", default=()
)
"""The ``workload()`` blocks entered in this context, innermost last: (the object, its name, the OTel context token).

Kept per context rather than on the object, so one object may be entered by many threads and tasks at once
(``SUPPORT = workload("support")``, then ``async with SUPPORT:`` in two tasks)."""


def current_workload() -> str | None:
    """The innermost ``workload()`` tag, else the ``joule.workload`` baggage, else ``None``."""
    return innermost_workload() or baggage_workload(context.get_current())


def innermost_workload() -> str | None:
    """The innermost ``workload()`` tag of this context, else ``None`` (the baggage is not looked at)."""
    frames = _frames.get()
    return frames[-1][1] if frames else None


def baggage_workload(ctx: context.Context | None) -> str | None:
    """The ``joule.workload`` baggage of an OpenTelemetry context (cleaned like a tag), else ``None``.

    Capture keeps the call's context and reads this on the background thread: most calls are made in a
    ``workload()`` block or with no baggage at all, and pay nothing for it.
    """
    if not ctx:
        return None
    value = baggage.get_baggage(JOULE_WORKLOAD, ctx)
    return clean_string(str(value)) if value is not None else None


class workload:
    """Tag inference calls with a workload name.

    Usage::

        with joule_otel.workload("support-bot"):
            client.chat.completions.create(...)

        @joule_otel.workload("nightly-summaries")
        async def summarise(...): ...

    One object can be shared: entered by several threads or tasks at once, each sees its own nesting.
    """

    def __init__(self, name: str) -> None:
        cleaned = clean_string(name) if isinstance(name, str) else None
        if not cleaned:
            raise ValueError("workload name must be a non-empty string")
        self.name = cleaned

    def __enter__(self) -> workload:
        ctx_token = context.attach(baggage.set_baggage(JOULE_WORKLOAD, self.name))
        _frames.set((*_frames.get(), (self, self.name, ctx_token)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        frames = _frames.get()
        for index in range(len(frames) - 1, -1, -1):  # normally the last one; never raise if it is not
            if frames[index][0] is self:
                _frames.set(frames[:index] + frames[index + 1 :])
                with contextlib.suppress(Exception):
                    context.detach(frames[index][2])  # type: ignore[arg-type]
                return

    async def __aenter__(self) -> workload:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)

    def __call__(self, func: F) -> F:
        """Use as a decorator on a function or a coroutine function."""
        name = self.name
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with workload(name):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with workload(name):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
