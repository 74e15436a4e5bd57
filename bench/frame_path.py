"""What our own code costs per 20 ms of a call, each way, against the naive bridge's per-frame work.

    .venv/bin/python bench/frame_path.py [--frames 3000] [--repeat 5] [--calls 250 --frames 100000]

No sockets: the per-frame work between them, on speech-like audio, best of ``--repeat`` runs. Caller → AI: a
Twilio media message read (``tw.media_audio``, the leg's direct path), placed on the timeline, decoded,
resampled and queued for the AI (``Inbound.push``, with and without the barge-in detector's VAD); and the whole
of it from the leg's tap through the call core's handler to a Savants connection, by the Python path and by the
compiled one (``telephony_bridge/_taps.c``, ``telephony_bridge/_caller_path.c``). AI → caller:
a 20 ms PCM frame from the AI converted to μ-law, either as each frame comes (how the bridge did it before) or
per batch when it goes out (``FrameBuffer``'s lazy conversion, two frames a message by default), and the
outbound media message built; and the whole of a real-time AI's frame through ``Outbound`` mid-spurt (queued,
paced, converted, sent to a Twilio leg from the push, accounted for), by ``push_pcm`` (Python) and by its
compiled path (``telephony_bridge/_ai_path.c``). The naive rows are ``bench/naive_bridge.py``'s steps (stdlib
``json``, ``audioop`` μ-law and ``ratecv``). The WebSocket and event loop costs that dominate a call are not here:
``bench/capacity.py`` measures the whole.

``--calls N`` adds the two compiled whole paths over N calls at once, each frame's turn going round them all as
an event loop carrying them takes them, so that each call's state has left the CPU's nearest caches by its next
frame (the calls are built, sharing one ``Metrics`` as a process's do, before the clock starts): on this VM
that cost about what one call alone costs at 250 calls (docs/performance.md, 6 Dec). Everything runs with the
bridge's GC settings (``ops.gc_tuning``).

The "ours" rows run the audio kernels ``--kernels`` names (``audio.kernels``: auto is the compiled extension if
built); the "conversion alone" rows run each kind in turn, so the two are compared in the same run. The "read
alone" rows compare the media message read (msgspec) with the orjson path it replaced, on the same messages.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from picows import WSMsgType
from picows.picows import _make_test_ws_frame

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # the stdlib module up to 3.12; the audioop-lts package on 3.13+

from telephony_bridge.audio.codec import pcm16_to_ulaw
from telephony_bridge.audio.kernels import CHOICES, EXTENSION, use_compiled
from telephony_bridge.audio.pipeline import AiToCaller, CallerToAi, FrameBuffer
from telephony_bridge.clock import FakeClock, SystemClock
from telephony_bridge.inbound import CallerPath, Inbound
from telephony_bridge.ops.gc_tuning import tune_gc
from telephony_bridge.ops.metrics import Metrics
from telephony_bridge.outbound import AiAudioPath, Outbound
from telephony_bridge.settings import AudioSettings, BargeInSettings, TwilioSettings
from telephony_bridge.twilio import protocol as tw
from telephony_bridge.twilio.leg import MediaTap, TwilioLeg
from telephony_bridge.twilio.outbound_messages import MediaMessages
from telephony_bridge.twilio.stream_socket import StreamSocket

STREAM_SID = "MZ" + "0" * 32


class NullSocket:
    """A media stream's socket as the leg taps it (``StreamSocket.tap_text``): messages come from the bench."""

    def __init__(self) -> None:
        self.tap: Callable[[bytes], bool] | None = None

    def tap_text(self, tap: Callable[[bytes], bool] | None) -> None:
        self.tap = tap


class NullSavants:
    """A Savants connection that takes every message at once (``can_send_now``) and sends it nowhere."""

    def can_send_now(self) -> bool:
        return True

    def send_audio_nowait(self, _pcm: bytes) -> None:
        pass


class NullTransport:
    """picows' transport as ``StreamSocket`` sends on it: nothing goes anywhere."""

    is_close_frame_sent = False

    def send(self, _kind: object, _data: bytes) -> None:
        pass


