"""The one exception tree of telephony-bridge.

    BridgeError
    ├── ConfigError                a setting is wrong; the message names the key, the value and what is allowed
    ├── SavantsError               the Savants service refused or failed
    │   ├── TokenError             the token endpoint said no (code, status, retry_after_s)
    │   └── SessionError           /voice-stream refused or dropped the session (code)
    ├── AdmissionError             no device can take this call now
    │   └── AccountingUnavailable  (accounting/base.py) Redis did not answer: fail closed
    ├── CallerGone                 (leg.py) the caller's leg is closed: nothing more can be sent to the caller
    │   └── CallerStalled          its connection is open but takes nothing: the call's outcome is caller_lost
    ├── StoreUnavailable           (store.py) the shared store of stream tokens and outcomes did not answer
    └── FlowError                  (tools/twilio_flow.py) the simulated Twilio got an answer it cannot follow

A peer that breaks its protocol is not an exception: the sans-I/O protocols turn its garbage into values
(``Malformed``, ``Failed``) that the driver acts on. Messages say what was expected and what arrived, so a
log line is enough to act on. Secrets never appear in them.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class BridgeError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(BridgeError):
    """A configuration value is wrong; raised at start-up, never mid-call."""


class SavantsError(BridgeError):
    """The Savants service refused or failed."""


class TokenError(SavantsError):
    """The token endpoint refused us. ``code`` is Savants' error code (or our own for transport faults)."""

    def __init__(
        self, message: str, *, code: str, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after_s = retry_after_s


class SessionError(SavantsError):
    """The voice-stream socket refused or dropped the session. ``close_code``: the WebSocket close code Savants
    sent, when the session ended with one (``None``: no close frame, e.g. a TCP reset or a stall)."""

    def __init__(self, message: str, *, code: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.close_code = close_code


class AdmissionError(BridgeError):
    """No device of the pool can take another call now."""


class CallerGone(BridgeError):
    """The caller's leg is closed (the peer hung up or vanished): nothing more can be sent to the caller."""


class CallerStalled(CallerGone):
    """The caller's side stopped taking what we send, its connection still open: lost, not hung up (the call's
    outcome is ``caller_lost``, as for a caller gone silent)."""


def first_of(group: BaseExceptionGroup[E], kind: type[E]) -> E:
    """The first leaf of an ``except*`` group (a ``TaskGroup`` may nest them): the failure a call reports."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf
