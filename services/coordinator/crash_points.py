"""Named steps where a test can make the coordinator die, as kill -9 would.

A process started with COREBANK_CRASH_AT=<step> kills itself with SIGKILL on
reaching that step: nothing after it runs, no cleanup, no flush.
"""

import os
import signal

CRASH_AT_ENV = "COREBANK_CRASH_AT"

AFTER_BEGIN = "after_begin"  # record written, debit reserved
AFTER_CREDIT = "after_credit"  # the credit shard decided: credit posted, refused or blocked; debit not settled
AFTER_DEBIT = "after_debit"  # record final with its debit branch; the answer not yet sent
STEPS = (AFTER_BEGIN, AFTER_CREDIT, AFTER_DEBIT)

_armed = os.environ.get(CRASH_AT_ENV)


def reached(step: str) -> None:
    assert step in STEPS, f"unknown crash point {step}"
    if _armed == step:
        os.kill(os.getpid(), signal.SIGKILL)
