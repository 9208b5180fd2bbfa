"""Threads of joule_otel's own, started so that the app's signals never land on them.

A signal sent to a process is delivered to any one of its threads that does not block it. Python runs handlers on
the main thread only: when the signal lands on another thread, the main thread learns of it only once it runs
Python code again, and a main thread blocked in a system call (a ``multiprocessing`` worker waiting on its queue's
lock, ``time.sleep``, ``select``) never returns. An app's SIGTERM handler would then never run, and a terminated
``Pool`` worker would hang its parent's ``join()`` for ever. Every thread this package starts, and the OpenTelemetry
SDK threads it creates, are born with the app's signals blocked, so the kernel hands them to the app's threads.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

APP_SIGNALS = frozenset(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGWINCH")
    if hasattr(signal, name)
)
"""The signals apps, process managers and test runners send or handle; synchronous faults (SIGSEGV…) stay open."""


@contextmanager
def app_signals_blocked() -> Iterator[None]:
    """Block :data:`APP_SIGNALS` on this thread for the block: threads started inside inherit the mask at birth.

    One that arrives meanwhile waits and is delivered when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, and no such delivery either
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, APP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_daemon(target: Callable[..., Any], name: str, **kwargs: Any) -> threading.Thread:
    """Start a daemon thread that never takes the app's signals."""
    thread = threading.Thread(target=target, name=name, kwargs=kwargs, daemon=True)
    with app_signals_blocked():
        thread.start()
    return thread


_fork_depth = 0
_mask_before_fork: set[int | signal.Signals] | None = None


def _block_for_fork() -> None:
    global _fork_depth, _mask_before_fork
    if _fork_depth == 0:
        _mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, APP_SIGNALS)
    _fork_depth += 1


def _restore_after_fork() -> None:
    global _fork_depth
    _fork_depth = max(_fork_depth - 1, 0)
    if _fork_depth == 0 and _mask_before_fork is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)


def guard_forks() -> None:
    """Keep the app's signals from the threads other libraries' fork hooks start in a child.

    The OpenTelemetry SDK starts its export threads again in a forked child from its own ``after_in_child`` hooks.
    Hooks registered here wrap every hook registered before them (``before`` hooks run in reverse order, ``after``
    hooks in order), so call this after creating what registers them; nested registrations restore the mask once.
    """
    if hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):
        os.register_at_fork(
            before=_block_for_fork, after_in_parent=_restore_after_fork, after_in_child=_restore_after_fork
        )
