"""1. argon2id with the configured parameters, and from it the hashing floor of one recovery."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shared.hashing import SecretHasher
from tools.workbench import WorkbenchSettings as Settings

# ------------------------------------------------------------------------------ 1. argon2


@dataclass
class Rate:
    ops: int
    wall_s: float
    cpu_s: float

    @property
    def per_op_s(self) -> float:
        return self.wall_s / self.ops

    @property
    def per_s(self) -> float:
        return self.ops / self.wall_s

    @property
    def cpu_per_op_s(self) -> float:
        """CPU time per operation: the cost itself, whatever else the machine is running."""
        return self.cpu_s / self.ops

    def as_dict(self) -> dict[str, float]:
        return {
            "ops": self.ops,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "ms_per_op": self.per_op_s * 1000,
            "cpu_ms_per_op": self.cpu_per_op_s * 1000,
            "ops_per_s": self.per_s,
        }


def _loop(op: Callable[[int], object], seconds: float, min_ops: int) -> int:
    done, start = 0, time.perf_counter()
    while done < min_ops or time.perf_counter() - start < seconds:
        op(done)
        done += 1
    return done


def measure(op: Callable[[int], object], threads: int, seconds: float, min_ops: int = 5) -> Rate:
    """Run `op` on `threads` threads for about `seconds`; argon2-cffi releases the GIL."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    if threads == 1:
        ops = _loop(op, seconds, min_ops)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            ops = sum(pool.map(lambda _: _loop(op, seconds, min_ops), range(threads)))
    return Rate(ops, time.perf_counter() - t0, time.process_time() - cpu0)


def bench_argon2(settings: Settings, threads: int, seconds: float) -> dict[str, Rate]:
    hasher = SecretHasher(settings, workers=1)
    try:
        stored = hasher.hash_sync("Clave12345678")
        hasher.hash_sync("warm-up")
        return {
            "hash_1t": measure(lambda i: hasher.hash_sync(f"Clave{i:08d}"), 1, seconds),
            "verify_1t": measure(lambda i: hasher._verify_sync(stored, f"Clave{i:08d}"), 1, seconds),  # noqa: SLF001
            f"hash_{threads}t": measure(lambda i: hasher.hash_sync(f"Clave{i:08d}"), threads, seconds),
        }
    finally:
        hasher.close()


# ------------------------------------------------------------------------------ report


def floor_figures(settings: Settings, argon: dict[str, Rate], threads: int) -> dict[str, Any]:
    questions = len(settings.question_ids())
    # The floor is CPU time (contention-free); the parallel run shows what the machine gives now.
    per_hash_s = (argon["hash_1t"].cpu_per_op_s + argon["verify_1t"].cpu_per_op_s) / 2
    parallel = argon[f"hash_{threads}t"].per_s
    cases: dict[str, dict[str, float]] = {
        # Freshly imported citizens: one key (the initial one) in the history.
        "bench_citizen": {"identity_verifies": questions, "password_verifies": 1, "password_hashes": 1},
        "full_history": {
            "identity_verifies": questions,
            "password_verifies": settings.password_history,
            "password_hashes": 1,
        },
    }
    for case in cases.values():
        hashes = case["identity_verifies"] + case["password_verifies"] + case["password_hashes"]
        case["hashes"] = hashes
        case["cpu_ms_per_recovery"] = hashes * per_hash_s * 1000
        case["max_recoveries_per_s"] = threads / (hashes * per_hash_s)  # `threads` cores, hashing only
        case["max_recoveries_per_s_now"] = parallel / hashes  # with the measured parallel hash rate
    return {
        "argon2_cpu_ms_per_op": per_hash_s * 1000,
        "cores": threads,
        f"hashes_per_s_{threads}t_measured": parallel,
        "cases": cases,
    }
