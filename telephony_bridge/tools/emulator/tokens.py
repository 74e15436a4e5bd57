"""Emulator JWTs: minting, verification against an injected time, and single-use enforcement.

Tokens follow spec §4 (HS256; sub, iat, exp, aud ``voice-api``, iss ``thesavants.ai``) plus a ``jti`` that
real Savants tokens do not carry: it is how the emulator can refuse a replayed token (spec §11.12), and
clients must keep treating the token as opaque.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import jwt

from telephony_bridge.tools.emulator.protocol import Refusal, WsErrorCode

ALGORITHM = "HS256"
AUDIENCE = "voice-api"
ISSUER = "thesavants.ai"
REQUIRED_CLAIMS = ("sub", "iat", "exp", "aud", "iss", "jti")


@dataclass(frozen=True)
class TokenClaims:
    device_id: str
    issued_at_s: float
    expires_at_s: float
    jti: str


def mint_token(secret: str, device_id: str, *, issued_at_s: float, ttl_s: float = 60, jti: str | None = None) -> str:
    """A signed token for ``device_id``; ``issued_at_s`` is Unix time (tests pass old times to get stale ones).

    ``iat`` is whole seconds as in the spec's example and ``exp = iat + ttl`` exactly when the TTL is whole;
    a fractional TTL (fast tests) counts from the precise issue time so the token is never born expired.
    """
    iat = math.floor(issued_at_s)
    exp: float = iat + int(ttl_s) if float(ttl_s).is_integer() else issued_at_s + ttl_s
    claims = {
        "sub": device_id,
        "iat": iat,
        "exp": exp,
        "aud": AUDIENCE,
        "iss": ISSUER,
        "jti": jti or secrets.token_hex(16),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str, *, now_s: float) -> TokenClaims | Refusal:
    """Signature, required claims, audience and issuer, then expiry against ``now_s`` (Unix seconds).

    PyJWT's own time checks are off because they read the system clock; ours uses the injected one.
    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False},
        )
    except jwt.InvalidTokenError as exc:
        return Refusal(WsErrorCode.INVALID_TOKEN, f"expected a token issued by this server: {exc}")
    device_id, jti, exp = claims["sub"], claims["jti"], claims["exp"]
    if not (isinstance(device_id, str) and device_id and isinstance(jti, str)):
        return Refusal(WsErrorCode.INVALID_TOKEN, "expected string 'sub' and 'jti' claims")
    if not isinstance(exp, int | float) or not isinstance(claims["iat"], int | float):
        return Refusal(WsErrorCode.INVALID_TOKEN, "expected numeric 'iat' and 'exp' claims")
    if now_s >= exp:
        return Refusal(WsErrorCode.TOKEN_EXPIRED, "Token has expired; request a new token and reconnect")
    return TokenClaims(device_id=device_id, issued_at_s=claims["iat"], expires_at_s=exp, jti=jti)


class JtiLedger:
    """The ids of tokens already presented; an id is forgotten once its token has expired anyway."""

    def __init__(self) -> None:
        self._expiry_by_jti: dict[str, float] = {}

    def first_use(self, claims: TokenClaims, *, now_s: float) -> bool:
        """Record the token as used; False if it had been presented before."""
        self._expiry_by_jti = {j: exp for j, exp in self._expiry_by_jti.items() if exp > now_s}
        if claims.jti in self._expiry_by_jti:
            return False
        self._expiry_by_jti[claims.jti] = claims.expires_at_s
        return True

    def __len__(self) -> int:
        return len(self._expiry_by_jti)
