"""Keypad digits from the caller: counted always, logged only as far as the settings allow.

Callers type PINs and card numbers, so by default no digit reaches a log: ``dtmf_action: log`` writes one
INFO line per key press with the running count, and only ``log_digits: true`` adds the digit itself.
Digits are not kept in memory either, unless they may be logged.
"""

from __future__ import annotations

import logging

from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.settings import TwilioSettings

log = logging.getLogger(__name__)


class DtmfLog:
    def __init__(self, settings: TwilioSettings, metrics: Metrics) -> None:
        self._log = settings.dtmf_action == "log"
        self._digits = settings.log_digits
        self._metrics = metrics
        self.count = 0

    def record(self, digit: str) -> None:
        self.count += 1
        self._metrics.dtmf.inc()
        if not self._log:
            return
        if self._digits:
            log.info("dtmf digit %s (%d in this call)", digit, self.count)
        else:
            log.info("dtmf key pressed (%d in this call)", self.count)
