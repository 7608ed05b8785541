"""Who is annotating: local logins from a users file of ``name:password`` or
``name:scrypt$salt$hash`` lines, or, on a Hugging Face Space, "Sign in with Hugging Face".

Plain passwords are hashed as soon as the file is read and never kept or logged; ``hash-password``
in app.py prints the hashed form to paste into the file instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any


class UsersError(ValueError):
    """The users file is missing or malformed."""


def hash_password(password: str, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(8)
    digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=2**14, r=8, p=1).hex()
    return f"scrypt${salt}${digest}"


def verify(stored: str, password: str) -> bool:
    _, salt, _ = stored.split("$", 2)
    return hmac.compare_digest(stored, hash_password(password, salt))


class Users:
    """name -> scrypt hash; ``check`` is Gradio's auth callable."""

    def __init__(self, hashes: dict[str, str]):
        self.hashes = hashes

    @classmethod
    def load(cls, path: Path) -> Users:
        path = Path(path)
        if not path.is_file():
            raise UsersError(f"users file {path} not found; create it with lines 'name:password'")
        hashes: dict[str, str] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, secret = line.partition(":")
            if not sep or not name.strip() or not secret:
                raise UsersError(f"{path}:{n}: expected 'name:password'")
            hashes[name.strip()] = secret if secret.startswith("scrypt$") else hash_password(secret)
        if not hashes:
            raise UsersError(f"users file {path} has no users; add lines 'name:password'")
        return cls(hashes)

    @classmethod
    def generate(cls, path: Path, name: str = "admin") -> tuple[Users, str]:
        """A first-run users file with one random password (returned once, stored hashed)."""
        password = secrets.token_urlsafe(9)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# PrefLoop users: name:password or name:<hash from `python app.py hash-password`>\n"
                        f"{name}:{hash_password(password)}\n")
        path.chmod(0o600)
        return cls.load(path), password

    def check(self, name: str, password: str) -> bool:
        stored = self.hashes.get(name)
        return stored is not None and verify(stored, password)


# -- Hugging Face OAuth (on a Space) ---------------------------------------------------------

SPACE_OAUTH_ENV = ("SPACE_ID", "OAUTH_CLIENT_ID")


def on_space_with_oauth(env: dict[str, str] | None = None) -> bool:
    """True on a Hugging Face Space whose README asks for ``hf_oauth: true``: the Hub then sets
    SPACE_ID and the OAuth app's OAUTH_CLIENT_ID (with its secret, scopes and provider URL)."""
    env = os.environ if env is None else env
    return all(env.get(k) for k in SPACE_OAUTH_ENV)


def oauth_username(request: Any) -> str | None:
    """The Hugging Face user name of a request signed in with "Sign in with Hugging Face", or None.

    Gradio's OAuth routes store the OpenID ``userinfo`` in the signed session cookie; this reads it
    on the server for every event and API call (an expired login counts as none).
    """
    if request is None:
        return None
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session") if isinstance(scope, dict) else getattr(underlying, "session", None)
    info = (session or {}).get("oauth_info") or {}
    expires_at = info.get("expires_at")
    if expires_at is not None and expires_at < time.time():
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return str(name) if name else None
