"""Who is annotating: local logins from a users file of ``name:password`` or
``name:scrypt$salt$hash`` lines, or, on a Hugging Face Space, "Sign in with Hugging Face".

Plain passwords are hashed as soon as the file is read and never kept or logged; ``hash-password``
in app.py prints the hashed form to paste into the file instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import UserError

logger = logging.getLogger(__name__)


TOKEN_HEADER = "x-prefloop-token"  # where scripts send an API token (hf mode)
PEOPLE_CHANGES = "people_changes"  # settings key: admins and annotators changed in the Admin tab


class UsersError(UserError, ValueError):
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


def check_name(name: str | None) -> str:
    """A person's name as typed by an admin: one line, no ':' (the users file's separator)."""
    name = (name or "").strip()
    if not name or len(name) > 64 or ":" in name or name.startswith("#") or not name.isprintable():
        raise UsersError("a name is 1-64 printable characters without ':' (and not starting with '#')")
    return name


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

    def __init__(self, hashes: dict[str, str], path: Path | None = None):
        self.hashes = hashes
        self.path = path
        self._dummy = hash_password(secrets.token_hex(16))
        self._pool = ThreadPoolExecutor(self.HASH_THREADS, thread_name_prefix="password-hash")
        self._lock = threading.Lock()

    def add(self, name: str, password: str | None = None) -> str:
        """A new person; returns their password (a random one unless given: shown once, stored
        hashed). The users file is rewritten atomically, so a crash leaves the old or the new one."""
        name = check_name(name)
        if password is not None and len(password) < 8:
            raise UsersError("a password needs at least 8 characters")
        password = password or secrets.token_urlsafe(9)
        hashed = hash_password(password)
        with self._lock:
            if name in self.hashes:
                raise UsersError(f"{name} is already a user")
            self._write({**self.hashes, name: hashed})
            self.hashes[name] = hashed
        return password

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.hashes:
                raise UsersError(f"{name} is not a user")
            if len(self.hashes) == 1:
                raise UsersError("the last user cannot be removed")
            self._write({k: v for k, v in self.hashes.items() if k != name})
            del self.hashes[name]

    def _write(self, hashes: dict[str, str]) -> None:
        if self.path is None:
            raise UsersError("these users come from no file; nothing to change")
        write_private(self.path, "# PrefLoop users: name:password or name:<hash from `python app.py hash-password`>\n"
                      + "".join(f"{n}:{h}\n" for n, h in hashes.items()))

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
        return cls(hashes, path)

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
    hashed); a successful login clears its name's count and does not count for its address (a
    team behind one address logs in freely; its wrong guesses add up). Past ``per_name`` attempts on one name, or
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
            q = self._seen.get(("address", address))
            if q:
                q.pop()

    def _prune(self, now: float) -> None:
        for k in [k for k, q in self._seen.items() if not q or now - q[-1] >= self.window_s]:
            del self._seen[k]
        if len(self._seen) >= self.max_keys:  # still full: forget the oldest half
            oldest = sorted(self._seen, key=lambda k: self._seen[k][-1])
            for k in oldest[: len(oldest) // 2]:
                del self._seen[k]


# -- Hugging Face OAuth (on a Space) ---------------------------------------------------------

# What a Space with `hf_oauth: true` sets. Gradio runs its real OAuth routes only where SYSTEM is
# "spaces"; elsewhere it installs a mock login that signs every visitor in as the owner of HF_TOKEN,
# and without OAUTH_CLIENT_SECRET it signs session cookies with a public constant (any identity
# could be forged). hf mode therefore refuses to start unless all of these are present.
SPACE_OAUTH_ENV = ("SYSTEM", "SPACE_ID", "OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES",
                   "OPENID_PROVIDER_URL")


def space_oauth_missing(env: dict[str, str] | None = None) -> list[str]:
    """The variables a real Space with OAuth would set that are missing or wrong here."""
    env = os.environ if env is None else env
    missing = [k for k in SPACE_OAUTH_ENV if not env.get(k)]
    if env.get("SYSTEM") and env.get("SYSTEM") != "spaces":
        missing.insert(0, "SYSTEM=spaces")
    return missing


def on_space_with_oauth(env: dict[str, str] | None = None) -> bool:
    """True on a Hugging Face Space whose README asks for ``hf_oauth: true``."""
    return not space_oauth_missing(env)


@dataclass(frozen=True)
class Person:
    """Someone making a request. ``key`` is what their votes are stored under: the users-file
    name, or ``hf:<OpenID sub>`` (the account's stable id: a rename changes nothing); ``name`` is
    what is shown; ``orgs``: their Hugging Face organisations (from the OpenID userinfo)."""

    key: str
    name: str
    orgs: frozenset[str] = frozenset()
    token: bool = False  # signed in with an API token an admin issued (never an admin through it)


def oauth_person(request: Any) -> Person | None:
    """The person signed in with "Sign in with Hugging Face" on this request, or None.

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
    user = info.get("userinfo") or {}
    sub, name = user.get("sub"), user.get("preferred_username")
    if not sub or not name:
        return None
    orgs = frozenset(str(o.get("preferred_username")) for o in user.get("orgs") or []
                     if isinstance(o, dict) and o.get("preferred_username"))
    return Person(f"hf:{sub}", str(name), orgs)


def oauth_username(request: Any) -> str | None:
    """The Hugging Face user name of a signed-in request, or None."""
    person = oauth_person(request)
    return person.name if person else None


OPEN = "open"


def owner_is_organisation(owner: str, api=None) -> bool | None:
    """Whether a Space owner is a Hugging Face organisation (True), a user (False), or unknown
    (None: the Hub could not be asked)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi(token=os.environ.get("HF_TOKEN") or False)
    try:
        api.get_organization_overview(owner)
        return True
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        return False if status in (401, 404) else None
    except Exception:  # no network, a timeout
        return None


class Access:
    """Who is asking, checked on the server for every event; who may annotate; who is an admin.

    ``mode`` "password": people of the users file (``request.username``, set by Gradio's login).
    ``mode`` "hf": people signed in with Hugging Face, keyed by their OpenID ``sub``.

    ``annotators`` (hf mode): "open" lets anyone signed in annotate; otherwise a comma-separated
    list of user names and ``org:NAME`` entries (members of that organisation); None: the admins
    only. In password mode the users file is the list.

    Admins and listed annotators are named by user name. In hf mode the first account seen with a
    listed name is bound to it: it keeps its place after a rename, and another account that later
    carries the name is not given it.
    """

    def __init__(self, mode: str, store, admins: set[str], annotators: str | None = None,
                 users: Users | None = None):
        if mode not in ("password", "hf"):
            raise ValueError(f"mode {mode!r}: use 'password' or 'hf'")
        self.mode = mode
        self.store = store
        self.users = users
        self.admins = set(admins)
        entries = {a.strip() for a in (annotators or "").split(",") if a.strip()}
        self.open = mode == "hf" and OPEN in entries
        self.allowed_names = {e for e in entries if not e.startswith("org:") and e != OPEN}
        self.allowed_orgs = {e[4:] for e in entries if e.startswith("org:")}
        self._noted: dict[str, tuple[str, bool]] = {}
        self._bound: dict[str, str] = {}  # listed name -> the account key it is bound to
        self._lock = threading.Lock()
        # What admins changed in the Admin tab outlives a restart: it is applied over the flags.
        self.changes: dict[str, dict[str, bool]] = json.loads(store.get_setting(PEOPLE_CHANGES) or "{}")
        # The admins named at start (--admins, the Space owner) are the operator's: the Admin tab
        # adds admins beside them and never removes them, so a restart always restores control.
        self.fixed_admins = frozenset(self.admins)
        for name, on in self.changes.get("admins", {}).items():
            if on:
                self.admins.add(name)
            elif name not in self.fixed_admins:
                self.admins.discard(name)
        for entry, on in self.changes.get("annotators", {}).items():
            self._allow(entry, on)
        store.sync_admins(self.admins)
        if mode == "password":
            for name in self.admins:
                self._note(Person(name, name), True)

    def person(self, request: Any) -> Person | None:
        if self.mode == "hf":
            person = oauth_person(request) or self.token_person(request)
        else:
            name = getattr(request, "username", None) if request is not None else None
            person = Person(name, name) if name else None
        if person is not None:
            self._note(person, self._is_admin(person))
        return person

    def token_person(self, request: Any) -> Person | None:
        """hf mode: a script or judge sending the header ``X-PrefLoop-Token: <token>``, a token an
        admin issued and has not revoked (checked against the store on every request, so a
        revocation holds from the next one). The person is the name the token is bound to. Not
        ``Authorization``: a private Space's proxy reads that header for the Hub's own tokens."""
        headers = getattr(request, "headers", None)
        if headers is None:
            headers = getattr(getattr(request, "request", None), "headers", None)
        token = ((headers.get(TOKEN_HEADER) if headers is not None else None) or "").strip()
        if not token:
            return None
        name = self.store.token_name(token)
        return Person(name, name, token=True) if name else None

    def _listed(self, person: Person, names: set[str]) -> bool:
        """Whether the person is one of ``names``. In hf mode a listed name is bound to the first
        account seen with it: that account stays listed after a rename, and another account that
        later takes the name is not."""
        if self.mode == "password":
            return person.name in names
        for name in names:
            with self._lock:
                bound = self._bound.get(name)
            if bound is None:
                bound = self.store.bound_key(name)
                if bound is None and name == person.name:
                    bound = self.store.bind_name(name, person.key)
                if bound is not None:
                    with self._lock:
                        self._bound[name] = bound
            if bound == person.key:
                return True
        if person.name in names:
            logger.warning("%s signed in with a listed name but not the account that held it", person.name)
        return False

    def _is_admin(self, person: Person) -> bool:
        return not person.token and self._listed(person, self.admins)

    def _note(self, person: Person, admin: bool) -> None:
        with self._lock:
            if self._noted.get(person.key) == (person.name, admin):
                return
            self._noted[person.key] = (person.name, admin)
        self.store.note_person(person.key, person.name, admin)

    def is_admin(self, person: Person | None) -> bool:
        return person is not None and self._is_admin(person)

    def may_annotate(self, person: Person) -> bool:
        if self.mode == "password":  # a person removed from the users file loses a live session too
            return self.users is None or person.name in self.users.hashes
        if self.open or person.token or self.is_admin(person):  # a live token: an admin let its holder in
            return True
        return bool(person.orgs & self.allowed_orgs) or self._listed(person, self.allowed_names)

    def annotator(self, request: Any) -> str:
        """The key of the person making this request if they may annotate; PermissionError if not."""
        person = self.person(request)
        if person is None:
            raise PermissionError("log in first")
        if not self.may_annotate(person):
            raise PermissionError(f"you are signed in as {person.name}, who is not among this app's annotators; "
                                  "ask an admin to add you")
        return person.key

    def admin(self, request: Any) -> Person:
        """The person making this request if they are an admin; PermissionError if not."""
        person = self.person(request)
        if not self.is_admin(person):
            raise PermissionError("admins only")
        assert person is not None
        return person

    # -- changes from the Admin tab -------------------------------------------------------

    def _allow(self, entry: str, on: bool) -> None:
        names, value = (self.allowed_orgs, entry[4:].strip()) if entry.startswith("org:") else (self.allowed_names,
                                                                                             entry.strip())
        (names.add if on else names.discard)(value)

    def _remember(self, kind: str, name: str, on: bool) -> None:
        self.changes.setdefault(kind, {})[name] = on
        self.store.set_setting(PEOPLE_CHANGES, json.dumps(self.changes, sort_keys=True))

    def set_admin(self, name: str, on: bool, by: Person) -> None:
        """Make ``name`` an admin or not, from now on (the next request) and after a restart."""
        name = check_name(name)
        if not self._is_admin(by):
            raise UsersError("you are no longer an admin")  # removed by another admin meanwhile
        if not on and self._listed(by, {name}):
            raise UsersError("you cannot remove your own admin role; ask another admin")
        with self._lock:  # the checks that two admins acting at once must not both pass
            if not on and name not in self.admins:
                raise UsersError(f"{name} is not an admin")
            if not on and name in self.fixed_admins:
                raise UsersError(f"{name} was made an admin when the app started (--admins); only a restart "
                                 "without it removes that")
            if not on and len(self.admins) <= 1:
                raise UsersError("the last admin cannot be removed")
            if on and self.mode == "password" and self.users is not None and name not in self.users.hashes:
                raise UsersError(f"{name} is not a user; add them first")
            (self.admins.add if on else self.admins.discard)(name)
            self._noted.clear()  # the admin mark is noted again on each person's next request
            self._remember("admins", name, on)
        self.store.sync_admins(self.admins)
        logger.info("%s %s admin by %s", name, "made" if on else "no longer", by.name)

    def add_annotator(self, name: str, by: Person, password: str | None = None) -> str | None:
        """Password mode: a new user (returns the password to hand over). hf mode: a Hugging Face
        user name, or ``org:NAME`` for an organisation's members, on the list."""
        if self.mode == "password":
            if self.users is None:
                raise UsersError("this app has no users file")
            if self.changes.get("removed_users", {}).get(name.strip()):
                # an old login session may still carry the name: a new person never inherits it
                raise UsersError(f"{name.strip()} was removed; the name is not given out again, choose another")
            password = self.users.add(name, password)
            logger.info("user %s added by %s", name.strip(), by.name)
            return password
        entry = name.strip()
        entry = f"org:{check_name(entry[4:])}" if entry.startswith("org:") else check_name(entry)
        with self._lock:
            self._allow(entry, True)
            self._remember("annotators", entry, True)
        logger.info("%s may annotate (added by %s)", entry, by.name)
        return None

    def remove_annotator(self, name: str, by: Person) -> None:
        """Take someone off (password mode: out of the users file; their session stops working at
        its next request). Their votes are kept; the Admin tab can exclude them from training."""
        name = (name or "").strip()
        if name == by.name:
            raise UsersError("you cannot remove yourself")
        if name in self.admins:
            raise UsersError(f"{name} is an admin; remove the admin role first")
        if self.mode == "password":
            if self.users is None:
                raise UsersError("this app has no users file")
            self.users.remove(name)
            with self._lock:
                self._remember("removed_users", name, True)
        else:
            with self._lock:
                listed = name[4:] in self.allowed_orgs if name.startswith("org:") else name in self.allowed_names
                if not listed:
                    raise UsersError(f"{name} is not on the list")
                self._allow(name, False)
                self._remember("annotators", name, False)
        logger.info("%s removed by %s", name, by.name)

    def roster(self) -> str:
        """Who may annotate and who are admins, in two lines for the Admin tab."""
        people = sorted(self.users.hashes) if self.mode == "password" and self.users is not None else None
        who = ", ".join(people) if people is not None else self.describe()
        return f"**Annotators:** {who}\n\n**Admins:** {', '.join(sorted(self.admins)) or 'none'}"

    def describe(self) -> str:
        """Who may annotate, in one line (for the start-up message)."""
        if self.mode == "password":
            return "the people of the users file"
        if self.open:
            return "anyone signed in with Hugging Face"
        parts = sorted(self.allowed_names) + [f"members of {o}" for o in sorted(self.allowed_orgs)]
        return ", ".join(parts) + " and the admins" if parts else "the admins only (set --annotators)"
