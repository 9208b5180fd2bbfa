"""Instructions the app's thread executes per call, counted by Valgrind's callgrind: a figure no noisy neighbour moves.

Run under callgrind by run.py: ``instructions_client.py BASE_URL DB MODE CALLS``, MODE ``off`` (plain httpx2) or
``on`` (``joule_otel.instrument()``, ledger only). Counting is switched on (``callgrind_control``) only around the
measured calls, after a warm-up, with the garbage collector off so that a collection landing in one run and not the
other does not blur the difference; the app thread's count is callgrind's first thread.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys


def main() -> None:
    base_url, db, mode, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import httpx2

    if mode == "on":
        import joule_otel

        joule_otel.instrument(db=db, metrics="all")
    client = httpx2.Client(base_url=base_url)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    for _ in range(20):
        client.post("/chat/completions", json=body).json()
    gc.collect()
    gc.disable()
    subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(calls):
        client.post("/chat/completions", json=body).json()
    subprocess.run(["callgrind_control", "--instr=off", str(os.getpid())], check=True, capture_output=True)
    sys.stdout.flush()
    os._exit(0)  # the counts are written as callgrind's process ends; nothing else of this process matters


if __name__ == "__main__":
    main()
