"""Digest authentication and session timers, pure (spec §8.2, §9)."""

from __future__ import annotations

from telephony_bridge.sip.auth import _MAX_TRACKED_NONCES, DigestAuthenticator, authorization_header, ha1, parse_digest
from telephony_bridge.sip.message import Headers
from telephony_bridge.sip.timers import SessionTimer, TooSmall, negotiate_session_timer

REALM = "bridge.example"
URI = "sip:ai@203.0.113.5"
NOW = 1_800_000_000.0


def authenticator(*algorithms: str) -> DigestAuthenticator:
    users = {"pbx": {alg: ha1(alg, "pbx", REALM, "s3cret") for alg in algorithms}}
    return DigestAuthenticator(REALM, users, secret=b"k" * 32, nonce_ttl_s=300)


def test_challenges_prefer_sha256_then_md5() -> None:
    rows = authenticator("MD5", "SHA-256").challenges(NOW)
    assert [parse_digest(r)["algorithm"] for r in rows] == ["SHA-256", "MD5"]  # type: ignore[index]
    assert all(parse_digest(r)["qop"] == "auth" for r in rows)  # type: ignore[index]


def test_correct_credentials_pass_for_each_algorithm_and_replay_fails() -> None:
    auth = authenticator("SHA-256", "MD5")
    for challenge in auth.challenges(NOW):
        value = authorization_header(challenge, user="pbx", password="s3cret", method="INVITE", uri=URI)
        assert value is not None
        assert auth.verify([value], method="INVITE", uri=URI, now_wall=NOW + 1).ok
        replay = auth.verify([value], method="INVITE", uri=URI, now_wall=NOW + 2)
        assert not replay.ok and replay.reason == "nonce count replayed"


def test_wrong_password_unknown_user_wrong_uri_forged_nonce() -> None:
    auth = authenticator("SHA-256")
    challenge = auth.challenges(NOW)[0]
    wrong = authorization_header(challenge, user="pbx", password="nope", method="INVITE", uri=URI)
    verdict = auth.verify([wrong or ""], method="INVITE", uri=URI, now_wall=NOW)
    assert (verdict.ok, verdict.reason, verdict.stale) == (False, "wrong credentials", False)
    stranger = authorization_header(challenge, user="eve", password="s3cret", method="INVITE", uri=URI)
    assert not auth.verify([stranger or ""], method="INVITE", uri=URI, now_wall=NOW).ok
    other_uri = authorization_header(challenge, user="pbx", password="s3cret", method="INVITE", uri="sip:x@y")
    assert auth.verify([other_uri or ""], method="INVITE", uri=URI, now_wall=NOW).reason.startswith("digest uri")
    nonce = parse_digest(challenge)["nonce"]  # type: ignore[index]
    forged = challenge.replace(nonce, f"{nonce.rpartition('.')[0]}.{'0' * 32}")
    value = authorization_header(forged, user="pbx", password="s3cret", method="INVITE", uri=URI)
    assert auth.verify([value or ""], method="INVITE", uri=URI, now_wall=NOW).reason == "nonce is not ours"
    assert not auth.verify([], method="INVITE", uri=URI, now_wall=NOW).ok


def test_two_callers_challenged_in_the_same_second_each_get_a_nonce_of_their_own() -> None:
    """Nonces were the second's alone: the second caller's first answer (nc=1) was refused as a replay of the
    first caller's, and it took another 401."""
    auth = authenticator("SHA-256")
    first, second = auth.challenges(NOW)[0], auth.challenges(NOW)[0]
    assert parse_digest(first)["nonce"] != parse_digest(second)["nonce"]  # type: ignore[index]
    for challenge in (first, second):
        value = authorization_header(challenge, user="pbx", password="s3cret", method="INVITE", uri=URI)
        assert auth.verify([value or ""], method="INVITE", uri=URI, now_wall=NOW).ok


