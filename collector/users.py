"""Who is annotating: local logins from a users file of ``name:password`` or
``name:scrypt$salt$hash`` lines, or, on a Hugging Face Space, "Sign in with Hugging Face".

Plain passwords are hashed as soon as the file is read and never kept or logged; ``hash-password``
in app.py prints the hashed form to paste into the file instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class UsersError(ValueError):
    """The users file is missing or malformed."""


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (0600 from the start: never world-readable, not
    even between a write and a chmod), replacing it atomically if it exists."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hash_password(password: str, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(8)
    digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=2**14, r=8, p=1).hex()
    return f"scrypt${salt}${digest}"


def verify(stored: str, password: str) -> bool:
    _, salt, _ = stored.split("$", 2)
    return hmac.compare_digest(stored, hash_password(password, salt))


class Users:
    """name -> scrypt hash; ``check`` is Gradio's auth callable.

    A password is hashed in a small thread pool, never on the event loop (scrypt takes ~36 ms of
    CPU: on the loop, a flood of logins would stall every request). An unknown name costs the same
    hash as a known one, so the time of an answer does not tell which names exist.
    """

    HASH_THREADS = 2

    def __init__(self, hashes: dict[str, str]):
        self.hashes = hashes
        self._dummy = hash_password(secrets.token_hex(16))
        self._pool = ThreadPoolExecutor(self.HASH_THREADS, thread_name_prefix="password-hash")

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
        write_private(path, f"# PrefLoop users: name:password or name:<hash from `python app.py hash-password`>\n"
                            f"{name}:{hash_password(password)}\n")
        return cls.load(path), password

    def verify(self, name: str, password: str) -> bool:
        """Blocking check (one scrypt hash, whether the name exists or not)."""
        stored = self.hashes.get(name)
        ok = verify(stored or self._dummy, password)
        return stored is not None and ok

    async def check(self, name: str, password: str) -> bool:
        """Gradio's auth callable: the hash runs in the pool while the event loop serves others."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.verify, name, password)


class LoginThrottle:
    """Login attempts per user name and per client address in a sliding window.

    An attempt counts when it starts (so a burst of parallel guesses is cut off before any is
    hashed); a successful login clears its name's count. Past ``per_name`` attempts on one name, or
    ``per_address`` from one address, within ``window_s``, ``attempt`` returns the seconds to wait.
    Memory stays bounded: at most ``max_keys`` names and addresses are remembered.
    """

    def __init__(self, per_name: int = 5, per_address: int = 20, window_s: float = 300.0,
                 max_keys: int = 50_000, clock=time.monotonic):
        self.limits = {"name": per_name, "address": per_address}
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _wait(self, key: tuple[str, str], now: float) -> float:
        q = self._seen.get(key)
        if q is None:
            return 0.0
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if len(q) < self.limits[key[0]]:
            return 0.0
        return self.window_s - (now - q[0])

    def attempt(self, name: str, address: str) -> float:
        """0 when this attempt may proceed (and it is counted), else the seconds to wait."""
        now = self.clock()
        keys = [("name", name), ("address", address)]
        with self._lock:
            wait = max(self._wait(k, now) for k in keys)
            if wait > 0:
                return wait
            if len(self._seen) >= self.max_keys:
                self._prune(now)
            for k in keys:
                self._seen.setdefault(k, deque()).append(now)
            return 0.0

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._seen.pop(("name", name), None)

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._seen.items() if not q or now - q[-1] >= self.window_s]:
            del self._seen[k]
        if len(self._seen) >= self.max_keys:  # still full: forget the oldest half
            oldest = sorted(self._seen, key=lambda k: self._seen[k][-1])
            for k in oldest[: len(oldest) // 2]:
                del self._seen[k]


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
