"""The one exception tree of telephony-bridge.

    BridgeError
    ├── ConfigError            a setting is wrong; the message names the key, the value and what is allowed
    ├── ProtocolError          a peer broke its protocol (we did not)
    │   ├── TwilioProtocolError
    │   └── SavantsProtocolError
    ├── SavantsError           the Savants service refused or failed
    │   ├── TokenError         the token endpoint said no (code, status, retry_after_s)
    │   └── SessionError       /voice-stream refused the session (code from its error message)
    ├── AdmissionError         no device can take this call now
    └── SignatureError         a Twilio request is not signed with our auth token

Messages say what was expected and what arrived, so a log line is enough to act on. Secrets never appear
in them.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(BridgeError):
    """A configuration value is wrong; raised at start-up, never mid-call."""


class ProtocolError(BridgeError):
    """A peer sent something its protocol does not allow."""


class TwilioProtocolError(ProtocolError):
    """Twilio (or something pretending to be Twilio) broke the Media Streams protocol."""


class SavantsProtocolError(ProtocolError):
    """The Savants server broke the Voice API protocol."""


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
    """The voice-stream socket refused or dropped the session."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class AdmissionError(BridgeError):
    """No device of the pool can take another call now."""


class SignatureError(BridgeError):
    """A request claims to come from Twilio but its X-Twilio-Signature does not match."""
