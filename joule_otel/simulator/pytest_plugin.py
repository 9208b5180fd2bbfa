"""pytest plugin: the ``joule_simulator`` fixture, registered through the ``pytest11`` entry point.

Any test suite with joule-otel installed can ask for it::

    def test_my_bot(joule_simulator):
        client = openai.OpenAI(base_url=joule_simulator.base_url, api_key="jc_test")
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from joule_otel.simulator import Simulator, running


@pytest.fixture
def joule_simulator() -> Iterator[Simulator]:
    """A fresh Joule Cloud simulator on a free loopback port, seeded with 0, instant streaming."""
    with running(seed=0) as sim:
        yield sim
