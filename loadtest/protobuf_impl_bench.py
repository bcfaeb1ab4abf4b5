"""What forcing pure-Python protobuf would cost: the price of the etcd3 package.

    python loadtest/protobuf_impl_bench.py [--seconds 2] [--etcd3-python /tmp/venv-etcd3/bin/python]

etcd3 0.12 ships _pb2 modules too old for protobuf >= 4, which import only when
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python is set for the whole process. That
setting would switch every message in the server, corebank's own included, to
the pure-Python runtime. This script measures encode + decode of corebank.v1
messages under the default (upb) runtime and the forced pure-Python one, each
in its own subprocess since the runtime is chosen once, at the first import.

With --etcd3-python (the interpreter of a throwaway venv holding etcd3 0.12 and
this protobuf), it also shows whether etcd3 imports without and with the setting.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

IMPLEMENTATION_VARIABLE = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"
MEASURE_SECONDS_DEFAULT = 2.0
# The best of a few rounds: the machine is shared, and the best round is the least disturbed.
ROUNDS = 3
CHILD_TIMEOUT_SECONDS = 300
IMPORT_CHECK_TIMEOUT_SECONDS = 60
REPO_DIR = pathlib.Path(__file__).resolve().parent.parent


def _make_messages():
    try:
        from corebank.v1 import payments_pb2, transfers_pb2
    except ModuleNotFoundError:  # a bare checkout: the generated code lives under protos/python
        sys.path.insert(0, str(REPO_DIR / "protos" / "python"))
        from corebank.v1 import payments_pb2, transfers_pb2

    request = payments_pb2.TransferRequest(
        transfer_id="bench-3f2a9c1d0e7b:p0w12:48213",
        debit_account_id="acc_m4xq2n7yk3v5gq2ndfb6x3wz5a",
        credit_account_id="acc_b7tq2lk4hz6d3rj5sxq2y7n4ue",
        amount_minor=12_345,
        currency="USD",
        reference="invoice 2024-118, thank you",
    )
    transfer = transfers_pb2.Transfer(
        transfer_id=request.transfer_id,
        debit_account_id=request.debit_account_id,
        credit_account_id=request.credit_account_id,
        amount_minor=request.amount_minor,
        currency=request.currency,
        reference=request.reference,
        status=transfers_pb2.POSTED,
    )
    transfer.created_at.FromNanoseconds(1_732_190_000_123_456_789)
    transfer.finalized_at.FromNanoseconds(1_732_190_000_125_456_789)
    return {"TransferRequest": request, "Transfer": transfer}


def _round_trips_per_second(message, seconds: float) -> float:
    """Serialize, then parse the bytes back into a new message: what one gRPC hop does."""
    message_type = type(message)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        # Batches of 100 keep the clock reads out of the measurement.
        for _ in range(100):
            message_type.FromString(message.SerializeToString())
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def child_main(seconds: float) -> None:
    from google.protobuf.internal import api_implementation

    figures = {}
    for name, message in _make_messages().items():
        figures[name] = max(_round_trips_per_second(message, seconds / ROUNDS) for _ in range(ROUNDS))
    print(json.dumps({"implementation": api_implementation.Type(), "round_trips_per_second": figures}))


def measure(implementation: str | None, seconds: float) -> dict:
    env = dict(os.environ)
    env.pop(IMPLEMENTATION_VARIABLE, None)
    if implementation is not None:
        env[IMPLEMENTATION_VARIABLE] = implementation
    completed = subprocess.run(
        [sys.executable, __file__, "--child", "--seconds", str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_SECONDS,
        check=True,
    )
    return json.loads(completed.stdout)


def check_etcd3_import(python: str) -> list[str]:
    lines = []
    for implementation in (None, "python"):
        env = dict(os.environ)
        env.pop(IMPLEMENTATION_VARIABLE, None)
        if implementation is not None:
            env[IMPLEMENTATION_VARIABLE] = implementation
        completed = subprocess.run(
            [
                python,
                "-c",
                (
                    "import google.protobuf, etcd3; from google.protobuf.internal import api_implementation as a; "
                    "print(f'etcd3 {etcd3.__version__} imported (protobuf {google.protobuf.__version__}, {a.Type()})')"
                ),
            ],
            check=False,  # a failed import is a finding to print, not an error
            env=env,
            capture_output=True,
            text=True,
            timeout=IMPORT_CHECK_TIMEOUT_SECONDS,
            cwd="/",
        )
        setting = (
            f"{IMPLEMENTATION_VARIABLE}={implementation}" if implementation else f"{IMPLEMENTATION_VARIABLE} unset"
        )
        if completed.returncode == 0:
            lines.append(f"{setting}: {completed.stdout.strip()}")
        else:
            error_lines = [line for line in completed.stderr.splitlines() if "Error" in line]
            lines.append(
                f"{setting}: import etcd3 fails: {error_lines[-1] if error_lines else completed.stderr.strip()}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=MEASURE_SECONDS_DEFAULT, help="per message and runtime")
    parser.add_argument("--etcd3-python", help="python of a throwaway venv with etcd3 0.12 installed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child_main(arguments.seconds)
        return 0

    default = measure(None, arguments.seconds)
    forced = measure("python", arguments.seconds)
    import google.protobuf

    print(
        f"protobuf {google.protobuf.__version__}, Python {sys.version.split()[0]}; encode+decode round trips per second"
    )
    print(
        f"{'message':<16} {default['implementation'] + ' (default)':>16} {forced['implementation'] + ' (forced)':>18} {'ratio':>7}"
    )
    for name, default_rate in default["round_trips_per_second"].items():
        forced_rate = forced["round_trips_per_second"][name]
        print(f"{name:<16} {default_rate:>16,.0f} {forced_rate:>18,.0f} {default_rate / forced_rate:>6.1f}x")
    if arguments.etcd3_python:
        print()
        for line in check_etcd3_import(arguments.etcd3_python):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
