"""The credentials the client scripts sign in with, from the environment the end-to-end tests set: per user U,
ENCLAVE_<U>_TOKEN (the API token) and ENCLAVE_<U>_TOTP (the base32 TOTP secret), and the RFC 6238 code of a
secret (SHA-1, 30 s, 6 digits) as an authenticator app shows it.
"""
import base64
import hashlib
import hmac
import os
import struct
import time


def totp(user, offset=0):
    """The user's code now, or `offset` 30-second steps from now."""
    secret = os.environ[f"ENCLAVE_{user.upper()}_TOTP"]
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    step = int(time.time()) // 30 + offset
    digest = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    o = digest[-1] & 0x0F
    return "%06d" % ((struct.unpack(">I", digest[o:o + 4])[0] & 0x7FFFFFFF) % 1_000_000)


def token(user):
    """The user's API token."""
    return os.environ[f"ENCLAVE_{user.upper()}_TOKEN"]
