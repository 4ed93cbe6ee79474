"""API tokens: who may do what to which task.

The tokens file (API_TOKENS_FILE, a mounted Secret) is JSON:

    {"tokens": [
      {"name": "reporting", "sha256": "<hex of sha256(token)>",
       "permissions": {"generate_report": ["submit"], "*": ["read"]}},
      {"name": "admin", "sha256": "...", "permissions": {"*": ["*"]}}]}

`permissions` maps a task-name pattern (`*`, `refresh_*`: shell-style) to the actions allowed on
the tasks it matches: `submit`, `read`, `revoke`, or `*` for all three. The file holds only
hashes: a leaked Secret does not leak a token. A plain SHA-256 is enough because tokens are 256
random bits (`new_token`): nobody can guess one, so the slow hashes made for passwords (bcrypt,
argon2) would add ~100 ms of CPU to every request, an easy way to overload the API, and buy
nothing.

The file is re-read when it changes (checked at most once a second): a rotated Secret takes
effect without a restart, once the kubelet has updated the mounted file. A file that no longer
parses keeps the tokens in force and is logged; at start it stops the API.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ACTIONS = ("submit", "read", "revoke")
Action = Literal["submit", "read", "revoke"]
TOKEN_PREFIX = "wht_"  # recognisable in logs and secret scanners
RELOAD_EVERY = 1.0  # seconds between two looks at the file

logger = logging.getLogger(__name__)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    permissions: dict[str, list[Literal["submit", "read", "revoke", "*"]]]

    @field_validator("permissions")
    @classmethod
    def _patterns(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for pattern in value:
            if not pattern or len(pattern) > 128:
                raise ValueError(f"bad task pattern {pattern!r}")
        return value

    def may(self, action: Action, task: str) -> bool:
        """May this token take `action` on a task named `task` ("" when the name is unknown:
        only a `*` pattern covers it)."""
        for pattern, actions in self.permissions.items():
            if (action in actions or "*" in actions) and (
                pattern == "*" or (task and fnmatch.fnmatchcase(task, pattern))
            ):
                return True
        return False


class TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenEntry]

    @field_validator("tokens")
    @classmethod
    def _unique(cls, value: list[TokenEntry]) -> list[TokenEntry]:
        names = [t.name for t in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate token names: {', '.join(dupes)}")
        return value


class TokensFileError(ValueError):
    pass


def parse_tokens(text: str, source: str) -> dict[str, TokenEntry]:
    """Entries by hash; TokensFileError naming the file and the field."""
    try:
        parsed = TokensFile.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "file"
        raise TokensFileError(f"{source}: {where}: {err['msg']}") from None
    return {t.sha256: t for t in parsed.tokens}


def entry_for(name: str, token: str, permissions: dict[str, list[str]]) -> dict[str, Any]:
    """The tokens-file entry of a token (validated)."""
    entry = TokenEntry.model_validate(
        {"name": name, "sha256": token_hash(token), "permissions": permissions}
    )
    return entry.model_dump()


@dataclass
class _Loaded:
    stamp: tuple[int, int, int]
    by_hash: dict[str, TokenEntry]


class TokenStore:
    """The tokens of API_TOKENS_FILE, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._checked = 0.0
        self._loaded = self._load()  # a bad file at start: TokensFileError

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the Secret's ..data symlink
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> _Loaded:
        stamp = self._stamp()
        with open(self.path, encoding="utf-8") as f:
            by_hash = parse_tokens(f.read(), self.path)
        return _Loaded(stamp, by_hash)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return
        with self._lock:
            if now - self._checked < RELOAD_EVERY:
                return
            self._checked = now
            try:
                if self._stamp() == self._loaded.stamp:
                    return
                self._loaded = self._load()
                logger.info("tokens file %s re-read: %d tokens", self.path, len(self))
            except (OSError, TokensFileError) as exc:
                logger.error("tokens file not re-read, the previous tokens stay: %s", exc)

    def __len__(self) -> int:
        return len(self._loaded.by_hash)

    def authenticate(self, token: str) -> TokenEntry | None:
        self._refresh()
        # A dict lookup by hash: the hash of a guess tells nothing about the stored ones.
        return self._loaded.by_hash.get(token_hash(token))


def actions_from_args(allow: tuple[str, ...]) -> dict[str, list[str]]:
    """`pattern=action,action` items (the CLI's --allow) -> permissions."""
    permissions: dict[str, list[str]] = {}
    for item in allow:
        pattern, sep, actions = item.partition("=")
        if not sep or not pattern or not actions:
            raise ValueError(f"expected PATTERN=ACTION[,ACTION], got {item!r}")
        for action in actions.split(","):
            if action not in (*ACTIONS, "*"):
                raise ValueError(f"unknown action {action!r} (submit, read, revoke or *)")
            permissions.setdefault(pattern, []).append(action)
    return permissions


def dumps_file(entries: list[dict[str, Any]]) -> str:
    return json.dumps({"tokens": entries}, indent=2) + "\n"
