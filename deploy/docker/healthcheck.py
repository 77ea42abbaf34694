#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET /healthz of the Clave service running in this container.

Finds the service among the container's processes (`python -m services.NAME`: PID 1, or a
child of an init such as `docker run --init`), reads its port the way the service does
(`<NAME>_METRICS_PORT`, `METRICS_HOST`, from shared.settings) and exits 0 on a 200. A
container running something else (the provisioning job, `clave ...`) has no service to
check and reports healthy while it runs.
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path

SERVICE = re.compile(rb"(?:^|\x00)-m\x00services\.([a-z]+)(?:\x00|$)")
TIMEOUT_S = 3.0


def running_service(proc: Path = Path("/proc")) -> str | None:
    for cmdline in sorted(proc.glob("[0-9]*/cmdline")):
        try:
            match = SERVICE.search(cmdline.read_bytes())
        except OSError:  # the process ended while we looked
            continue
        if match:
            return match.group(1).decode()
    return None


def main(proc: Path = Path("/proc")) -> int:
    service = running_service(proc)
    if service is None:
        return 0
    from shared.settings import PlatformSettings

    settings = PlatformSettings()
    host = settings.metrics_host if settings.metrics_host not in ("0.0.0.0", "::", "") else "127.0.0.1"  # noqa: S104
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    url = f"http://{host}:{settings.metrics_port(service)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - fixed http URL
            ok = response.status == 200
    except OSError as exc:
        print(f"{service}: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
