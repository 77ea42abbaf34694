"""The reference page in a real browser, as citizens use it: Debian's chromium, headless,
driven by Playwright (no browser download), against the page served by `python -m
clave_page` on the real stack. Each step leaves a screenshot under var/screenshots/page/.

Covered: a citizen recovers through the mail's link and logs in with the new key; a second
citizen types the code, by keyboard only; an employer recovers with RUC and representative;
a key against the policy shows its reasons next to the field; the English switch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from shared.acl import PORTAL
from tests.e2e.conftest import World, cli_env
from tools.mail import body_text, extract_code, extract_link
from tools.testdata import Citizen
from tools.workbench import WorkbenchSettings

pytestmark = pytest.mark.e2e

SHOTS = Path(os.environ.get("VAR_DIR", "var")) / "screenshots" / "page"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
# Chromium as root in a closed network: no sandbox (no user namespaces), and none of the
# background connections that this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def page_port() -> int:
    return int(os.environ.get("PAGE_PORT", "8000"))


def wait_healthy(url: str, process: subprocess.Popen[bytes], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the page exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)  # polling a port with a deadline, not synchronising on time
    raise AssertionError(f"the page did not answer {url} within {deadline_s} s")


@pytest.fixture(scope="module")
def page_url(stack: WorkbenchSettings) -> Iterator[str]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: .ci/run installs Debian's chromium (apt-get install chromium)")
    base = f"http://127.0.0.1:{page_port()}"
    log_path = Path(os.environ.get("VAR_DIR", "var")) / "log" / "page-test.log"
    env = {**cli_env(PORTAL), "CLAVE_ENV": "development", "PAGE_PORT": str(page_port())}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "clave_page"], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(f"{base}/healthz", process)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=20)
    assert "token=" not in log_path.read_text(errors="replace"), "a token reached the page's log"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def tab(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(locale="es-EC")
    page = await context.new_page()
    yield page
    await context.close()


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def fill_request(page: Page, c: Citizen, labels: dict[str, str]) -> None:
    if c.profile == "employer":
        await page.get_by_label(labels["employer"]).check()
        await page.get_by_label(labels["representative_id"]).fill(c.representative_id or "")
    await page.get_by_label(labels["national_id"]).fill(c.national_id)
    await page.get_by_label(labels["email"], exact=True).fill(c.email)
    for question, answer in c.answers.items():
        await page.locator(f"#f-answers-{question}").fill(answer)
    await page.get_by_label(labels["captcha"]).check()


ES = {
    "employer": "Empleador (RUC y representante legal)",
    "representative_id": "Cédula del representante legal",
    "national_id": "Número de cédula o RUC",
    "email": "Correo electrónico registrado",
    "captcha": "No soy un robot",
}


async def request_through_page(tab: Page, page_url: str, c: Citizen, name: str) -> str:
    await tab.goto(f"{page_url}/solicitar")
    await fill_request(tab, c, ES)
    await shot(tab, f"{name}-1-request")
    await tab.get_by_role("button", name="Enviar solicitud").click()
    await expect(tab.get_by_role("heading", name="Revise su correo electrónico")).to_be_visible()
    await shot(tab, f"{name}-2-check-mail")
    request_id = re.search(r"request_id=([^&]+)", tab.url)
    assert request_id, tab.url
    return request_id.group(1)


async def set_new_key(tab: Page, key: str) -> None:
    await tab.get_by_label("Clave nueva", exact=True).fill(key)
    await tab.get_by_label("Repita la clave nueva").fill(key)
    await tab.get_by_role("button", name="Cambiar mi clave").click()


async def try_key(tab: Page, c: Citizen, key: str, name: str) -> None:
    await tab.get_by_label("Número de cédula o RUC").fill(c.national_id)
    await tab.get_by_label("Clave", exact=True).fill(key)
    await tab.get_by_role("button", name="Ingresar").click()
    await expect(tab.locator("#login-result")).to_have_text(re.compile("Su clave es correcta"))
    await shot(tab, f"{name}-5-login")


async def test_a_citizen_recovers_through_the_link_and_logs_in(world: World, page_url: str, tab: Page) -> None:
    c = await world.citizen()
    request_id = await request_through_page(tab, page_url, c, "link")
    mail, _token = await world.recovery_mail(request_id)
    link, _, _ = extract_link(mail)
    assert link.startswith(f"{page_url}/recuperar?"), f"the mail's link must open this page: {link}"
    await tab.goto(link)
    await expect(tab.get_by_role("heading", name="Crear una clave nueva")).to_be_visible()
    await shot(tab, "link-3-reset")
    await set_new_key(tab, "Nueva2026link")
    await expect(tab.get_by_role("heading", name="Su clave fue cambiada")).to_be_visible()
    await shot(tab, "link-4-done")
    await try_key(tab, c, "Nueva2026link", "link")


async def tab_to(tab: Page, element_id: str, limit: int = 40) -> None:
    """Move the focus with the Tab key only, as a keyboard user does."""
    for _ in range(limit):
        await tab.keyboard.press("Tab")
        if await tab.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
    raise AssertionError(f"#{element_id} cannot be reached with the Tab key")


async def test_a_second_citizen_types_the_code_by_keyboard(world: World, page_url: str, tab: Page) -> None:
    c = await world.citizen()
    request_id = await request_through_page(tab, page_url, c, "code")
    mail, _ = await world.recovery_mail(request_id)
    code = extract_code(mail)
    await tab_to(tab, "f-code")
    await tab.keyboard.type(code)
    await tab_to(tab, "f-new_password")
    await tab.keyboard.type("Nueva2026code")
    await tab.keyboard.press("Tab")
    await tab.keyboard.type("Nueva2026code")
    await shot(tab, "code-3-typed")
    await tab.keyboard.press("Enter")
    await expect(tab.get_by_role("heading", name="Su clave fue cambiada")).to_be_visible()
    await shot(tab, "code-4-done")
    await try_key(tab, c, "Nueva2026code", "code")


async def test_an_employer_recovers_with_ruc_and_representative(world: World, page_url: str, tab: Page) -> None:
    c = await world.citizen(profile="employer")
    assert c.representative_id and len(c.national_id) == 13
    request_id = await request_through_page(tab, page_url, c, "employer")
    mail, _ = await world.recovery_mail(request_id)
    link, _, _ = extract_link(mail)
    await tab.goto(link)
    await set_new_key(tab, "Empresa2026x")
    await expect(tab.get_by_role("heading", name="Su clave fue cambiada")).to_be_visible()
    await try_key(tab, c, "Empresa2026x", "employer")


async def test_a_key_against_the_policy_shows_its_reasons(world: World, page_url: str, tab: Page) -> None:
    c = await world.citizen()
    request_id = await request_through_page(tab, page_url, c, "policy")
    mail, _ = await world.recovery_mail(request_id)
    link, _, _ = extract_link(mail)
    await tab.goto(link)
    await set_new_key(tab, "abc123")
    reasons = tab.locator("#f-new_password-error")
    await expect(reasons).to_contain_text("Es una clave muy común")
    assert await tab.get_by_label("Clave nueva", exact=True).get_attribute("aria-invalid") == "true"
    await shot(tab, "policy-3-reasons")
    await set_new_key(tab, "Segura2026x")  # the link still works after a refused key
    await expect(tab.get_by_role("heading", name="Su clave fue cambiada")).to_be_visible()
    # The key-changed notice has arrived (waited for, not assumed): no mail names the refused key.
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and "recuperar?" not in body_text(m))
    assert not [m for m in world.mails_to(c.email) if "abc123" in body_text(m)]


async def test_the_english_switch(page_url: str, tab: Page) -> None:
    await tab.goto(f"{page_url}/solicitar")
    await tab.get_by_role("link", name="English").click()
    await expect(tab.get_by_role("heading", name="Recover your key")).to_be_visible()
    assert await tab.locator("html").get_attribute("lang") == "en"
    await tab.goto(f"{page_url}/ingresar")  # the choice sticks
    await expect(tab.get_by_role("heading", name="Sign in with your key")).to_be_visible()
    await shot(tab, "english-1-login")
