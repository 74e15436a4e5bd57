"""SIP parsing and serialising from literal messages (spec §1, §2): data in, data out."""

from __future__ import annotations

from pathlib import Path

import pytest

from telephony_bridge.sip.address import parse_name_addr, parse_uri, parse_via
from telephony_bridge.sip.message import (
    MAX_MESSAGE_BYTES,
    KeepAlive,
    Malformed,
    Request,
    Response,
    StreamParser,
    parse_datagram,
    split_list,
)

DATA = Path(__file__).parent / "data" / "sip"


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_invite_parses_with_headers_in_order() -> None:
    msg = parse_datagram(load("invite.sip"))
    assert isinstance(msg, Request)
    assert (msg.method, msg.uri) == ("INVITE", "sip:ai@203.0.113.5:5060")
    assert msg.headers.values("Via") == [
        "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK-invite-1;rport",
        "SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bK-upstream",
    ]
    assert msg.headers.values("Record-Route") == [
        "<sip:proxy1.example.net;lr>",
        "<sip:proxy2.example.net;lr>",
        "<sip:proxy3.example.net;lr>",
    ]
    assert msg.cseq == (101, "INVITE")
    assert msg.call_id == "3c2a7b1e@198.51.100.7"
    assert msg.body.startswith(b"v=0\r\n") and msg.body.endswith(b"a=sendrecv\r\n")


def test_compact_forms_folding_and_empty_values() -> None:
    msg = parse_datagram(load("invite_compact_folded.sip"))
    assert isinstance(msg, Request)
    assert msg.call_id == "compact-call@198.51.100.8"
    assert msg.headers.get("From") == "<sip:alice@example.org>;tag=alice-1"
    assert msg.headers.get("to") == "<sip:ai@203.0.113.5>"
    assert msg.headers.get("Supported") == ""  # legal and kept (G10)
    assert msg.headers.values("Supported") == []
    assert msg.headers.get("Subject") == "a folded header value"
    assert msg.headers.get("X-Unknown-Header") == "kept as is"
    assert msg.headers.get("Content-Type") == "application/sdp"
    assert msg.cseq == (7, "INVITE")
    assert len(msg.body) == int(msg.headers.get("Content-Length") or 0)


def test_bare_lf_accepted() -> None:
    msg = parse_datagram(load("options_bare_lf.sip"))
    assert isinstance(msg, Request)
    assert msg.method == "OPTIONS" and msg.headers.get("Max-Forwards") == "70"


def test_short_body_is_malformed_with_request_for_a_400() -> None:
    msg = parse_datagram(load("invite_short_body.sip"))
    assert isinstance(msg, Malformed)
    assert "Content-Length 9999" in msg.reason
    assert msg.request is not None and msg.request.call_id == "short@example.org"


def test_bytes_beyond_content_length_are_dropped_on_udp() -> None:
    data = load("invite.sip") + b"trailing junk"
    msg = parse_datagram(data)
    assert isinstance(msg, Request) and not msg.body.endswith(b"junk")


def test_missing_mandatory_header_is_malformed() -> None:
    msg = parse_datagram(load("bye_no_callid.sip"))
    assert isinstance(msg, Malformed) and "Call-ID" in msg.reason


@pytest.mark.parametrize(
    "data",
    [
        load("garbage.bin"),
        b"HELLO",
        b"INVITE sip:x SIP/3.0\r\n\r\n",
        b"SIP/2.0 abc OK\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nno colon here\r\n\r\n",
        b" folded-first\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nCSeq: x INVITE\r\nVia: a\r\nFrom: a\r\nTo: b\r\nCall-ID: c\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nCSeq: 1 BYE\r\nVia: a\r\nFrom: a\r\nTo: b\r\nCall-ID: c\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\nContent-Length: -1\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
        b"A" * (MAX_MESSAGE_BYTES + 1),
        b"INVITE sip:x SIP/2.0\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
        b"INVITE sip:x SIP/2.0\r\n" + b"X: a\r\n" * 300 + b"\r\n",
    ],
)
def test_garbage_is_a_value_never_an_exception(data: bytes) -> None:
    assert isinstance(parse_datagram(data), Malformed)


