"""JWT verification and minting (PROTOCOL section 10).

HS256 with a shared secret by default; RS256/ES256 with a PEM public key when the
allow-list names them. ``alg: none`` is refused whatever the configuration, ``exp``
and ``sub`` are required, and expiry is checked against the injected clock.

A token that passed every check is kept (bounded, oldest out first) with its ``sub``
and ``exp``: presented again (a reconnect, a RESUME, a reconnect storm after a deploy)
it is not decoded and its signature not checked again; its expiry still is, against
the clock of that call. Only the exact same string hits: any other byte is a new
token, verified in full.

The configured keys are prepared once: PyJWT (2.15) prepares the key again on every
decode (for a shared secret: PEM, SSH, DER and JWK look-alike checks with a failed
``json.loads``, ~7 us; for a PEM public key: parsing it). :func:`_prepare_once` keeps
the prepared key of the configured key on the decoder's own algorithm objects; any
other key still goes through PyJWT's preparation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jwt

from domain.model import UserId
from domain.ports import InvalidToken

_SYMMETRIC = {"HS256", "HS384", "HS512"}
#: Verified tokens kept (about 300 bytes each: a few MB at most).
DEFAULT_CACHE_SIZE = 10_000
_ASYMMETRIC = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"}


class JwtVerifier:
    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = 0.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        algs = [a.strip() for a in algorithms if a.strip()]
        if not algs:
            raise ValueError("at least one JWT algorithm is required")
        for alg in algs:
            if alg.lower() == "none":
                raise ValueError("the 'none' JWT algorithm is never accepted")
            if alg not in _SYMMETRIC | _ASYMMETRIC:
                raise ValueError(f"unsupported JWT algorithm {alg!r}")
        self._symmetric = [a for a in algs if a in _SYMMETRIC]
        self._asymmetric = [a for a in algs if a in _ASYMMETRIC]
        if self._symmetric and not secret:
            raise ValueError("HS* algorithms need a secret (GATEWAY_JWT_SECRET)")
        if self._asymmetric and not public_key:
            raise ValueError("RS*/ES* algorithms need a public key (GATEWAY_JWT_PUBLIC_KEY)")
        self._secret = secret
        self._public_key = public_key
        self._leeway = leeway
        self._cache_size = cache_size
        #: token -> (sub, exp) of tokens that passed every check, oldest first.
        self._verified: dict[str, tuple[UserId, float]] = {}
        # One decoder with its options set once (a handshake decodes one token; the
        # options were merged again on every call).
        self._jwt = jwt.PyJWT(options={"require": ["exp", "sub"], "verify_exp": False})
        if secret:
            _prepare_once(self._jwt, self._symmetric, secret)
        if public_key:
            _prepare_once(self._jwt, self._asymmetric, public_key)
        #: With one kind of key only, the key does not depend on the header: PyJWT checks
        #: the header's ``alg`` against the allow-list itself (no second parse).
        self._only: tuple[str, list[str]] | None = None
        if not self._asymmetric and secret:
            self._only = (secret, self._symmetric)
        elif not self._symmetric and public_key:
            self._only = (public_key, self._asymmetric)

    def verify(self, token: str, now: float) -> UserId:
        hit = self._verified.get(token)
        if hit is not None:
            # Verified before: only the expiry can have changed (nbf/iat, once
            # passed, stay passed; the signature and claims are the same bytes).
            if now > hit[1] + self._leeway:
                del self._verified[token]
                raise InvalidToken("token expired")
            return hit[0]
        if self._only is not None:
            key, algorithms = self._only
        else:
            key, algorithms = self._key_for(token)
        try:
            claims = self._jwt.decode(token, key, algorithms=algorithms)
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise InvalidToken("'exp' must be a number")
        if now > exp + self._leeway:
            raise InvalidToken("token expired")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("'sub' must be a non-empty string")
        self._remember(token, sub, float(exp))
        return sub

    def _remember(self, token: str, sub: UserId, exp: float) -> None:
        """Keep a verified token (the oldest goes first when full): a client that
        reconnects, or RESUMEs, presents the same token again, and a reconnect storm is
        thousands of them. Only tokens that passed every check are kept."""
        verified = self._verified
        if len(verified) >= self._cache_size:
            if self._cache_size <= 0:
                return
            del verified[next(iter(verified))]
        verified[token] = (sub, exp)

    def _key_for(self, token: str) -> tuple[str, list[str]]:
        """Both kinds of key configured: the header's ``alg`` picks one."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg in self._symmetric:
            key = self._secret
        elif alg in self._asymmetric:
            key = self._public_key
        else:
            raise InvalidToken(f"algorithm {alg!r} is not allowed")
        assert key is not None
        return key, [alg]


def _prepare_once(decoder: jwt.PyJWT, algorithms: Sequence[str], key: str) -> None:
    """Prepare ``key`` once for each of ``algorithms`` on ``decoder``'s own algorithm
    objects (never the module's shared ones), so that a decode with that key does not
    prepare it again. A key its algorithm refuses is refused here, at start-up, rather
    than on every IDENTIFY. Without PyJWT's per-decoder signer (``PyJWT._jws``, 2.x)
    nothing changes: decodes prepare the key as before."""
    jws = getattr(decoder, "_jws", None)
    if not isinstance(jws, jwt.PyJWS):
        return
    for name in algorithms:
        try:
            alg = jws.get_algorithm_by_name(name)
        except NotImplementedError as exc:  # e.g. RS256 without cryptography
            raise ValueError(f"the JWT algorithm {name} is not available: {exc}") from None
        try:
            prepared = alg.prepare_key(key)
        except jwt.PyJWTError as exc:
            raise ValueError(f"the configured key cannot be used for {name}: {exc}") from None
        alg.prepare_key = _Prepared(alg.prepare_key, key, prepared)  # type: ignore[method-assign,assignment]


class _Prepared:
    """A decoder algorithm's ``prepare_key``: the configured key's preparation kept."""

    __slots__ = ("_key", "_prepared", "inner")

    def __init__(self, inner: Callable[[Any], Any], key: str, prepared: Any) -> None:
        self.inner = inner
        self._key = key
        self._prepared = prepared

    def __call__(self, candidate: Any) -> Any:
        if candidate is self._key or (type(candidate) is str and candidate == self._key):
            return self._prepared
        return self.inner(candidate)


class JwtIssuer:
    """Mints tokens (``gateway token``, tests, the simulation)."""

    def __init__(self, *, key: str, algorithm: str = "HS256") -> None:
        if algorithm.lower() == "none":
            raise ValueError("refusing to mint unsigned tokens")
        self._key = key
        self._algorithm = algorithm

    def issue(self, user_id: UserId, *, now: float, ttl: float = 3600.0) -> str:
        return jwt.encode(
            {"sub": user_id, "iat": int(now), "exp": int(now + ttl)},
            self._key,
            algorithm=self._algorithm,
        )
