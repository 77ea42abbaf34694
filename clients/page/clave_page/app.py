"""The page's routes: request → "check your e-mail" → reset (link or code) → done → try the key.

Every route is a thin step: read the form, check its format (clave_page.forms), call the
backend (the clave_portal client), render. No token or key is ever logged: the access log
is ours (path only, never the query string) and uvicorn's is off (clave_page.__main__).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from clave_page import forms
from clave_page.backend import LoginAnswer, RecoveryBackend
from clave_page.captcha import Captcha, StandInCaptcha
from clave_page.i18n import LANGS, Lang, question_label, reason_text, translator
from clave_page.settings import PageSettings

log = logging.getLogger("clave_page")
HERE = Path(__file__).parent
FORM_COOKIE = "clave_form"
# In production the form cookie is a __Host- cookie: only this host, over HTTPS, may set it, so
# a sibling subdomain cannot plant a value of its own and defeat the double-submit check.
HOST_FORM_COOKIE = f"__Host-{FORM_COOKIE}"
DUPLICATE_REQUEST = "duplicate_request"  # the first copy's `accepted` stands
LANG_COOKIE = "clave_lang"

SECURITY_HEADERS = {
    # The reset page's URL holds the token: no other site may learn it from a Referer.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
# Production only (the local page is plain HTTP): the browser never again asks for the page,
# and the token-bearing link in it, over plain HTTP.
HSTS = {"Strict-Transport-Security": "max-age=31536000; includeSubDomains"}


def create_app(settings: PageSettings, backend: RecoveryBackend, captcha: Captcha | None = None) -> FastAPI:
    refuse_unsafe(settings, captcha)
    app = FastAPI(title="Clave reference page", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Pages(settings, backend, captcha or StandInCaptcha())
    headers = {**SECURITY_HEADERS, **(HSTS if settings.clave_env == "production" else {})}

    @app.middleware("http")
    async def headers_and_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers.update(headers)
        # The path only: the reset link's query string carries the token.
        log.info(
            "%s %s %d %.0f ms", request.method, request.url.path, response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    app.add_api_route("/", pages.home, methods=["GET"])
    app.add_api_route("/solicitar", pages.request_form, methods=["GET"])
    app.add_api_route("/solicitar", pages.request_submit, methods=["POST"])
    app.add_api_route("/revise-su-correo", pages.check_mail, methods=["GET"])
    app.add_api_route("/recuperar", pages.reset_form, methods=["GET"])
    app.add_api_route("/recuperar", pages.reset_submit, methods=["POST"])
    app.add_api_route("/listo", pages.done, methods=["GET"])
    app.add_api_route("/ingresar", pages.login_form, methods=["GET"])
    app.add_api_route("/ingresar", pages.login_submit, methods=["POST"])
    app.add_api_route("/healthz", pages.healthz, methods=["GET"])
    return app


class UnsafeSettings(ValueError):
    """The page would serve with a protection missing: it refuses to start instead."""


def refuse_unsafe(settings: PageSettings, captcha: Captcha | None) -> None:
    """Fail closed: PAGE_CAPTCHA=external with no captcha given (or the stand-in given) would
    serve the development checkbox as if it were the portal's captcha; and what production
    refuses (PageSettings.problems) is refused here too, whoever builds the app."""
    problems = settings.problems()
    if settings.page_captcha == "external" and (captcha is None or isinstance(captcha, StandInCaptcha)):
        problems.append("PAGE_CAPTCHA=external: give create_app the portal's Captcha (none was given)")
    if problems:
        raise UnsafeSettings("; ".join(problems))


class Pages:
    def __init__(self, settings: PageSettings, backend: RecoveryBackend, captcha: Captcha) -> None:
        self.settings = settings
        self.backend = backend
        self.captcha = captcha
        self.questions = settings.question_ids()
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.secure = settings.clave_env == "production"
        self.form_cookie = HOST_FORM_COOKIE if self.secure else FORM_COOKIE

    # ---- plumbing ------------------------------------------------------------------------

    def _lang(self, request: Request) -> Lang:
        for candidate in (request.query_params.get("lang"), request.cookies.get(LANG_COOKIE)):
            if candidate in LANGS:
                return candidate  # type: ignore[return-value]
        return "es"

    def _client_ip(self, request: Request) -> str:
        if self.settings.page_trust_forwarded_for:
            forwarded = request.headers.get("x-forwarded-for", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        return request.client.host if request.client else "0.0.0.0"  # noqa: S104 - an address, not a bind

    def _render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        lang = self._lang(request)
        form_token = request.cookies.get(self.form_cookie) or secrets.token_urlsafe(32)
        other = "en" if lang == "es" else "es"
        switch_query = urlencode({**dict(request.query_params), "lang": other})
        response = self.templates.TemplateResponse(
            request,
            template,
            {
                "t": translator(lang),
                "lang": lang,
                "switch_url": f"{request.url.path}?{switch_query}" if request.method == "GET" else f"?lang={other}",
                "form_token": form_token,
                "policy": translator(lang)(f"policy.{self.settings.password_policy}"),
                "errors": {},
                "values": {},
                **context,
            },
            status_code=status,
        )
        secure = self.secure
        response.set_cookie(self.form_cookie, form_token, httponly=True, samesite="lax", secure=secure, path="/")
        if request.query_params.get("lang") in LANGS:
            response.set_cookie(LANG_COOKIE, lang, samesite="lax", secure=secure, max_age=365 * 24 * 3600)
        return response

    async def _form(self, request: Request) -> tuple[dict[str, str], bool]:
        """The posted fields, and whether the form came from this page (double-submit token)."""
        data = await request.form()
        fields = {k: v for k, v in data.items() if isinstance(v, str)}
        cookie = request.cookies.get(self.form_cookie, "")
        fresh = bool(cookie) and hmac.compare_digest(cookie.encode(), fields.get("form_token", "").encode())
        return fields, fresh

    # ---- routes --------------------------------------------------------------------------

    async def home(self) -> RedirectResponse:
        return RedirectResponse("/solicitar", status_code=303)

    async def healthz(self) -> Response:
        return Response("ok", media_type="text/plain")

    async def request_form(self, request: Request) -> HTMLResponse:
        return self._request_page(request, {}, {})

    def _request_page(
        self, request: Request, values: Mapping[str, Any], errors: Mapping[str, str], status: int = 200
    ) -> HTMLResponse:
        lang = self._lang(request)
        questions = [(q, question_label(lang, q)) for q in self.questions]
        return self._render(
            request, "request.html", status, values=values, errors=errors, questions=questions,
            captcha_html=self.captcha.fields(), stand_in=isinstance(self.captcha, StandInCaptcha),
        )

    async def request_submit(self, request: Request) -> Response:
        fields, fresh = await self._form(request)
        parsed = forms.read_recovery(fields, self.questions)
        client_ip = self._client_ip(request)
        if not fresh:
            parsed.errors["form"] = "error.form_expired"
        captcha_passed = await self.captcha.passed(fields, client_ip)
        if not captcha_passed:
            parsed.errors["captcha"] = "error.captcha"
        if parsed.errors or parsed.profile is None:
            values = {k: v for k, v in fields.items() if not k.startswith("answers.")}
            return self._request_page(request, values, parsed.errors, status=422)
        request_id = await self.backend.request_recovery(
            profile=parsed.profile,
            national_id=parsed.national_id,
            representative_id=parsed.representative_id if parsed.profile == "employer" else None,
            email=parsed.email,
            answers=parsed.answers,
            captcha_passed=captcha_passed,
            locale=self._lang(request),
            client_ip=client_ip,
        )
        values = {k: v for k, v in fields.items() if not k.startswith("answers.")}
        try:
            answer = await self.backend.request_answer(request_id)
        except TimeoutError:
            return self._request_page(request, values, {"form": "error.timeout"}, status=503)
        if answer.status == "rejected" and DUPLICATE_REQUEST not in answer.reasons:
            # Clave could not process what was sent (request_invalid, plaintext_refused...): about
            # the request, never the account (Clave answers it before any lookup).
            return self._request_page(request, values, {"form": "error.request_invalid"}, status=422)
        # `accepted` (or a repeat of one): the same page whatever the account, nothing here says
        # whether the data matched.
        return RedirectResponse(f"/revise-su-correo?{urlencode({'request_id': request_id})}", status_code=303)

    async def check_mail(self, request: Request) -> HTMLResponse:
        return self._render(request, "check_mail.html", request_id=request.query_params.get("request_id", ""))

    async def reset_form(self, request: Request) -> HTMLResponse:
        query = request.query_params
        return self._render(
            request, "reset.html", request_id=query.get("request_id", ""), token=query.get("token", "")
        )

    async def reset_submit(self, request: Request) -> Response:
        fields, fresh = await self._form(request)
        parsed = forms.read_reset(fields)
        if not fresh:
            parsed.errors["form"] = "error.form_expired"
        template = "reset.html" if parsed.token else "check_mail.html"
        context = {"request_id": parsed.request_id, "token": parsed.token, "values": {"code": parsed.code}}
        if parsed.errors:
            return self._render(request, template, 422, errors=parsed.errors, **context)
        try:
            answer = await self.backend.submit_reset(
                parsed.request_id,
                token=parsed.token or None,
                code=None if parsed.token else parsed.code,
                new_password=parsed.new_password,
                client_ip=self._client_ip(request),
            )
        except TimeoutError:
            return self._render(request, template, 503, errors={"form": "error.timeout"}, **context)
        if answer.status == "completed":
            return RedirectResponse("/listo", status_code=303)
        lang = self._lang(request)
        key_reasons = [reason_text(lang, r) for r in answer.reasons if r.startswith("password_")]
        other_reasons = [reason_text(lang, r) for r in answer.reasons if not r.startswith("password_")]
        if not answer.reasons:
            other_reasons = [reason_text(lang, "unknown")]
        return self._render(
            request, template, 422, key_reasons=key_reasons, other_reasons=other_reasons,
            errors={"new_password": "key_reasons"} if key_reasons else {}, **context,
        )

    async def done(self, request: Request) -> HTMLResponse:
        return self._render(request, "done.html")

    async def login_form(self, request: Request) -> HTMLResponse:
        return self._render(request, "login.html")

    async def login_submit(self, request: Request) -> HTMLResponse:
        fields, fresh = await self._form(request)
        national_id, key = fields.get("national_id", "").strip(), fields.get("key", "")
        errors = {}
        if not fresh:
            errors["form"] = "error.form_expired"
        if not national_id:
            errors["national_id"] = "error.required"
        if not key:
            errors["key"] = "error.required"
        if errors:
            return self._render(request, "login.html", 422, errors=errors, values={"national_id": national_id})
        try:
            answer = await self.backend.login(national_id, key, self._client_ip(request))
        except TimeoutError:
            return self._render(request, "login.html", 503, errors={"form": "error.timeout"})
        return self._render(
            request, "login.html", 200 if answer.valid else 401, result=login_result(answer),
            values={"national_id": national_id},
        )


def login_result(answer: LoginAnswer) -> str:
    """What the login page says: only a right key may say more than "invalid" (must_change
    comes only with `valid`), so a wrong key and an unknown ID still read the same."""
    if not answer.valid:
        return "invalid"
    return "must_change" if answer.must_change else "valid"
