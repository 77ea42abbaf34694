"""Serve the reference page: `python -m clave_page` (or `make portal` with the local stack).

It reads PageSettings and the portal principal's Kafka settings (the clave_portal client's
own settings), refuses unsafe production settings before serving (exit 78, like Clave's
services), and runs uvicorn without its access log: that log would write the reset link's
query string, token included; the page logs paths only (clave_page.app).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from clave_page.app import UnsafeSettings, create_app
from clave_page.portal_backend import PortalBackend
from clave_page.settings import PageSettings

EX_CONFIG = 78


def main() -> None:
    settings = PageSettings()
    problems = settings.problems()
    if problems:
        for problem in problems:
            print(f"clave-page: refusing to start: {problem}", file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    backend = PortalBackend.from_environment(settings.page_answer_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    try:
        app = create_app(settings, backend)  # the stand-alone page has only the stand-in captcha
    except UnsafeSettings as unsafe:
        print(f"clave-page: refusing to start: {unsafe}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    app.router.lifespan_context = lifespan
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(app, host=settings.page_host, port=settings.page_port, access_log=False, log_config=None)


if __name__ == "__main__":
    main()
