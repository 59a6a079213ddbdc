"""A guard for tests of inputs that could block for ever (a FIFO): fail after a few seconds instead of hanging."""

import contextlib
import signal


@contextlib.contextmanager
def within(seconds: int):
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