def speech_like(samples: int, seed: int = 1) -> np.ndarray:
    """A tone under noise with a syllable-rate envelope: enough like speech for the VAD to say yes and no."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t / 8000)
    return np.clip(envelope * 6000 * np.sin(2 * np.pi * 300 * t / 8000) + rng.normal(0, 800, samples), -32768, 32767)


@dataclass
class Untimed:
    """A row whose set-up is not timed: ``prepare`` builds, for each run, what ``run`` then takes through ``frames``
    frames (the calls of the ``--calls`` rows: building hundreds of calls would otherwise weigh on each frame)."""

    prepare: Callable[[], Callable[[], None]]
    frames: int


Row = Callable[[], None] | Untimed
Call = TypeVar("Call")


def taking_turns(
    build: Callable[[FakeClock, Metrics], tuple[Callable[[bytes], object], Call]],
    calls: int,
    items: list[bytes],
    done: Callable[[Call, int], bool],
) -> Untimed:
    """``calls`` calls from ``build`` (what takes each item, and the call's state), each item's turn going round them
    all with 20 ms of the clock a round, as a loop carrying them takes them. They are built before the clock starts
    and share one ``Metrics``, as a process's calls do; ``done(call, rounds)`` checks each did its work."""
    rounds = len(items) // calls

    def prepare() -> Callable[[], None]:
        clock, metrics = FakeClock(), Metrics()
        built = [build(clock, metrics) for _ in range(calls)]

        def run() -> None:
            for item in items[:rounds]:
                for take, _ in built:
                    take(item)
                clock.advance(0.02)
            assert all(done(call, rounds) for _, call in built)

        return run

    return Untimed(prepare, rounds * calls)


def on_build(build: str | None, run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the compiled filters' ``build`` running (None: as configured), the choice restored after."""
    if build is None:
        return run

    def on() -> None:
        assert EXTENSION is not None
        before = EXTENSION.isa()
        EXTENSION.isa(build)
        try:
            run()
        finally:
            EXTENSION.isa(before)

    return on


def best_us(row: Row, frames: int, repeat: int) -> float:
    """µs per frame, the best of ``repeat`` runs: ``frames`` frames a run, or an ``Untimed`` row's own."""
    times = []
    for _ in range(repeat):
        run = row.prepare() if isinstance(row, Untimed) else row
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / (row.frames if isinstance(row, Untimed) else frames) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kernels", choices=CHOICES, default="auto", help="audio.kernels for the 'ours' rows")
    parser.add_argument(
        "--calls",
        type=int,
        default=1,
        help="also the compiled paths over this many calls at once, each frame's turn going round them (their "
        "state cold by each call's next frame, as in a loop carrying them; --frames in all, shared out)",
    )
    args = parser.parse_args()
    if not 1 <= args.calls <= args.frames:
        parser.error(f"--calls {args.calls} must be at least 1 and at most --frames ({args.frames})")
    tune_gc()  # the bridge's own settings (cli.py), as it runs its calls
    ours_compiled = use_compiled(args.kernels)
    kernels = f"compiled, {EXTENSION.isa()} build" if ours_compiled and EXTENSION is not None else "numpy"
    audio = AudioSettings(kernels=args.kernels)
    n = args.frames
    ulaw = pcm16_to_ulaw(speech_like(160 * n).astype(np.int16))
    messages = [
        tw.Media(STREAM_SID, ulaw[i * 160 : (i + 1) * 160], i * 20, chunk=i + 1, sequence_number=i + 2).to_json()
        for i in range(n)
    ]
    frames = [text.encode() for text in messages]  # as the leg's socket hands them over
    ws_frames = [_make_test_ws_frame(WSMsgType.TEXT, data, True, False) for data in frames]  # as picows reads them
    ai_pcm = (speech_like(320 * n, seed=2)).astype("<i2").tobytes()
    ai_frames = [ai_pcm[i * 640 : (i + 1) * 640] for i in range(n)]

    def caller_to_ai(barge_in: bool) -> Callable[[], None]:
        def run() -> None:
            inbound = Inbound(audio, BargeInSettings(enabled=barge_in), Metrics(), SystemClock())
            queue = inbound._queue  # emptied as the AI side would, without a socket
            for i, text in enumerate(messages):
                read = tw.media_audio(text)  # what the Twilio leg's direct path reads
                assert read is not None
                inbound.push(read[1], read[0], 1000.0 + i * 0.02, None)
                queue.clear()

        return run

    def leg_to_ai(compiled: bool, calls: int = 1) -> Untimed:
        """A caller's media messages as the socket hands them to a Twilio leg (its tap), through the call core's
        handler (``Inbound.audio_handler``, as ``Call`` wires it) to a Savants connection that takes every 40 ms
        message at once: the Python path (``TwilioLeg._tapped``, ``Call._caller_audio``) or the compiled one
        (``_taps.MediaTap``, ``_caller_path.CallerPath``). ``calls``: that many calls, each frame's turn going
        round them all (``taking_turns``)."""

        def one_call(clock: FakeClock, metrics: Metrics) -> tuple[Callable[[bytes], object], Inbound]:
            socket = NullSocket()
            leg = TwilioLeg(socket, TwilioSettings(), metrics, clock, compiled=compiled)
            inbound = Inbound(audio, BargeInSettings(), metrics, clock)

            def caller_audio(ulaw: bytes, timestamp_ms: int | None) -> None:  # Call._caller_audio
                now = clock.monotonic()
                inbound.push(timestamp_ms, ulaw, now, None)

            handler = inbound.audio_handler(
                caller_audio, clock, lambda now: None, lambda events: None, compiled=compiled
            )
            leg.deliver_audio_to(handler)
            inbound._parked, inbound._conn = True, NullSavants()  # as ``Inbound.run`` leaves them between frames
            assert socket.tap is not None
            return socket.tap, inbound

        # every whole message went out inside its frame's call
        return taking_turns(
            one_call, calls, frames, lambda inbound, rounds: inbound.frames_to_ai == rounds - rounds % 2
        )

    def listener_alone() -> None:
        """picows' callback for each of a caller's media messages (``StreamSocket.on_ws_frame``), its tap taking
        each at once and doing nothing: the listener's own Python, which a Cython listener would save."""
        socket = StreamSocket(lambda _socket: None)
        transport = NullTransport()
        socket.on_ws_connected(transport)
        tapped: list[bytes] = []
        socket.tap_text(lambda data: tapped.append(data) is None)  # takes it: True
        on_frame = socket.on_ws_frame
        for frame in ws_frames:
            on_frame(transport, frame)
        assert len(tapped) == n and not socket._inbox  # every message went to the tap, none queued

    def naive_caller_to_ai() -> None:
        state = None
        for text in messages:
            data = json.loads(text)
            pcm8k = audioop.ulaw2lin(base64.b64decode(data["media"]["payload"]), 2)
            _, state = audioop.ratecv(pcm8k, 2, 1, 8000, 16000, state)

    def media_read(read: Callable[[bytes], tuple[bytes, int] | None]) -> Callable[[], None]:
        def run() -> None:
            for data in frames:
                read(data)

        return run

    def conversion_only(compiled: bool) -> Callable[[], None]:
        payloads = [ulaw[i * 160 : (i + 1) * 160] for i in range(n)]

        def run() -> None:
            pipeline = CallerToAi(compiled=compiled)
            for i, payload in enumerate(payloads):
                pipeline.push(i * 20, payload)

        return run

    def ai_to_caller(batch: int) -> Callable[[], None]:
        def run() -> None:
            buffer = FrameBuffer(compiled=ours_compiled)
            media = MediaMessages(STREAM_SID)  # the leg's, built once a stream
            for i, frame in enumerate(ai_frames):
                buffer.append_pcm(frame)
                if (i + 1) % batch == 0:
                    media.encode(buffer.take(batch))

        return run

    def per_frame_ai_to_caller() -> None:
        convert = AiToCaller(compiled=ours_compiled)
        media = MediaMessages(STREAM_SID)
        pending = bytearray()
        for i, frame in enumerate(ai_frames):
            pending += convert.push(frame)
            if (i + 1) % 2 == 0:
                media.encode(bytes(pending))
                pending.clear()

    def convert_only(compiled: bool) -> Callable[[], None]:
        def run() -> None:
            buffer = FrameBuffer(compiled=compiled)
            for i, frame in enumerate(ai_frames):
                buffer.append_pcm(frame)
                if i % 2:
                    buffer.take(2)

        return run

    def outbound_ai_to_caller(compiled: bool, calls: int = 1) -> Untimed:
        """A real-time AI's frames mid-spurt, through ``Outbound`` as ``AiSide`` hands them over (``audio_handler``):
        each is due as it arrives and goes out inside the push, to a Twilio leg on a ``StreamSocket`` whose
        transport drops what it is given. ``calls``: as ``leg_to_ai``'s."""

        def one_call(clock: FakeClock, metrics: Metrics) -> tuple[Callable[[bytes], None], Outbound]:
            socket = StreamSocket(lambda _socket: None)
            socket.on_ws_connected(NullTransport())
            leg = TwilioLeg(socket, TwilioSettings(), metrics, clock)
            leg.stream_id = STREAM_SID
            outbound = Outbound(audio, clock, leg)
            # As the pacer leaves it mid-spurt: asleep until the AI's pause, lone frames going at once (a hold
            # ended alone), Twilio 60 ms ahead; no marks (the pacer's, which is not running here).
            outbound._parked, outbound._parked_until, outbound._holds_pay = True, float("inf"), False
            outbound._mark_every_ms = 10**9
            outbound._pacer._play_end = clock.monotonic() + 0.06
            return outbound.audio_handler(compiled=compiled), outbound

        # every frame went out inside its push
        return taking_turns(
            one_call, calls, ai_frames, lambda outbound, rounds: outbound.playback.sent_ms == 20 * rounds
        )

    def naive_ai_to_caller() -> None:
        state = None
        for frame in ai_frames:
            pcm8k, state = audioop.ratecv(frame, 2, 1, 16000, 8000, state)
            payload = base64.b64encode(audioop.lin2ulaw(pcm8k, 2)).decode()
            json.dumps({"event": "media", "streamSid": STREAM_SID, "media": {"payload": payload}})

    rows: list[tuple[str, Row]] = [
        (f"caller → AI, ours (parse, timeline, decode, 75-tap FIR up, queue, VAD; {kernels})", caller_to_ai(True)),
        ("caller → AI, ours without barge-in (no VAD)", caller_to_ai(False)),
        (
            "caller → AI, a Twilio leg's media through the call core (Python: tap, timeline, FIR, VAD, send)",
            leg_to_ai(False),
        ),
    ]
    if ours_compiled and CallerPath is not None and MediaTap is not None:
        rows.append(("caller → AI, the same compiled (_taps.MediaTap, _caller_path: two C calls)", leg_to_ai(True)))
    rows += [
        (
            "caller → AI, the media stream's listener callback alone (StreamSocket.on_ws_frame, a tap doing nothing)",
            listener_alone,
        ),
        ("caller → AI, naive (json, ulaw2lin, ratecv; no timeline, no VAD)", naive_caller_to_ai),
        ("caller → AI, media message read alone (tw.media_audio: msgspec)", media_read(tw.media_audio)),
        ("caller → AI, media message read alone, orjson and dict checks (before)", media_read(tw._media_audio_general)),
        (f"AI → caller, ours, converted per 40 ms batch (FIR down, μ-law, message; {kernels})", ai_to_caller(2)),
        ("AI → caller, ours, converted as each frame comes (before)", per_frame_ai_to_caller),
        (
            "AI → caller, Outbound.push_pcm to a Twilio leg (Python glue: pacing, send, accounting)",
            outbound_ai_to_caller(False),
        ),
    ]
    if ours_compiled and AiAudioPath is not None:
        rows.append(("AI → caller, compiled path (_ai_path: the same, one C call)", outbound_ai_to_caller(True)))
    interleaved = ours_compiled and CallerPath is not None and MediaTap is not None and AiAudioPath is not None
    if args.calls > 1 and not interleaved:
        print("(--calls: the compiled frame path is not built here, so its rows over several calls are left out)")
    if args.calls > 1 and interleaved:
        many = f"{args.calls} calls, each frame's turn going round them"
        rows.append((f"caller → AI, compiled, {many}", leg_to_ai(True, args.calls)))
        rows.append((f"AI → caller, compiled, {many}", outbound_ai_to_caller(True, args.calls)))
    rows += [
        ("AI → caller, naive (ratecv, lin2ulaw, base64, json per frame)", naive_ai_to_caller),
    ]
    # The audio kernels alone, each way, compiled (if built: the build of its filters configure() chose for this CPU,
    # and the baseline) and numpy: the same bytes, at what cost.
    kinds: list[tuple[str, bool, str | None]] = []
    if EXTENSION is not None:
        chosen = EXTENSION.isa()
        builds = [chosen] if chosen == "baseline" else [chosen, "baseline"]
        kinds += [(f"compiled, {build} build", True, build) for build in builds]
    kinds.append(("numpy", False, None))
    for kind, compiled, build in kinds:
        rows.append(
            (
                f"caller → AI conversion alone (timeline, decode, FIR up, frames; {kind})",
                on_build(build, conversion_only(compiled)),
            )
        )
        rows.append(
            (
                f"AI → caller conversion alone, per 40 ms batch (FIR down, μ-law; {kind})",
                on_build(build, convert_only(compiled)),
            )
        )
    print(f"per 20 ms frame, best of {args.repeat} runs of {n} frames; audio kernels: {kernels}")
    if EXTENSION is None:
        print("(the compiled kernels are not built here: numpy rows only)")
    for label, run in rows:
        print(f"{best_us(run, n, args.repeat):6.1f} µs  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
