"""argon2id hashing off the event loop.

argon2-cffi releases the GIL, so a small thread pool lets hashing use both
cores while the loop keeps consuming. Parameters come from settings
(default: OWASP's m=19 MiB, t=2, p=1).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.settings import Argon2Settings


class SecretHasher:
    def __init__(self, settings: Argon2Settings, workers: int = 2) -> None:
        self._hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        # A real hash of a random value: verifying against it costs exactly what a real check costs,
        # so "no such account" and "wrong answer" take the same time.
        self.decoy_hash = self._hasher.hash("decoy-value-never-matches")

    async def hash(self, secret: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, secret)

    async def verify(self, stored_hash: str, secret: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify_sync, stored_hash, secret)

    def _verify_sync(self, stored_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._hasher.check_needs_rehash(stored_hash)

    def hash_sync(self, secret: str) -> str:
        return self._hasher.hash(secret)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
