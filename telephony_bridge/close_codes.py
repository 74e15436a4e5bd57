"""Which WebSocket close codes may go on the wire (RFC 6455 §7.4.1): what we answer a peer's close with.

picows accepts any code it has a name for, 1006 included, and its default is 0; neither may be sent.
"""

from __future__ import annotations

NORMAL = 1000
_NEVER_SENT = frozenset({1004, 1005, 1006, 1015})  # reserved, or only ever reported locally


def echo_code(received: int) -> int:
    """The code to echo a peer's close with: its own when that may be sent, else 1000."""
    return received if 1000 <= received <= 4999 and received not in _NEVER_SENT else NORMAL
