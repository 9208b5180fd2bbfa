"""Instructions per call, counted by Valgrind's callgrind: figures no noisy neighbour moves.

Run under callgrind by run.py: ``instructions_client.py BASE_URL DB MODE CALLS``, plain httpx2 calls to the simulator.

- MODE ``off`` (no capture) or ``on`` (``joule_otel.instrument()``, ledger only): the calls are counted; run.py reads
  the app thread's count (callgrind's first thread).
- MODE ``drain``: the calls are captured and held, the background thread is stopped, and one drain of them all
  (parsing, the call's row) is counted on this thread, after an empty counting window run.py subtracts (the cost of
  switching counting on and off). One drain of many calls leaves out what a drain costs whatever its size, which a
  slowed-down process under Valgrind would otherwise pay once a call.

Counting is switched on (``callgrind_control``) only around the measured work, after a warm-up, with the garbage
collector off so that a collection landing in one run and not the other does not blur the difference.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def main() -> None:
    base_url, db, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import httpx2

    if mode != "off":
        import joule_otel

        joule_otel.instrument(db=db, metrics="all", flush_interval=60 if mode == "drain" else None)
    client = httpx2.Client(base_url=base_url)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    for _ in range(20):
        client.post("/chat/completions", json=body).json()
    if mode == "drain":
        drain(lambda: client.post("/chat/completions", json=body).json(), calls)
        return
    gc.collect()
    gc.disable()
    _callgrind("--instr=on")
    for _ in range(calls):
        client.post("/chat/completions", json=body).json()
    _callgrind("--instr=off")
    sys.stdout.flush()
    os._exit(0)  # the counts are written as callgrind's process ends; nothing else of this process matters


def drain(call: Callable[[], object], calls: int) -> None:
    """Count one drain of ``calls`` captured calls, after an empty window (dumped apart) that run.py subtracts."""
    import joule_otel
    from joule_otel import _instrument

    joule_otel.flush(timeout_s=600)
    state = _instrument._state
    assert state is not None
    pipeline, held = state.pipeline, list[Any]()
    state.capture.sink = held.append
    for _ in range(calls):
        call()
    assert len(held) == calls, f"{len(held)} of {calls} calls captured"
    pipeline.shutdown(600, compact=False)  # the worker stops; what is drained next is counted on this thread alone
    pipeline._queue.extend(held)
    gc.collect()
    gc.disable()
    _callgrind("--instr=on")
    _callgrind("--instr=off")
    _callgrind("--dump=empty")
    _callgrind("--instr=on")
    rows = pipeline._drain(wait_for_decoders=False)
    _callgrind("--instr=off")
    assert len(rows) == calls, f"{len(rows)} rows of {calls} calls"
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
