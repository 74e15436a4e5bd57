"""What paired reads (``twilio.paired_reads``) do to a media message's arrival, on loopback, by sender.

    .venv/bin/python bench/paired_reads.py                 # 150 messages of Twilio's size, 20 ms apart, each way
    .venv/bin/python bench/paired_reads.py --messages 500

A sender thread writes Twilio-sized media messages (373 bytes of text in an 8-byte frame header) every 20 ms over
a real TCP connection; the receiver waits on epoll, as uvloop does, with the receive low-water mark the bridge
sets (``read_pairs``: one and a half messages), and reads. Each message carries its send time, so the receiver
prints each message's delay (p50, p90, p99, max) for:

- ``unpaired``: the mark at one byte (the baseline: every message read as it comes);
- ``paired, TCP_NODELAY``: the first of each pair waits for the second (20 ms), the second comes at once;
- ``paired, Nagle``: a sender that leaves Nagle's algorithm on waits for our ACK of the held message, which the
  kernel sends only on its delayed-ACK timer (~40 ms): what ``twilio.paired_reads`` costs in front of one;
- ``paired, Nagle, TCP_QUICKACK``: the option set after each read (does not restore quick ACKs: no guard);
- ``paired, Nagle, talking back``: the receiver also sends a message every 20 ms (the AI talking), whose
  segments carry the ACKs.
"""

from __future__ import annotations

import argparse
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telephony_bridge.twilio.read_pairs import FRAME_HEADER_BYTES, low_water_mark

TWILIO_MEDIA_BYTES = 373  # tests/data/twilio/media.json
MESSAGE = TWILIO_MEDIA_BYTES + FRAME_HEADER_BYTES
LOWAT = low_water_mark(TWILIO_MEDIA_BYTES)  # as the bridge sets it for these messages
INTERVAL_S = 0.02


def delays(
    messages: int, *, paired: bool, nodelay: bool, quickack: bool = False, talk_back: bool = False
) -> list[float]:
    """Each message's delay in ms, from its send to the read that took it."""
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as sender:
        sender.connect(listener.getsockname())
        receiver, _ = listener.accept()
        with receiver, select.epoll() as epoll:
            sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, LOWAT if paired else 1)
            done = threading.Event()

            def send() -> None:
                start = time.monotonic()
                for i in range(messages):
                    time.sleep(max(0.0, start + i * INTERVAL_S - time.monotonic()))
                    sender.sendall(struct.pack("d", time.monotonic()).ljust(MESSAGE, b"m"))

            def answer() -> None:  # the AI's audio to the caller, 20 ms apart
                while not done.wait(INTERVAL_S):
                    receiver.sendall(b"a" * 500)

            sending = threading.Thread(target=send)
            threads = [sending] + [threading.Thread(target=answer)] * talk_back
            for thread in threads:
                thread.start()
            epoll.register(receiver.fileno(), select.EPOLLIN)
            buffer, out = b"", []
            deadline = time.monotonic() + messages * INTERVAL_S + 5.0
            while len(out) < messages and time.monotonic() < deadline:
                if not epoll.poll(0.1):
                    if not sending.is_alive():
                        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    continue
                data = receiver.recv(65536)
                now = time.monotonic()
                if quickack:
                    receiver.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                buffer += data
                while len(buffer) >= MESSAGE:
                    out.append(1e3 * (now - struct.unpack("d", buffer[:8])[0]))
                    buffer = buffer[MESSAGE:]
            done.set()
            for thread in threads:
                thread.join()
    return out


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {at(0.5):5.1f}  p90 {at(0.9):5.1f}  p99 {at(0.99):5.1f}  max {ordered[-1]:5.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=150, help="messages in each run (20 ms apart)")
    args = parser.parse_args()
    print(
        f"{MESSAGE}-byte messages every {INTERVAL_S * 1e3:.0f} ms, the mark at {LOWAT} bytes; delay from send to read"
    )
    runs = {
        "unpaired (baseline)": {"paired": False, "nodelay": True},
        "paired, TCP_NODELAY": {"paired": True, "nodelay": True},
        "paired, Nagle": {"paired": True, "nodelay": False},
        "paired, Nagle, TCP_QUICKACK": {"paired": True, "nodelay": False, "quickack": True},
        "paired, Nagle, talking back": {"paired": True, "nodelay": False, "talk_back": True},
    }
    for name, options in runs.items():
        values = delays(args.messages, **options)
        print(f"{name:30s} {summary(values)}  ({len(values)} of {args.messages} messages)")


if __name__ == "__main__":
    main()
