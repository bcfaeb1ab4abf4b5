"""`pip install .` gives every package a process needs, data files included (issue 7)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
INSTALL_SECONDS_MAX = 300
MODULES = (
    "services.coordinator.recovery", "services.coordinator.operator", "services.server", "services.storage.audit",
    "services.storage.schema", "deploy.cluster", "corebank.v1.payments_pb2_grpc", "services.auth.__main__",
    "services.audit_log.__main__", "services.ledger.authorization",
)


def test_an_installed_copy_imports_every_entry_point_and_finds_its_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO)],
        check=True, timeout=INSTALL_SECONDS_MAX, capture_output=True,
    )
    probe = (
        "import importlib; "
        f"[importlib.import_module(m) for m in {MODULES!r}]; "
        "from services.storage.schema import schema_sql; from services.ledger.limits import TierLimits; "
        "import services.coordinator.recovery as r; "
        "assert 'id_registry' in schema_sql() and TierLimits.load(); print(r.__file__)"
    )
    # Run from the installed copy, not the repository: the repository must not be on the path.
    answer = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True, text=True, timeout=INSTALL_SECONDS_MAX,
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip().startswith(str(target))
