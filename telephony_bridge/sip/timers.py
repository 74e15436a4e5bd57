"""Session timers, the minimum a UAS owes (spec §9; RFC 4028 §9).

``negotiate_session_timer`` reads an INVITE's ``Session-Expires``/``Min-SE``/``Supported`` and says either
``TooSmall`` (answer ``422`` with our ``Min-SE``) or what to put in the ``200``. We prefer ``refresher=uac``;
when a proxy inserted the header (no ``Supported: timer``), or the UAC asks for ``refresher=uas``, the UAS must
refresh: we do not send refreshes yet, and so do not end such a call on the timer (``sip/server.py``).
``expiry_s`` is when the non-refresher sends BYE without a refresh: the interval minus min(32 s, interval/3).
"""

from __future__ import annotations

from dataclasses import dataclass

from telephony_bridge.sip.address import parse_params
from telephony_bridge.sip.message import Headers

MIN_SE_FLOOR_S = 90


@dataclass(frozen=True, slots=True)
class TooSmall:
    min_se_s: int


@dataclass(frozen=True, slots=True)
class SessionTimer:
    interval_s: int
    refresher: str  # "uac" or "uas"
    require: bool  # put "Require: timer" in the 200

    def header(self) -> str:
        return f"{self.interval_s};refresher={self.refresher}"

    @property
    def expiry_s(self) -> float:
        """Seconds after a refresh by which the next one must arrive before the non-refresher ends the call."""
        return self.interval_s - min(32.0, self.interval_s / 3)

    @property
    def refresh_s(self) -> float:
        """When the refresher (us, if ``uas``) sends its refresh: half the interval."""
        return self.interval_s / 2


def _seconds(value: str | None) -> tuple[int | None, dict[str, str]]:
    if not value:
        return None, {}
    number, _, params = value.partition(";")
    number = number.strip()
    return (int(number) if number.isdigit() else None), parse_params(params)


def negotiate_session_timer(headers: Headers, *, min_se_s: int) -> SessionTimer | TooSmall | None:
    """None when the request asks for no session timer."""
    expires, params = _seconds(headers.get("Session-Expires"))
    if expires is None:
        return None
    if expires < min_se_s:
        return TooSmall(min_se_s)
    peer_min, _ = _seconds(headers.get("Min-SE"))
    supported = "timer" in headers.tokens("Supported") or "timer" in headers.tokens("Require")
    if not supported:
        return SessionTimer(max(expires, peer_min or 0, MIN_SE_FLOOR_S), "uas", require=False)
    refresher = params.get("refresher", "uac").lower()
    if refresher not in ("uac", "uas"):
        refresher = "uac"
    return SessionTimer(max(expires, MIN_SE_FLOOR_S), refresher, require=True)
