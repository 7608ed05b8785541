"""Local logins: a users file of ``name:password`` or ``name:scrypt$salt$hash`` lines.

Plain passwords are hashed as soon as the file is read and never kept or logged; ``hash-password``
in app.py prints the hashed form to paste into the file instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path


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
