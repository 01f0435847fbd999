"""Token verification with PyJWT (PROTOCOL section 10)."""

from adapters.jwt.verifier import JwtIssuer, JwtVerifier

__all__ = ["JwtIssuer", "JwtVerifier"]
