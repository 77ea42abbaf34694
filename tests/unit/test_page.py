"""The reference page's routes with an in-memory backend: forms, field errors, the same
answer for every request, reset reasons next to the field, language, headers and logs.
(The real page against the real stack in a real browser: tests/e2e/test_page_browser.py.)"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from clave_page.app import UnsafeSettings, create_app
from clave_page.backend import LoginAnswer, RequestAnswer, ResetAnswer
from clave_page.captcha import StandInCaptcha
from clave_page.settings import PageSettings
from fastapi.testclient import TestClient
from stdnum.ec import ci

CEDULA = "1710034065"
RUC = "1790011674001"
REPRESENTATIVE = "0926687856"
QUESTIONS = ("birth_date", "fingerprint_code", "mother_surname")


@dataclass
class FakeBackend:
    requests: list[dict[str, Any]] = field(default_factory=list)
    resets: list[dict[str, Any]] = field(default_factory=list)
    reset_answer: ResetAnswer = ResetAnswer("completed")
    request_answers: dict[str, RequestAnswer] = field(default_factory=dict)
    valid_keys: dict[str, str] = field(default_factory=dict)
    must_change: set[str] = field(default_factory=set)  # IDs whose key was imported --legacy-keys
    timeout: bool = False

    async def request_recovery(self, **fields: Any) -> str:
        self.requests.append(fields)
        return f"req-{len(self.requests)}"

    async def request_answer(self, request_id: str) -> RequestAnswer:
        if self.timeout:
            raise TimeoutError
        return self.request_answers.get(request_id, RequestAnswer("accepted"))

    async def submit_reset(self, request_id: str, **fields: Any) -> ResetAnswer:
        if self.timeout:
            raise TimeoutError
        self.resets.append({"request_id": request_id, **fields})
        return self.reset_answer

    async def login(self, national_id: str, key: str, client_ip: str) -> LoginAnswer:
        # As Clave answers: must_change only with a right key.
        valid = self.valid_keys.get(national_id) == key
        return LoginAnswer(valid, valid and national_id in self.must_change)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def page(backend: FakeBackend) -> TestClient:
    settings = PageSettings(clave_env="development", page_captcha="stand-in")
    return TestClient(create_app(settings, backend), base_url="http://127.0.0.1:8000")


def form_token(client: TestClient, path: str) -> str:
    html = client.get(path).text
    match = re.search(r'name="form_token" value="([^"]+)"', html)
    assert match, html
    return match.group(1)


def request_fields(client: TestClient, **overrides: str) -> dict[str, str]:
    fields = {
        "form_token": form_token(client, "/solicitar"),
        "profile": "affiliate",
        "national_id": CEDULA,
        "email": "ana@example.org",
        "captcha_stand_in": "yes",
        **{f"answers.{q}": "x" for q in QUESTIONS},
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not None}


def test_test_ids_are_valid() -> None:
    assert ci.is_valid(CEDULA) and ci.is_valid(REPRESENTATIVE)


def test_request_form_fields_use_the_contract_names_and_tie_labels(page: TestClient) -> None:
    html = page.get("/solicitar").text
    for name in ("profile", "national_id", "representative_id", "email", *(f"answers.{q}" for q in QUESTIONS)):
        assert f'name="{name}"' in html
    for input_id in re.findall(r'<input id="([^"]+)"', html):
        assert f'for="{input_id}"' in html, f"input {input_id} has no label"
    assert '<html lang="es">' in html


def test_a_request_is_published_and_answered_with_the_same_page(page: TestClient, backend: FakeBackend) -> None:
    response = page.post("/solicitar", data=request_fields(page), follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/revise-su-correo?request_id=req-1"
    sent = backend.requests[0]
    assert sent["national_id"] == CEDULA and sent["profile"] == "affiliate" and sent["captcha_passed"] is True
    assert sent["answers"] == dict.fromkeys(QUESTIONS, "x") and sent["representative_id"] is None
    assert sent["client_ip"] == "testclient" or sent["client_ip"]


def test_a_request_clave_could_not_process_says_so_plainly(page: TestClient, backend: FakeBackend) -> None:
    backend.request_answers["req-1"] = RequestAnswer("rejected", ("request_invalid",))
    response = page.post(
        "/solicitar", data=request_fields(page, **{"answers.mother_surname": "Secreto"}), follow_redirects=False
    )
    assert response.status_code == 422
    assert "No pudimos procesar su solicitud" in response.text and 'role="alert"' in response.text
    assert "Secreto" not in response.text  # the answers are never echoed back
    assert f'value="{CEDULA}"' in response.text  # the rest is kept, to correct and send again


def test_a_repeated_request_id_keeps_the_first_answer(page: TestClient, backend: FakeBackend) -> None:
    backend.request_answers["req-1"] = RequestAnswer("rejected", ("duplicate_request",))
    response = page.post("/solicitar", data=request_fields(page), follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/revise-su-correo?request_id=req-1"


def test_no_answer_to_a_request_in_time_is_said_plainly(page: TestClient, backend: FakeBackend) -> None:
    backend.timeout = True
    response = page.post("/solicitar", data=request_fields(page))
    assert response.status_code == 503 and "No recibimos respuesta a tiempo" in response.text


def test_an_employer_request_carries_the_ruc_and_the_representative(page: TestClient, backend: FakeBackend) -> None:
    fields = request_fields(page, profile="employer", national_id=RUC, representative_id=REPRESENTATIVE)
    assert page.post("/solicitar", data=fields, follow_redirects=False).status_code == 303
    assert backend.requests[0]["representative_id"] == REPRESENTATIVE
    assert backend.requests[0]["national_id"] == RUC


@pytest.mark.parametrize(
    ("overrides", "field_name", "message"),
    [
        ({"national_id": "1710034066"}, "national_id", "Escriba una cédula de 10 dígitos"),
        ({"national_id": ""}, "national_id", "Este campo es obligatorio"),
        ({"email": "not-an-address"}, "email", "Escriba un correo electrónico válido"),
        ({"answers.birth_date": ""}, "answers-birth_date", "Este campo es obligatorio"),
        ({"profile": "employer", "national_id": RUC}, "representative_id", "Este campo es obligatorio"),
        ({"captcha_stand_in": None}, "captcha", "Confirme que no es un robot"),
        ({"form_token": "forged"}, "form", "El formulario venció"),
    ],
)
def test_a_bad_field_gets_its_error_next_to_it_and_nothing_is_sent(
    page: TestClient, backend: FakeBackend, overrides: dict[str, str], field_name: str, message: str
) -> None:
    response = page.post("/solicitar", data=request_fields(page, **overrides))
    assert response.status_code == 422
    assert message in response.text
    if field_name != "form":
        assert f'id="f-{field_name}-error"' in response.text
        if field_name != "captcha":
            assert re.search(rf'id="f-{field_name}"[^>]*aria-invalid="true"', response.text, re.S)
    assert backend.requests == []


def test_answers_are_never_echoed_back(page: TestClient) -> None:
    response = page.post("/solicitar", data=request_fields(page, email="bad", **{"answers.mother_surname": "Secreto"}))
    assert response.status_code == 422 and "Secreto" not in response.text


def test_reset_by_link_completes_and_offers_the_login(page: TestClient, backend: FakeBackend) -> None:
    token = form_token(page, "/recuperar?request_id=r1&token=tok-123")
    fields = {"form_token": token, "request_id": "r1", "token": "tok-123", "new_password": "Nueva2025x",
              "new_password_confirm": "Nueva2025x"}
    response = page.post("/recuperar", data=fields, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/listo"
    assert backend.resets == [{"request_id": "r1", "token": "tok-123", "code": None, "new_password": "Nueva2025x",
                               "client_ip": backend.resets[0]["client_ip"]}]
    assert 'action="/ingresar"' in page.get("/listo").text


def test_reset_by_code(page: TestClient, backend: FakeBackend) -> None:
    token = form_token(page, "/revise-su-correo?request_id=r2")
    fields = {"form_token": token, "request_id": "r2", "code": "123456", "new_password": "Nueva2025x",
              "new_password_confirm": "Nueva2025x"}
    assert page.post("/recuperar", data=fields, follow_redirects=False).status_code == 303
    assert backend.resets[0]["code"] == "123456" and backend.resets[0]["token"] is None


def test_keys_that_differ_are_caught_before_clave_sees_them(page: TestClient, backend: FakeBackend) -> None:
    token = form_token(page, "/recuperar?request_id=r1&token=t")
    fields = {"form_token": token, "request_id": "r1", "token": "t", "new_password": "Nueva2025x",
              "new_password_confirm": "Otra2025x"}
    response = page.post("/recuperar", data=fields)
    assert response.status_code == 422 and 'id="f-new_password_confirm-error"' in response.text
    assert backend.resets == []


def test_policy_reasons_are_shown_next_to_the_key_field(page: TestClient, backend: FakeBackend) -> None:
    backend.reset_answer = ResetAnswer("rejected", ("password_too_short", "password_blocklisted"))
    token = form_token(page, "/recuperar?request_id=r1&token=t")
    fields = {"form_token": token, "request_id": "r1", "token": "t", "new_password": "zq9",
              "new_password_confirm": "zq9"}
    response = page.post("/recuperar", data=fields)
    assert response.status_code == 422
    error = re.search(r'<ul class="error" id="f-new_password-error">(.*?)</ul>', response.text, re.S)
    assert error and "Es demasiado corta." in error.group(1) and "muy común" in error.group(1)
    assert re.search(r'id="f-new_password"[^>]*aria-describedby="[^"]*f-new_password-error', response.text, re.S)
    assert "zq9" not in response.text  # the key is never echoed back


def test_a_dead_link_says_so_and_points_to_a_new_request(page: TestClient, backend: FakeBackend) -> None:
    backend.reset_answer = ResetAnswer("rejected", ("token_expired",))
    token = form_token(page, "/recuperar?request_id=r1&token=t")
    fields = {"form_token": token, "request_id": "r1", "token": "t", "new_password": "Nueva2025x",
              "new_password_confirm": "Nueva2025x"}
    response = page.post("/recuperar", data=fields)
    assert "El enlace o el código venció" in response.text and 'href="/solicitar"' in response.text


def test_no_answer_in_time_is_said_plainly(page: TestClient, backend: FakeBackend) -> None:
    backend.timeout = True
    token = form_token(page, "/recuperar?request_id=r1&token=t")
    fields = {"form_token": token, "request_id": "r1", "token": "t", "new_password": "Nueva2025x",
              "new_password_confirm": "Nueva2025x"}
    response = page.post("/recuperar", data=fields)
    assert response.status_code == 503 and "No recibimos respuesta a tiempo" in response.text


def test_login_checks_the_key(page: TestClient, backend: FakeBackend) -> None:
    backend.valid_keys[CEDULA] = "Nueva2025x"
    token = form_token(page, "/ingresar")
    good = page.post("/ingresar", data={"form_token": token, "national_id": CEDULA, "key": "Nueva2025x"})
    assert good.status_code == 200 and "Su clave es correcta" in good.text
    bad = page.post("/ingresar", data={"form_token": token, "national_id": CEDULA, "key": "Otra2025x"})
    assert bad.status_code == 401 and "no son correctas" in bad.text


OTHER_CEDULA = "0926687856"
LOGIN_WORDS = {
    "es": {"valid": "Su clave es correcta. Ya puede ingresar", "must_change": "debe reemplazarla por una nueva",
           "invalid": "La cédula o la clave no son correctas", "forgot": "¿Olvidó su clave?"},
    "en": {"valid": "Your key is correct. You can now sign in", "must_change": "you must replace it with a new one",
           "invalid": "The ID or the key is not correct", "forgot": "Forgot your key?"},
}


def login_as(page: TestClient, lang: str, national_id: str, key: str) -> Any:
    token = form_token(page, f"/ingresar?lang={lang}")
    return page.post(f"/ingresar?lang={lang}", data={"form_token": token, "national_id": national_id, "key": key})


@pytest.mark.parametrize("lang", ["es", "en"])
@pytest.mark.parametrize(
    ("national_id", "key", "status", "said"),
    [
        (CEDULA, "Nueva2025x", 200, "valid"),
        (OTHER_CEDULA, "abc", 200, "must_change"),  # a right key the import took with --legacy-keys
        (CEDULA, "Otra2025x", 401, "invalid"),
        (OTHER_CEDULA, "abd", 401, "invalid"),  # a wrong key for a must-change account
    ],
)
def test_login_says_whether_the_key_is_right_and_whether_it_must_be_changed(
    page: TestClient, backend: FakeBackend, lang: str, national_id: str, key: str, status: int, said: str
) -> None:
    backend.valid_keys.update({CEDULA: "Nueva2025x", OTHER_CEDULA: "abc"})
    backend.must_change.add(OTHER_CEDULA)
    response = login_as(page, lang, national_id, key)
    words = LOGIN_WORDS[lang]
    assert response.status_code == status and f'<html lang="{lang}">' in response.text
    assert words[said] in response.text
    for other in {"valid", "must_change", "invalid"} - {said}:
        assert words[other] not in response.text
    # Only a must-change key is offered the way to set a new one.
    offered = re.search(r'<a href="/solicitar" id="login-forgot">([^<]+)</a>', response.text)
    assert bool(offered) == (said == "must_change")
    if offered:
        assert offered.group(1).startswith(words["forgot"])


@pytest.mark.parametrize("lang", ["es", "en"])
def test_a_wrong_key_for_a_must_change_account_reads_as_an_unknown_id(
    page: TestClient, backend: FakeBackend, lang: str
) -> None:
    backend.valid_keys[OTHER_CEDULA] = "abc"
    backend.must_change.add(OTHER_CEDULA)

    def shown(response: Any) -> str:  # the page without what differs by design (form token, typed ID)
        text = re.sub(r'name="form_token" value="[^"]+"', "", response.text)
        return text.replace(OTHER_CEDULA, "ID").replace(CEDULA, "ID")

    wrong = login_as(page, lang, OTHER_CEDULA, "abd")
    unknown = login_as(page, lang, CEDULA, "abd")
    assert wrong.status_code == unknown.status_code == 401
    assert shown(wrong) == shown(unknown)


def test_english_switch_sticks(page: TestClient) -> None:
    html = page.get("/solicitar").text
    switch = re.search(r'id="lang-switch" href="([^"]+)"', html)
    assert switch and "lang=en" in switch.group(1)
    english = page.get(switch.group(1).replace("&amp;", "&"))
    assert '<html lang="en">' in english.text and "Recover your key" in english.text
    assert '<html lang="en">' in page.get("/ingresar").text  # the choice is kept in a cookie


def test_every_page_sends_no_referrer_and_no_store(page: TestClient) -> None:
    for path in ("/solicitar", "/recuperar?request_id=r&token=t", "/revise-su-correo?request_id=r", "/ingresar"):
        headers = page.get(path).headers
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_no_token_reaches_the_log(page: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="clave_page"):
        page.get("/recuperar?request_id=r1&token=secret-token-value")
    assert any("/recuperar" in r.getMessage() for r in caplog.records)
    assert all("secret-token-value" not in r.getMessage() for r in caplog.records)


def test_production_refuses_the_stand_in_captcha() -> None:
    assert PageSettings(clave_env="production", page_captcha="stand-in").problems()
    assert PageSettings(clave_env="production", page_captcha="external").problems() == []


def test_production_pins_https_and_a_host_only_form_cookie(backend: FakeBackend) -> None:
    # HSTS: the token-bearing reset page is never fetched over plain HTTP again. The form
    # cookie is a __Host- cookie (Secure, Path=/, no Domain): a sibling subdomain cannot plant
    # its own value and so forge the double-submit pair.
    settings = PageSettings(clave_env="production", page_captcha="external")
    client = TestClient(create_app(settings, backend, PortalCaptcha()), base_url="https://portal.example.org")
    answer = client.get("/ingresar")
    assert answer.headers["strict-transport-security"].startswith("max-age=31536000")
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("__Host-clave_form=")
    assert "secure" in cookie.lower() and "path=/" in cookie.lower() and "domain=" not in cookie.lower()
    backend.valid_keys[CEDULA] = "Nueva2025x"
    token = form_token(client, "/ingresar")
    good = client.post("/ingresar", data={"form_token": token, "national_id": CEDULA, "key": "Nueva2025x"})
    assert good.status_code == 200  # the double-submit check reads the __Host- cookie
    # A plain-named cookie planted by a sibling subdomain is not the form's cookie.
    client.cookies.clear()
    client.cookies.set("clave_form", "planted")
    forged = client.post("/ingresar", data={"form_token": "planted", "national_id": CEDULA, "key": "Nueva2025x"})
    assert forged.status_code == 422


def test_development_sends_no_hsts(page: TestClient) -> None:
    assert "strict-transport-security" not in page.get("/ingresar").headers


class PortalCaptcha:
    """A portal's own captcha (what PAGE_CAPTCHA=external expects create_app to be given)."""

    def fields(self) -> str:
        return '<input type="hidden" name="portal_captcha" value="ok">'

    async def passed(self, form: Mapping[str, str], client_ip: str) -> bool:
        return form.get("portal_captcha") == "ok"


def test_an_external_captcha_that_was_not_given_stops_the_page(backend: FakeBackend) -> None:
    # Before: PAGE_CAPTCHA=external passed the settings check and the page then served the
    # development checkbox in its place (python -m clave_page gives no captcha).
    external = PageSettings(clave_env="production", page_captcha="external")
    with pytest.raises(UnsafeSettings, match="PAGE_CAPTCHA=external"):
        create_app(external, backend)
    with pytest.raises(UnsafeSettings, match="PAGE_CAPTCHA=external"):
        create_app(external, backend, StandInCaptcha())
    with pytest.raises(UnsafeSettings, match="stand-in captcha"):
        create_app(PageSettings(clave_env="production", page_captcha="stand-in"), backend, StandInCaptcha())
    page = TestClient(create_app(external, backend, PortalCaptcha()), base_url="https://portal.example.org")
    assert 'name="portal_captcha"' in page.get("/solicitar").text
