"""Password rules: the configurable policy (policy.py) plus key history.

`KeyHistory` keeps the argon2id hashes of the current key and the ones before
it; a new key may not match any of the last `depth` (default 5, counting the
current one). Checking reuse needs the hasher, so it is done by the handler
with `history.hashes()`; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.password.policy import PasswordPolicy, Reason, normalize


@dataclass
class KeyHistory:
    current: str | None = None
    previous: list[str] = field(default_factory=list)  # newest first

    def hashes(self, depth: int) -> list[str]:
        """The hashes a new key must not match: the current key and the depth-1 before it."""
        chain = ([self.current] if self.current else []) + self.previous
        return chain[:depth]

    def rotate(self, new_hash: str, depth: int) -> KeyHistory:
        kept = ([self.current] if self.current else []) + self.previous
        return KeyHistory(current=new_hash, previous=kept[: max(depth - 1, 0)])


def assess(policy: PasswordPolicy, candidate: str, reused: bool) -> list[str]:
    """Every reason the candidate is refused ([] means accept)."""
    reasons = policy.check(candidate)
    if reused:
        reasons.append(Reason.REUSED)
    return reasons


def hashable(candidate: str) -> str:
    """What is hashed and compared: NFKC, so the same key typed on another device matches."""
    return normalize(candidate)
