"""A local stand-in for the Savants Voice API, faithful to its documentation (sections cited as §N).

Same token endpoint, same in-band JWT handshake, same PCM format, same per-device limits, plus voices to talk
to and a stats endpoint that reports what a client did wrong. See docs/emulator.md.
"""

from telephony_bridge.tools.emulator.app import STATS_PATH, create_emulator_app
from telephony_bridge.tools.emulator.config import EmulatorConfig
from telephony_bridge.tools.emulator.protocol import CloseCode, WsErrorCode
from telephony_bridge.tools.emulator.state import EmulatorState

__all__ = ["STATS_PATH", "CloseCode", "EmulatorConfig", "EmulatorState", "WsErrorCode", "create_emulator_app"]
