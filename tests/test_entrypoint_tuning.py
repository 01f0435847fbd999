"""What the serving process sets up for a handshake storm, and the JWT verifier's key
choice (one kind of key: no header parse; both kinds: the header picks)."""

from __future__ import annotations

import base64
import gc
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.jwt.verifier import JwtVerifier, _Prepared
from domain.ports import InvalidToken
from entrypoints import serve

SECRET = "a-test-secret-" + "x" * 52  # 64 bytes: long enough for HS512 too


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def test_serving_raises_the_young_generation_threshold_and_freezes_startup(
    restored_gc: None,
) -> None:
    serve.tune_gc()
    assert gc.get_threshold() == serve.GC_THRESHOLD
    assert gc.get_threshold()[0] >= 10_000  # a full collection far less often
    assert gc.get_freeze_count() > 0


def _claims(**extra: object) -> dict[str, object]:
    return {"sub": "u1", "exp": int(time.time()) + 60, **extra}


def _unsigned() -> str:
    """An ``alg: none`` token (PyJWT refuses to make one with a key)."""
    good = jwt.encode(_claims(), SECRET, algorithm="HS256").split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    return f"{header.decode()}.{good[1]}."


def _rsa() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


def test_secret_only_accepts_its_algorithm_and_refuses_the_rest() -> None:
    verifier = JwtVerifier(secret=SECRET)
    now = time.time()
    assert verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"), now) == "u1"
    private, _ = _rsa()
    for token in (
        jwt.encode(_claims(), SECRET, algorithm="HS512"),
        jwt.encode(_claims(), private, algorithm="RS256"),
        _unsigned(),
        jwt.encode(_claims(), "another-" + SECRET, algorithm="HS256"),
        jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256"),
        "not.a.token",
    ):
        with pytest.raises(InvalidToken):
            verifier.verify(token, now)
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"), now + 3600)


def test_both_kinds_of_key_the_header_picks() -> None:
    private, public = _rsa()
    verifier = JwtVerifier(secret=SECRET, public_key=public, algorithms=("HS256", "RS256"))
    now = time.time()
    assert verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"), now) == "u1"
    assert verifier.verify(jwt.encode(_claims(), private, algorithm="RS256"), now) == "u1"
    with pytest.raises(InvalidToken):
        verifier.verify("garbage", now)
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS384"), now)


def test_public_key_only() -> None:
    private, public = _rsa()
    verifier = JwtVerifier(public_key=public, algorithms=("RS256",))
    now = time.time()
    assert verifier.verify(jwt.encode(_claims(), private, algorithm="RS256"), now) == "u1"
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"), now)


class _Counting:
    """Counts the full decodes a verifier makes (PyJWT's ``decode``)."""

    def __init__(self, verifier: JwtVerifier) -> None:
        self.calls = 0
        inner = verifier._jwt.decode

        def decode(*args: Any, **kwargs: Any) -> dict[str, Any]:
            self.calls += 1
            return inner(*args, **kwargs)

        verifier._jwt.decode = decode  # type: ignore[method-assign]


def test_a_verified_token_is_not_decoded_again_but_still_expires() -> None:
    verifier = JwtVerifier(secret=SECRET)
    decodes = _Counting(verifier)
    now = time.time()
    claims = _claims()
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert verifier.verify(token, now) == "u1"
    assert verifier.verify(token, now + 30) == "u1"
    assert decodes.calls == 1, "the second presentation is answered from the cache"
    exp = claims["exp"]
    assert isinstance(exp, int)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token, exp + 1)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token, exp + 1)
    assert decodes.calls == 2, "an expired token left the cache and is verified in full"


def test_only_the_exact_token_hits_and_failures_are_not_kept() -> None:
    verifier = JwtVerifier(secret=SECRET)
    decodes = _Counting(verifier)
    now = time.time()
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert verifier.verify(token, now) == "u1"
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    forged = jwt.encode(_claims(sub="u2"), "another-" + SECRET, algorithm="HS256")
    for bad in (flipped, forged, token + "x", token[:-1]):
        for _ in range(2):
            with pytest.raises(InvalidToken):
                verifier.verify(bad, now)
    assert decodes.calls == 1 + 8, "every bad token was verified in full, each time"


def test_the_cache_is_bounded_oldest_out_first() -> None:
    verifier = JwtVerifier(secret=SECRET, cache_size=2)
    decodes = _Counting(verifier)
    now = time.time()
    tokens = [jwt.encode(_claims(sub=f"u{i}"), SECRET, algorithm="HS256") for i in range(3)]
    for i, token in enumerate(tokens):
        assert verifier.verify(token, now) == f"u{i}"
    assert len(verifier._verified) == 2
    assert verifier.verify(tokens[2], now) == "u2"
    assert decodes.calls == 3
    assert verifier.verify(tokens[0], now) == "u0"  # the oldest went out: decoded again
    assert decodes.calls == 4
    off = JwtVerifier(secret=SECRET, cache_size=0)
    assert off.verify(tokens[0], now) == "u0"
    assert off._verified == {}


def test_the_configured_keys_are_prepared_once_and_still_verify() -> None:
    """PyJWT prepares the key on every decode; the verifier prepares its own once. The
    decoder's algorithm objects are its own (the module-wide ones are untouched), a
    forged signature still fails, and a key the algorithm refuses fails at start-up."""
    private, public = _rsa()
    verifier = JwtVerifier(
        secret=SECRET, public_key=public, algorithms=("HS256", "RS256"), cache_size=0
    )
    prepared: list[str] = []
    jws = verifier._jwt._jws
    for name in ("HS256", "RS256"):
        alg = jws.get_algorithm_by_name(name)
        memo = alg.prepare_key
        assert isinstance(memo, _Prepared)

        def counted(key: Any, _inner: Any = memo.inner, _name: str = name) -> Any:
            prepared.append(_name)
            return _inner(key)

        memo.inner = counted  # below the memo: only the preparations it lets through
    now = time.time()
    for _ in range(3):
        assert verifier.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"), now) == "u1"
        assert verifier.verify(jwt.encode(_claims(), private, algorithm="RS256"), now) == "u1"
    assert prepared == [], "the configured keys were not prepared again"
    forged = jwt.encode(_claims(sub="u2"), "another-" + SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken):
        verifier.verify(forged, now)
    other = jws.get_algorithm_by_name("HS256")
    assert other.prepare_key("another-" + SECRET) == ("another-" + SECRET).encode()
    assert prepared == ["HS256"], "any other key is prepared by PyJWT as before"
    shared = jwt.PyJWS().get_algorithm_by_name("HS256")
    assert "prepare_key" not in vars(shared)
    with pytest.raises(ValueError, match="HS256"):
        JwtVerifier(secret=public)  # a PEM public key as an HMAC secret: refused by PyJWT


@pytest.mark.parametrize(
    "env",
    [
        {"GATEWAY_JWT_ALGORITHMS": "RS256", "GATEWAY_JWT_PUBLIC_KEY": "not a PEM key"},
        {"GATEWAY_JWT_ALGORITHMS": "RS256"},  # no public key at all
        {"GATEWAY_JWT_SECRET": "PEM public key, filled in below"},
    ],
)
def test_serve_refuses_an_unusable_key_as_a_configuration_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused at start-up (exit 2, one line), never a gateway that refuses every
    IDENTIFY or a traceback from inside the app's lifespan."""
    from entrypoints import cli

    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, _rsa()[1] if value.startswith("PEM") else value)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("started serving with an unusable key")

    monkeypatch.setattr(serve, "run", never)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "configuration error: JWT" in capsys.readouterr().err
