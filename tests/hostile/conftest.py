"""The hostile-client suite: markers, and its place at the end of the session.

These tests attack the shared session cluster on purpose (transfer ids reused
across shards, clearing accounts driven to the int64 edge, collecting merchants
frozen and closed under load). Until the bugs they name are fixed, what they
leave behind could break tests that assume a clean cluster, so they run after
every other test of the session.
"""

from __future__ import annotations

import pathlib

HOSTILE_DIRECTORY = pathlib.Path(__file__).parent


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "hostile: hostile-client tests against the real cluster (tests/hostile; `make hostile` runs them long)")


def pytest_collection_modifyitems(session, config, items) -> None:
    def is_hostile(item) -> bool:
        return HOSTILE_DIRECTORY in pathlib.Path(str(item.fspath)).parents

    # A stable partition: every other test keeps its order, the hostile ones follow in theirs.
    items[:] = [item for item in items if not is_hostile(item)] + [item for item in items if is_hostile(item)]
