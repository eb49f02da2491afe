"""The one error of the distributed layer."""

from __future__ import annotations


class TensorParallelError(BaseException):
    """A tensor-parallel rank died, stopped answering within the timeout, or failed mid-step.

    The ranks run in lockstep, so the engine cannot go on: every later step raises this again.
    It derives from BaseException, like KeyboardInterrupt, on purpose: handlers that catch
    `Exception` to fail one batch and keep serving must not swallow it; the server treats it as
    fatal (reports unhealthy, exits non-zero).
    """
