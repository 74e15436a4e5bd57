"""``media_audio`` (msgspec since issue #10) answers exactly as the orjson path it replaced, for every input.

The reference is that path, kept in ``protocol`` as the fallback for what msgspec refuses. The messages are
written as raw JSON, token by token, so that a key can repeat, any character can be a ``\\u`` escape, and
whitespace can go anywhere JSON allows it.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telephony_bridge.twilio import protocol as tw

SID = "MZ0123456789abcdef0123456789abcdef"


# --- the reference: the orjson read that msgspec replaced, which media_audio still falls back on ------------------
# (its answers on the explicit cases below are pinned, so it cannot drift unnoticed either)

reference_media_audio = tw._media_audio_general


# --- raw JSON, token by token -------------------------------------------------------------------------------

SPACES = st.sampled_from(["", "", " ", "\n", "\t", "\r\n  "])
OTHER_JSON = (
    st.sampled_from(["null", "true", "false", "0", "-1", "1.5", "18446744073709551616", '"x"'])
    | st.sampled_from(["[]", "{}", '[1,{"b":""}]'])
    | st.sampled_from(["1e400", '"\\ud800"', '"\\udc00\\ud800"', "NaN", "[1,]", '"\\x"'])  # orjson refuses these
)


@st.composite
def json_string(draw: st.DrawFn, value: str) -> str:
    """``value`` as a JSON string, a few of its characters (or all) written as ``\\u`` escapes."""
    if value and draw(st.booleans()):
        escaped = set(range(len(value))) if draw(st.booleans()) else draw(st.sets(st.sampled_from(range(len(value)))))
    else:
        escaped = set()
    hex_case, out = draw(st.sampled_from("xX")), []
    for i, char in enumerate(value):
        if i in escaped or char in '"\\' or char < " ":
            code = ord(char)
            if code > 0xFFFF:  # a surrogate pair
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04{hex_case}}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


@st.composite
def json_object(
    draw: st.DrawFn,
    fields: dict[str, st.SearchStrategy[str]],
    others: dict[str, st.SearchStrategy[str]],
    extra: bool = False,
) -> str:
    """An object of ``fields`` (raw values, each drawn from its strategy) in any order; now and then a key is
    left out, repeated (with a value from ``others``) or unknown (always one if ``extra``)."""
    pairs = [(key, draw(fields[key])) for key in draw(st.permutations(list(fields)))]
    mutations = ["extra"] if extra else []
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        mutations.append(draw(st.sampled_from(["drop", "repeat", "extra"])))
    for mutation in mutations:
        if mutation == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif mutation == "repeat" and pairs:
            key = draw(st.sampled_from([key for key, _ in pairs]))
            pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(others.get(key, OTHER_JSON))))
        elif mutation == "extra":
            key = draw(st.sampled_from(["x", "Event", "streamsid", "media ", "payload", "timestamp", ""]))
            value = draw(OTHER_JSON | st.sampled_from(["1e400", "-1e400"]))  # orjson refuses; msgspec would skip
            pairs.insert(draw(st.integers(0, len(pairs))), (key, value))
    space = draw(SPACES)
    items = [f"{draw(json_string(key))}{space}:{space}{value}" for key, value in pairs]
    return "{" + space + f"{space},{space}".join(items) + space + "}"


def written(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Raw JSON strings of ``values``."""
    return values.flatmap(json_string)


NUMBER = written(st.integers(0, 10**18 - 1).map(str) | st.from_regex(r"0[0-9]{0,18}", fullmatch=True))
NOT_A_NUMBER = (
    written(st.sampled_from(["", "+1", "-1", " 1", "1 ", "1\n", "1e3", "1.0", "1_0", "9" * 19, "0" * 19]))
    | written(st.sampled_from(["²", "١٢", "０", "1²", "߀"]))  # digits to str.isdigit, not ASCII
    | st.integers(-1, 10**20).map(str)  # a number as a number: never Twilio's shape
    | OTHER_JSON
)


def edit(text: str, at: int, insert: str, drop: bool) -> str:
    """``text`` with ``insert`` put in at ``at``, over the character there if ``drop``."""
    return text[:at] + insert + text[at + drop :]


BASE64_TEXT = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
BASE64 = written(BASE64_TEXT)
EDITED_BASE64 = st.builds(
    edit, BASE64_TEXT, st.integers(0, 60), st.sampled_from(["", "=", " ", "\n", "A", "-", "é"]), st.booleans()
)
NOT_BASE64 = st.one_of(
    written(EDITED_BASE64), written(EDITED_BASE64), written(st.text("AB+/= \n\ré-_", max_size=9)), OTHER_JSON
)
# Each field: (what Twilio writes, what it does not)
FIELDS = {
    "event": (
        written(st.just("media")),
        written(st.sampled_from(["mark", "Media", "media ", "", "médiá"])) | OTHER_JSON,
    ),
    "sequenceNumber": (NUMBER, NOT_A_NUMBER),
    "streamSid": (written(st.just(SID) | st.text(max_size=40)), OTHER_JSON),
    "track": (written(st.sampled_from(["inbound", "outbound", ""])), OTHER_JSON),
    "chunk": (NUMBER, NOT_A_NUMBER),
    "timestamp": (NUMBER, NOT_A_NUMBER),
    "payload": (BASE64, NOT_BASE64),
}
ANY = {key: valid | wrong for key, (valid, wrong) in FIELDS.items()}