@pytest.mark.parametrize("data", [b"\r\n\r\n", b"\r\n", b"\x00\x00\x00\x00"])
def test_udp_keepalives_are_dropped(data: bytes) -> None:
    assert parse_datagram(data) == KeepAlive()


def test_response_round_trip() -> None:
    msg = parse_datagram(b"SIP/2.0 200 OK\r\nCall-ID: x\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(msg, Response) and (msg.status, msg.reason, msg.cseq) == (200, "OK", (2, "BYE"))
    assert parse_datagram(msg.to_bytes()) == msg


def test_serialising_always_writes_content_length() -> None:
    msg = parse_datagram(load("invite_compact_folded.sip"))
    assert isinstance(msg, Request)
    again = parse_datagram(msg.to_bytes())
    assert again == msg
    assert msg.to_bytes().count(b"Content-Length: ") == 1


def test_stream_parser_frames_by_content_length_in_any_chunking() -> None:
    one = load("invite.sip")
    stream = b"\r\n" + one + b"\r\n\r\n" + one
    whole = StreamParser().feed(stream)
    parser = StreamParser()
    pieces = [m for i in range(0, len(stream), 7) for m in parser.feed(stream[i : i + 7])]
    assert whole == pieces
    assert [type(m) for m in whole] == [Request, KeepAlive, Request]
    assert whole[1] == KeepAlive(pong=True)


def test_stream_without_content_length_is_fatal() -> None:
    parser = StreamParser()
    out = parser.feed(b"OPTIONS sip:x SIP/2.0\r\nVia: a\r\n\r\n")
    assert len(out) == 1 and isinstance(out[0], Malformed) and out[0].fatal
    assert parser.feed(load("invite.sip")) == []  # the stream is broken: the driver closes it


def test_stream_huge_content_length_is_fatal() -> None:
    out = StreamParser().feed(b"INVITE sip:x SIP/2.0\r\nContent-Length: 99999999\r\n\r\n")
    assert isinstance(out[0], Malformed) and out[0].fatal


def test_split_list_respects_quotes_and_brackets() -> None:
    assert split_list('"Doe, John" <sip:j@x;a=1,2>;tag=1, <sip:b@y>') == [
        '"Doe, John" <sip:j@x;a=1,2>;tag=1',
        "<sip:b@y>",
    ]


def test_auth_headers_are_never_split() -> None:
    msg = parse_datagram(
        b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\n"
        b'Call-ID: c\r\nCSeq: 1 INVITE\r\nAuthorization: Digest username="u", realm="r"\r\n\r\n'
    )
    assert isinstance(msg, Request)
    assert msg.headers.values("Authorization") == ['Digest username="u", realm="r"']


def test_name_addr_parameters_belong_to_uri_or_header() -> None:
    bracketed = parse_name_addr('"A, B" <sip:a@b;x=1>;tag=9')
    assert bracketed is not None and bracketed.uri == "sip:a@b;x=1" and bracketed.params == {"tag": "9"}
    assert bracketed.display == '"A, B"'
    bare = parse_name_addr("sip:a@b;tag=9")
    assert bare is not None and bare.uri == "sip:a@b" and bare.tag == "9"
    assert parse_name_addr("<sip:a@b") is None


def test_uri_and_via_parsing() -> None:
    uri = parse_uri("sip:ai@[2001:db8::1]:5080;transport=TCP")
    assert uri is not None and (uri.host, uri.port, uri.transport) == ("2001:db8::1", 5080, "tcp")
    assert str(uri) == "sip:ai@[2001:db8::1]:5080;transport=TCP"
    assert parse_uri("tel:+1555") is None and parse_uri("sip:a@h:99999") is None
    via = parse_via("SIP/2.0/tcp 10.0.0.1;branch=z9hG4bKabc;rport")
    assert via is not None and (via.transport, via.sent_by, via.branch) == ("TCP", "10.0.0.1:5060", "z9hG4bKabc")
    assert via.params["rport"] == ""
