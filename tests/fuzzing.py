"""Hypothesis for the fuzz properties: a bounded number of cases in CI, more on demand, counted per property.

HYPOTHESIS_PROFILE=ci (the default) runs a bounded number of examples per property; =fuzz runs FUZZ_SCALE
times as many (e.g. a nightly job; FUSEDIT_FUZZ_SCALE sets the factor, 25 by default). Properties that
start processes ask for fewer via `fuzz_examples(n)`. tests/conftest.py prints the counts at the end.
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter

from hypothesis import HealthCheck, settings

FUZZ_SCALE = {"ci": 1, "fuzz": int(os.environ.get("FUSEDIT_FUZZ_SCALE", "25"))}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
for _name, _scale in FUZZ_SCALE.items():
    settings.register_profile(_name, max_examples=40 * _scale, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(PROFILE)
FUZZ_CASES: Counter[str] = Counter()  # test node id -> examples it ran


def dotted(path) -> str:
    """A field path as the error lines write it: ('train', 'stages', 0, 'lr') -> 'train.stages.0.lr'."""
    return ".".join(str(p) for p in path)


def assert_names_what_is_wrong(line: str, needles, context=None) -> str:
    """`line` (a user-error line as shown) is one non-empty line naming at least one of `needles`: the field
    (dotted path or key), value, option or file at fault. Needles are compared as `one_line` shows them."""
    from fusedit.errors import one_line

    shown = one_line(line)
    assert shown and "\n" not in shown and "Traceback" not in shown, (context, line)
    wanted = sorted({n for n in (one_line(str(x)) for x in needles) if n})
    assert wanted, f"nothing to look for in {shown!r} ({context})"
    assert any(n in shown for n in wanted), \
        f"the error does not name what is wrong: {shown!r} names none of {wanted[:12]} ({context})"
    return shown


def fuzz_examples(n: int) -> int:
    """`n` examples under the ci profile, scaled up under the fuzz profile."""
    return n * FUZZ_SCALE.get(PROFILE, 1)


def fuzz_case() -> None:
    """Count one example of the running property (called first thing in each property's body)."""
    FUZZ_CASES[os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]] += 1


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds` (SIGALRM, main thread)."""

    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
