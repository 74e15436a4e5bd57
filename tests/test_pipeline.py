"""CallerToAi: the caller's μ-law in, whole 640-byte frames out, however the payloads are cut."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.audio.codec import SAVANTS_FRAME_BYTES, TWILIO_FRAME_BYTES, pcm16_to_ulaw
from telephony_bridge.audio.pipeline import CallerToAi
from tests.test_vad import speech_8k

ULAW = pcm16_to_ulaw(speech_8k()[: 50 * TWILIO_FRAME_BYTES])  # 1 s


def frames_of(sizes: list[int], compiled: bool | None = None) -> list[bytes]:
    pipeline, frames, start = CallerToAi(compiled=compiled), [], 0
    for size in sizes:
        frames += pipeline.push(None, ULAW[start : start + size])[1]
        start += size
    return frames + pipeline.push(None, ULAW[start:])[1]


def test_pipeline_a_20_ms_payload_gives_its_frame_at_once() -> None:
    pipeline = CallerToAi()
    for i in range(50):
        placed, frames = pipeline.push(i * 20, ULAW[i * TWILIO_FRAME_BYTES : (i + 1) * TWILIO_FRAME_BYTES])
        assert (len(placed), [len(f) for f in frames]) == (TWILIO_FRAME_BYTES, [SAVANTS_FRAME_BYTES])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=40))
def test_pipeline_any_cutting_gives_the_same_frames(sizes: list[int]) -> None:
    """Payloads of any length, 20 ms ones among them, carry a part-frame over: the frames are those of 20 ms
    payloads, in order, with either kernel."""
    sizes = [TWILIO_FRAME_BYTES if size % 3 == 0 else size for size in sizes]  # 20 ms after a part-frame too
    want = frames_of([TWILIO_FRAME_BYTES] * 50)
    assert b"".join(want) == b"".join(frames_of([len(ULAW)]))
    for compiled in (None, False):
        got = frames_of(sizes, compiled)
        assert {len(f) for f in got} == {SAVANTS_FRAME_BYTES} and got == want
