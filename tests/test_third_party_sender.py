"""A public third-party Twilio Media Streams simulator against the bridge: ``streamdouble`` from PyPI.

It is a faithful Twilio (string numbers, per-track timestamps, mark echoes after playback) that also models a bad
mobile line (frames Twilio never had: the timestamp jumps). Its own protocol checker reads what the bridge sends,
so these tests are a second opinion, not ours, that our outbound messages are Twilio's. It connects without an
``X-Twilio-Signature`` header, so the bridge runs unsigned (``twilio.allow_unsigned``) but still requires the
stream token, which the test carries from an unsigned webhook into ``customParameters``.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from streamdouble.chaos import Impairments
from streamdouble.protocol import StreamIdentity
from streamdouble.session import Session, SessionConfig

from telephony_bridge.audio.codec import pcm16_to_ulaw
from telephony_bridge.serving import ServerThread
from tests.support import bridge_settings, call_form, emulator_stats, leases, post_voice, stream_parameters, wait_until
from tests.test_vad import speech_8k

SPEECH_FRAMES = [chunk for i in range(0, 2 * 8000, 160) if len(chunk := pcm16_to_ulaw(speech_8k())[i : i + 160]) == 160]


@pytest.mark.parametrize("loss", [0.0, 0.1])
async def test_streamdouble_call_reaches_the_ai_and_hears_the_echo(
    emulator: ServerThread, start_bridge: Callable[..., ServerThread], loss: float
) -> None:
    bridge = start_bridge(bridge_settings(emulator, **{"twilio.auth_token": "", "twilio.allow_unsigned": True}))
    form = call_form()
    params = stream_parameters(post_voice(bridge, form, signature=None))
    config = SessionConfig(
        custom_parameters=params, impairments=Impairments(loss=loss), chaos_seed=7, response_timeout_s=5.0
    )
    session = Session(
        bridge.ws_url + "/media-stream", SPEECH_FRAMES, config=config, identity=StreamIdentity(call_sid=form["CallSid"])
    )
    result = await session.run()
    assert result.violations == [] and result.frames_sent + result.frames_dropped == len(SPEECH_FRAMES)
    assert result.audio_received and result.marks_echoed  # the echo came back, and its marks were honoured
    lost = result.frames_dropped
    assert (lost > 0) == (loss > 0)
    wait_until(lambda: leases(bridge) == 0 and emulator_stats(emulator)["sessions_active"] == 0, what="release")
    # Lost frames become silence on the AI's timeline (Twilio's timestamp says where the audio went missing):
    # the AI hears the whole 2 s, up to the last frame that was sent.
    heard_at_ai = emulator_stats(emulator)["audio_bytes_in"] // 640
    assert len(SPEECH_FRAMES) - lost < heard_at_ai <= len(SPEECH_FRAMES) or lost == 0
    assert heard_at_ai >= len(SPEECH_FRAMES) - 5  # at most a lost tail of a few frames goes unfilled
    metrics = httpx.get(bridge.http_url + "/metrics", timeout=5).text
    assert 'reason="late"' not in metrics and "bridge_client_quirks_total{" not in metrics  # Twilio-shaped
