"""Fixture modules are plugins, listed here (psycopg's layout)."""

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ledger"]
