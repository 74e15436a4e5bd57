"""Digest authentication for a UAS (spec §8.2; RFC 8760 on RFC 7616, RFC 3261 §22).

We store HA1 = H(user:realm:password) per algorithm, never passwords. Nonces are stateless: wall-clock seconds
and a random part, with an HMAC over both under a per-process secret, so any nonce we issued verifies without a
table and a stale one is told apart from a forged one (``stale=true`` re-challenge). ``nc`` must grow per nonce
(replay); the random part gives every challenge a nonce of its own, so two callers challenged in the same second
do not share one and refuse each other's first answer as a replay. The clock is injected. Authorization values
are never logged or put in reasons.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from telephony_bridge.sip.address import split_outside_quotes

ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}  # most preferred first (RFC 8760 §2.4)
NONCE_TTL_S = 300.0
_MAX_TRACKED_NONCES = 4096


def hash_hex(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode()).hexdigest()


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """What ``sip.users`` stores: H(user:realm:password)."""
    return hash_hex(algorithm, f"{user}:{realm}:{password}")


def digest_response(
    algorithm: str, ha1_hex: str, *, nonce: str, nc: str, cnonce: str, qop: str, method: str, uri: str
) -> str:
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    if qop:
        return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{ha2}")


def parse_digest(value: str) -> dict[str, str] | None:
    """``Digest a=b, c="d"`` → dict (names lower-cased), or None for another scheme."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    for part in split_outside_quotes(rest, ","):
        name, _, val = part.partition("=")
        params[name.strip().lower()] = val.strip().strip('"')
    return params


@dataclass(frozen=True, slots=True)
class Verdict:
    """``ok`` with the user, or a reason; ``stale`` asks for a re-challenge with ``stale=true``."""

    ok: bool
    user: str = ""
    reason: str = ""
    stale: bool = False


class DigestAuthenticator:
    """Challenges and verifies one realm. ``users`` maps user → {algorithm: HA1 hex}."""

    def __init__(
        self,
        realm: str,
        users: dict[str, dict[str, str]],
        *,
        secret: bytes | None = None,
        nonce_ttl_s: float = NONCE_TTL_S,
    ) -> None:
        self.realm = realm
        self.users = users
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._ttl_s = nonce_ttl_s
        self._opaque = secrets.token_hex(8)
        self._last_nc: OrderedDict[tuple[str, str], int] = OrderedDict()  # (nonce, algorithm) -> nc
        # The latest issue time among nonces dropped from ``_last_nc``: a nonce issued no later that we no longer
        # track may be one whose counts we forgot, so it is re-challenged (stale) rather than taken from nc=1.
        self._forgotten_through = -1

    def nonce(self, now_wall: float, salt: str | None = None) -> str:
        """A fresh nonce (``salt`` None), or the one we would have issued at ``now_wall`` with ``salt``."""
        stamp = f"{int(now_wall):x}.{salt if salt is not None else secrets.token_hex(4)}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def challenges(self, now_wall: float, *, stale: bool = False) -> list[str]:
        """One ``WWW-Authenticate`` value per algorithm we hold HA1s for, SHA-256 first."""
        nonce = self.nonce(now_wall)
        held = {alg for hashes in self.users.values() for alg in hashes}
        out = []
        for alg in ALGORITHMS:
            if alg in held:
                stale_part = ", stale=true" if stale else ""
                out.append(
                    f'Digest realm="{self.realm}", nonce="{nonce}", opaque="{self._opaque}", '
                    f'algorithm={alg}, qop="auth"{stale_part}'
                )
        return out

    def verify(self, authorizations: list[str], *, method: str, uri: str, now_wall: float) -> Verdict:
        if not authorizations:
            return Verdict(False, reason="no credentials")
        for value in authorizations:
            params = parse_digest(value)
            if params is not None and params.get("realm") == self.realm:
                return self._verify_one(params, method=method, uri=uri, now_wall=now_wall)
        return Verdict(False, reason="no Digest credentials for our realm")

    def _verify_one(self, p: dict[str, str], *, method: str, uri: str, now_wall: float) -> Verdict:
        user = p.get("username", "")
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in ALGORITHMS:
            return Verdict(False, user, f"algorithm {algorithm!r} not supported")
        stored = self.users.get(user, {}).get(algorithm)
        if stored is None:
            return Verdict(False, user, "unknown user or algorithm")
        if p.get("uri") != uri:
            return Verdict(False, user, "digest uri differs from the Request-URI")
        nonce = p.get("nonce", "")
        stamp, _, rest = nonce.partition(".")
        try:
            issued = int(stamp, 16)
        except ValueError:
            return Verdict(False, user, "nonce is not ours")
        if not hmac.compare_digest(self.nonce(issued, rest.partition(".")[0]), nonce):
            return Verdict(False, user, "nonce is not ours")
        qop = p.get("qop", "")
        nc = p.get("nc", "")
        expected = digest_response(
            algorithm, stored, nonce=nonce, nc=nc, cnonce=p.get("cnonce", ""), qop=qop, method=method, uri=uri
        )
        if not hmac.compare_digest(expected, p.get("response", "").lower()):
            return Verdict(False, user, "wrong credentials")
        # The stamp is the issue time in whole seconds, rounded down: a nonce lives from ttl to ttl + 1 s, never
        # less (with ttl 1 s a nonce issued late in a second would be stale at once, however quick the answer).
        if now_wall - issued >= self._ttl_s + 1:
            return Verdict(False, user, "nonce is stale", stale=True)
        if qop:
            try:
                count = int(nc, 16)
            except ValueError:
                return Verdict(False, user, "nc is not hexadecimal")
            used = (nonce, algorithm)
            if used not in self._last_nc and issued <= self._forgotten_through:
                return Verdict(False, user, "nonce count no longer tracked", stale=True)
            if count <= self._last_nc.get(used, 0):
                return Verdict(False, user, "nonce count replayed")
            self._last_nc[used] = count
            self._last_nc.move_to_end(used)
            while len(self._last_nc) > _MAX_TRACKED_NONCES:
                (forgotten, _), _ = self._last_nc.popitem(last=False)
                self._forgotten_through = max(self._forgotten_through, int(forgotten.partition(".")[0], 16))
        return Verdict(True, user)


def authorization_header(
    challenge: str, *, user: str, password: str, method: str, uri: str, nc: int = 1, cnonce: str | None = None
) -> str | None:
    """The UAC side (our ``sipcall``): answer one ``WWW-Authenticate`` value, or None if not Digest."""
    params = parse_digest(challenge)
    if params is None:
        return None
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm not in ALGORITHMS:
        return None
    realm = params.get("realm", "")
    qop = "auth" if "auth" in [q.strip() for q in params.get("qop", "").split(",")] else ""
    cnonce = cnonce or secrets.token_hex(8)
    nc_text = f"{nc:08x}"
    response = digest_response(
        algorithm,
        ha1(algorithm, user, realm, password),
        nonce=params.get("nonce", ""),
        nc=nc_text,
        cnonce=cnonce,
        qop=qop,
        method=method,
        uri=uri,
    )
    parts = [
        f'username="{user}"',
        f'realm="{realm}"',
        f'nonce="{params.get("nonce", "")}"',
        f'uri="{uri}"',
        f'response="{response}"',
        f"algorithm={algorithm}",
    ]
    if params.get("opaque"):
        parts.append(f'opaque="{params["opaque"]}"')
    if qop:
        parts += [f"qop={qop}", f"nc={nc_text}", f'cnonce="{cnonce}"']
    return "Digest " + ", ".join(parts)
