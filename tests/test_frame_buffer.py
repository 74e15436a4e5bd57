"""The AI's audio queued as PCM and converted only when taken: the same μ-law, byte for byte, as converting
each chunk as it came, and lengths that are right before any conversion."""

from __future__ import annotations

import random

import numpy as np

from telephony_bridge.audio.codec import TWILIO_FRAME_BYTES, ULAW_SILENCE
from telephony_bridge.audio.pipeline import AiToCaller, FrameBuffer


def speech_like_pcm(seconds: float, seed: int = 3) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    signal = 8000 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 1500, len(t))
    return np.clip(signal, -32768, 32767).astype("<i2").tobytes()


def test_lazy_conversion_matches_converting_each_chunk_as_it_came() -> None:
    pcm = speech_like_pcm(2.0)
    rng = random.Random(7)
    eager, lazy = AiToCaller(), FrameBuffer()
    expected, got = bytearray(), bytearray()
    offset = 0
    while offset < len(pcm):
        chunk = pcm[offset : offset + rng.randint(1, 1500)]  # odd sizes too: a sample split across chunks
        offset += len(chunk)
        expected += eager.push(chunk)
        lazy.append_pcm(chunk)
        assert len(lazy) == len(expected) - len(got)  # known without converting
        if rng.random() < 0.3 and lazy.frames:
            got += lazy.take(rng.randint(1, lazy.frames))
    got += lazy.take(lazy.frames)
    assert bytes(got) == bytes(expected[: len(got)])
    assert len(expected) - len(got) < TWILIO_FRAME_BYTES  # only a part frame is left


def test_mu_law_appended_after_pcm_goes_after_it_and_padding_completes_the_last_frame() -> None:
    buffer = FrameBuffer()
    buffer.append_pcm(bytes(480))  # 15 ms of PCM silence at 16 kHz: 120 μ-law bytes
    buffer.append(b"\x01" * 100)
    assert len(buffer) == 220 and buffer.frames == 1
    buffer.pad_to_frame()
    out = buffer.take(2)
    assert out[:120] == bytes([ULAW_SILENCE]) * 120
    assert out[120:220] == b"\x01" * 100 and out[220:] == bytes([ULAW_SILENCE]) * 100
    assert len(buffer) == 0


def test_cleared_and_dropped_audio_keep_the_converter_in_step() -> None:
    """Audio dropped unheard (a clear, a held barge-in) still passes the converter, so what follows is the same
    as if it had been sent: no shifted samples after an odd-sized chunk, no filter restart."""
    pcm = speech_like_pcm(0.5)
    reference = AiToCaller().push(pcm)
    buffer = FrameBuffer()
    buffer.append_pcm(pcm[:1001])
    assert buffer.clear() == 1001 // 4
    assert buffer.drop_pcm(pcm[1001:3001]) == 3000 // 4 - 1001 // 4
    buffer.append_pcm(pcm[3001:])
    tail = buffer.take(buffer.frames)
    assert tail == reference[750 : 750 + len(tail)]


def test_size_is_what_is_queued_after_any_mix_of_operations() -> None:
    """``size`` (what the pacer reads several times a frame) is kept by every method rather than computed on
    demand: after any sequence of operations it is exactly what converting and padding the queue hands out."""
    pcm = speech_like_pcm(1.0)
    rng = random.Random(11)
    for compiled in (True, False):
        buffer, offset = FrameBuffer(compiled=compiled), 0
        for _ in range(400):
            op = rng.choice(["pcm", "pcm", "pcm", "ulaw", "take", "pad", "clear", "drop", "drain"])
            chunk = pcm[offset % len(pcm) :][: rng.randint(1, 900)]  # odd sizes too
            offset += len(chunk)
            if op == "pcm":
                buffer.append_pcm(chunk)
            elif op == "ulaw":
                buffer.append(b"\x42" * rng.randint(1, 300))
            elif op == "take" and buffer.frames:
                before, n = buffer.size, rng.randint(1, buffer.frames)
                assert len(buffer.take(n)) == n * TWILIO_FRAME_BYTES
                assert buffer.size == before - n * TWILIO_FRAME_BYTES
            elif op == "pad":
                before = buffer.size
                buffer.pad_to_frame()
                assert buffer.size == -(-before // TWILIO_FRAME_BYTES) * TWILIO_FRAME_BYTES
            elif op == "clear":
                buffer.clear()
            elif op == "drop":
                buffer.drop_pcm(chunk)
            elif op == "drain":  # everything the size promised is there: converted, padded and taken
                promised = -(-buffer.size // TWILIO_FRAME_BYTES) * TWILIO_FRAME_BYTES
                buffer.pad_to_frame()
                assert len(buffer.take(buffer.frames)) == promised
            if op in ("clear", "drop", "drain"):
                assert buffer.size == 0
            assert len(buffer) == buffer.size and buffer.frames == buffer.size // TWILIO_FRAME_BYTES


def test_taking_each_frame_as_it_comes_matches_converting_the_whole() -> None:
    """A real-time AI's frame taken whole as it arrives (the converter's output handed straight out), with a
    split sample and a part frame now and then (through the queue): the same bytes as one conversion."""
    pcm = speech_like_pcm(1.0)
    sizes = [640] * 20 + [641, 639, 640, 320, 960] + [640] * 20
    buffer, got = FrameBuffer(), bytearray()
    offset = 0
    for size in sizes:
        buffer.append_pcm(pcm[offset : offset + size])
        offset += size
        got += buffer.take(buffer.frames)
        assert len(buffer) == len(pcm[:offset]) // 4 - len(got)
    assert bytes(got) == AiToCaller().push(pcm[:offset])[: len(got)]


def test_pcm_queued_from_a_reused_buffer_is_what_it_held_when_queued() -> None:
    """The queue keeps the AI's ``bytes`` without copying them; a ``bytearray`` its owner refills is copied."""
    pcm = speech_like_pcm(0.04)
    reused, buffer = bytearray(pcm), FrameBuffer()
    buffer.append_pcm(reused)
    reused[:] = bytes(len(reused))  # the owner reads the next frame into the same buffer
    assert buffer.take(buffer.frames) == AiToCaller().push(pcm)