@st.composite
def media_messages(draw: st.DrawFn) -> str | bytes:
    """Twilio's ``media`` message, or one with one thing wrong (a field, an unknown key, media that is no object,
    something after the object); in any order, keys now and then dropped, repeated or unknown, characters
    escaped, whitespace anywhere."""
    wrong = draw(st.sampled_from([None, None, *FIELDS, "media", "message", "extra", "extra in media"]))

    def field(key: str) -> st.SearchStrategy[str]:
        valid, bad = FIELDS[key]
        return bad if key == wrong else valid

    inner = {key: field(key) for key in ("track", "chunk", "timestamp", "payload")}
    media = OTHER_JSON | BASE64 if wrong == "media" else json_object(inner, ANY, wrong == "extra in media")
    outer = {"event": field("event"), "sequenceNumber": field("sequenceNumber"), "streamSid": field("streamSid")}
    message = json_object({**outer, "media": media}, {**ANY, "media": media | OTHER_JSON}, wrong == "extra")
    text = draw(SPACES) + draw(message) + draw(SPACES)
    if wrong == "message":
        text = draw(st.sampled_from([text + "x", text + "{}", text + "\x00", text + ",", text[:-1]]) | OTHER_JSON)
    return text.encode() if draw(st.booleans()) else text


@given(media_messages())
@settings(max_examples=1000, deadline=None)
def test_media_audio_answers_as_the_orjson_path_it_replaced(text: str | bytes) -> None:
    assert tw.media_audio(text) == reference_media_audio(text)


@given(st.binary(max_size=400), st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1))
def test_media_audio_reads_twilios_own_shape_in_msgspecs_one_pass(
    payload: bytes, timestamp_ms: int, chunk: int, sequence_number: int
) -> None:
    text = tw.Media(SID, payload, timestamp_ms, chunk, sequence_number).to_json()
    assert tw._read_twilio_media(text).media.payload == payload  # not the general path
    assert tw.media_audio(text) == tw.media_audio(text.encode()) == (payload, timestamp_ms)


def media(**fields: str) -> str:
    """A Twilio media message with raw JSON ``fields`` (``media_*`` for the inner ones) put in place."""
    inner = {"track": '"inbound"', "chunk": '"2"', "timestamp": '"20"', "payload": '"AQ=="'}
    outer = {"event": '"media"', "sequenceNumber": '"3"', "streamSid": f'"{SID}"'}
    for key, value in fields.items():
        target, key = (inner, key[6:]) if key.startswith("media_") else (outer, key)
        target[key] = value
    inner_text = ",".join(f'"{k}":{v}' for k, v in inner.items())
    return "{" + ",".join(f'"{k}":{v}' for k, v in outer.items()) + ',"media":{' + inner_text + "}}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (media(), (b"\x01", 20)),
        (media(media_timestamp='"\\u0030"', media_payload='"\\u0041Q=="'), (b"\x01", 0)),  # escapes are characters
        (media(media_timestamp='"\\u00b2"'), None),  # a digit to str.isdigit, not to int
        (media(media_timestamp='"0٠"'), None),
        (media(media_timestamp='"' + "9" * 19 + '"'), None),  # MAX_NUMBER_DIGITS
        (media(media_timestamp='"1\\n"'), None),
        (media(media_chunk='""'), None),
        (media(sequenceNumber="3"), None),  # a number as a number: parse_message reads it
        (media(media_payload='"AQ"'), None),  # padding left out
        (media(media_payload='"AQ== "'), None),
        (media(media_payload='"AQ\\n=="'), None),
        (media(media_payload='"AQ-_"'), None),  # the URL-safe alphabet
        (media(media_payload='"AQ==AQ=="'), None),
        (media(media_payload='""'), (b"", 20)),
        (media(streamSid='"\\ud800"'), None),  # a lone surrogate: orjson refuses the JSON
        (media(event='"mark"'), None),
        # what msgspec refuses but the old path read: the general path reads it still
        (media(event='"mark","event":"media"'), (b"\x01", 20)),  # a repeated key: the last wins
        (media(media_timestamp='"x","timestamp":"7"'), (b"\x01", 7)),
        (media(streamSid=f'"{SID}","extra":{{"any":[1]}}'), (b"\x01", 20)),  # an unknown key
        (media(streamSid=f'"{SID}","extra":1e400'), None),  # orjson refuses the number; msgspec would skip it
        (media(streamSid=f'"{SID}","extra":' + "[" * 5000 + "]" * 5000), None),  # too deep for orjson
        (media(event='"media","event":"mark"'), None),
    ],
)
def test_media_audio_explicit_cases(text: str, expected: tuple[bytes, int] | None) -> None:
    assert reference_media_audio(text) == expected  # the reference agrees: these cases say what the old path did
    assert tw.media_audio(text) == tw.media_audio(text.encode()) == expected


def test_media_audio_takes_a_str_with_a_lone_surrogate_as_not_media() -> None:
    text = media(streamSid='"\ud800"')  # in the str itself, not escaped: it cannot be UTF-8 encoded
    assert tw.media_audio(text) is None
