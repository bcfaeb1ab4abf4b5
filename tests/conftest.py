"""Fixture modules are plugins, listed here (psycopg's layout)."""

import os

# Service processes started by the tests inherit this: a pending timeout short
# enough that a test can watch the system cancel a transfer it could not confirm.
TEST_PENDING_TIMEOUT_SECONDS = 8
os.environ.setdefault("COREBANK_PENDING_TIMEOUT_SECONDS", str(TEST_PENDING_TIMEOUT_SECONDS))

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ledger"]
