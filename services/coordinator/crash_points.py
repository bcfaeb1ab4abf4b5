"""Named steps where a test can make the coordinator die, as kill -9 would.

A process started with COREBANK_CRASH_AT=<step> kills itself with SIGKILL on
reaching that step: nothing after it runs, no cleanup, no flush.
"""

import os
import signal

CRASH_AT_ENV = "COREBANK_CRASH_AT"

AFTER_BEGIN = "after_begin"  # record written, debit reserved
AFTER_CREDIT_TRY = "after_credit_try"
AFTER_DECISION = "after_decision"  # decision written, debit confirmed or cancelled
AFTER_CREDIT_FINISH = "after_credit_finish"  # credit confirmed or cancelled, record not yet final
STEPS = (AFTER_BEGIN, AFTER_CREDIT_TRY, AFTER_DECISION, AFTER_CREDIT_FINISH)

_armed = os.environ.get(CRASH_AT_ENV)


def reached(step: str) -> None:
    assert step in STEPS, f"unknown crash point {step}"
    if _armed == step:
        os.kill(os.getpid(), signal.SIGKILL)