def test_a_nonce_whose_counts_were_forgotten_is_rechallenged_not_taken_again() -> None:
    """Every challenge has a nonce of its own, so the nonces whose counts are kept (4096) can be fewer than those
    still within their lifetime: a replayed answer whose nonce had been forgotten passed as a first (nc=1)."""
    auth = authenticator("SHA-256")
    answers = [
        authorization_header(auth.challenges(NOW)[0], user="pbx", password="s3cret", method="INVITE", uri=URI) or ""
        for _ in range(_MAX_TRACKED_NONCES + 1)
    ]
    assert all(auth.verify([value], method="INVITE", uri=URI, now_wall=NOW + 1).ok for value in answers)
    replay = auth.verify([answers[0]], method="INVITE", uri=URI, now_wall=NOW + 2)
    assert (replay.ok, replay.stale) == (False, True)
    later = authorization_header(auth.challenges(NOW + 2)[0], user="pbx", password="s3cret", method="INVITE", uri=URI)
    assert auth.verify([later or ""], method="INVITE", uri=URI, now_wall=NOW + 2).ok  # a fresh one still passes


def test_stale_nonce_asks_for_a_rechallenge() -> None:
    auth = authenticator("SHA-256")
    value = authorization_header(auth.challenges(NOW)[0], user="pbx", password="s3cret", method="INVITE", uri=URI)
    verdict = auth.verify([value or ""], method="INVITE", uri=URI, now_wall=NOW + 301)
    assert (verdict.ok, verdict.stale) == (False, True)
    assert "stale=true" in auth.challenges(NOW + 301, stale=True)[0]


def test_a_nonce_lives_its_whole_ttl_wherever_in_a_second_it_was_issued() -> None:
    """Its stamp is whole seconds: one issued at x.9 and answered 0.15 s later is fresh, with the shortest TTL."""
    users = {"pbx": {"SHA-256": ha1("SHA-256", "pbx", REALM, "s3cret")}}
    auth = DigestAuthenticator(REALM, users, secret=b"k" * 32, nonce_ttl_s=1)
    challenge = auth.challenges(NOW + 0.9)[0]
    for nc, (answered_at, stale) in enumerate([(NOW + 1.05, False), (NOW + 1.95, False), (NOW + 2.0, True)], 1):
        value = authorization_header(challenge, user="pbx", password="s3cret", method="INVITE", uri=URI, nc=nc)
        verdict = auth.verify([value or ""], method="INVITE", uri=URI, now_wall=answered_at)
        assert (verdict.ok, verdict.stale) == (not stale, stale), (answered_at, verdict)


def test_reason_never_contains_credentials() -> None:
    auth = authenticator("MD5")
    value = authorization_header(auth.challenges(NOW)[0], user="pbx", password="s3cret", method="INVITE", uri=URI)
    verdict = auth.verify([(value or "").replace("s3cret", "")], method="BYE", uri=URI, now_wall=NOW)
    assert "response" not in verdict.reason and "s3cret" not in verdict.reason


def test_session_timer_negotiation() -> None:
    def hdrs(*rows: tuple[str, str]) -> Headers:
        return Headers.of(rows)

    assert negotiate_session_timer(hdrs(), min_se_s=90) is None
    assert negotiate_session_timer(hdrs(("x", "60")), min_se_s=90) == TooSmall(90)
    assert negotiate_session_timer(hdrs(("Session-Expires", "1800"), ("Supported", "timer")), min_se_s=90) == (
        SessionTimer(1800, "uac", require=True)
    )
    assert negotiate_session_timer(
        hdrs(("Session-Expires", "1800;refresher=uas"), ("Supported", "timer")), min_se_s=90
    ) == SessionTimer(1800, "uas", require=True)
    proxy_inserted = negotiate_session_timer(hdrs(("Session-Expires", "600"), ("Min-SE", "900")), min_se_s=90)
    assert proxy_inserted == SessionTimer(900, "uas", require=False)
    assert SessionTimer(1800, "uac", require=True).expiry_s == 1768.0
    assert SessionTimer(90, "uac", require=True).expiry_s == 60.0
