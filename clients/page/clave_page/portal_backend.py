"""The page's backend on the `clave_portal` client: the portal principal's Kafka settings
(KAFKA_CLIENT_PROPERTIES), one client for the page's lifetime."""

from __future__ import annotations

from typing import Literal

from clave_portal import PortalClient, PortalSettings

from clave_page.backend import LoginAnswer, RequestAnswer, ResetAnswer


class PortalBackend:
    def __init__(self, client: PortalClient) -> None:
        self.client = client

    @classmethod
    def from_environment(cls, timeout_s: float) -> PortalBackend:
        return cls(PortalClient(PortalSettings.from_env(), source="/portal/reference-page", timeout=timeout_s))

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        await self.client.stop()

    async def request_recovery(
        self,
        *,
        profile: Literal["affiliate", "employer"],
        national_id: str,
        representative_id: str | None,
        email: str,
        answers: dict[str, str],
        captcha_passed: bool,
        locale: Literal["es", "en"],
        client_ip: str,
    ) -> str:
        return await self.client.request_recovery(
            national_id=national_id, email=email, answers=answers, client_ip=client_ip,
            captcha_passed=captcha_passed, profile=profile, representative_id=representative_id, locale=locale,
        )

    async def request_answer(self, request_id: str) -> RequestAnswer:
        outcome = await self.client.request_outcome(request_id)
        return RequestAnswer("accepted" if outcome.accepted else "rejected", outcome.reasons)

    async def submit_reset(
        self, request_id: str, *, token: str | None, code: str | None, new_password: str, client_ip: str
    ) -> ResetAnswer:
        outcome = await self.client.submit_reset(
            request_id, new_password=new_password, token=token, code=code, client_ip=client_ip
        )
        return ResetAnswer("completed" if outcome.completed else "rejected", outcome.reasons)

    async def login(self, national_id: str, key: str, client_ip: str) -> LoginAnswer:
        # The full answer, not check_credentials' bool: the page tells a must-change key apart.
        result = await self.client.login(national_id, key, client_ip=client_ip)
        return LoginAnswer(result.valid, result.must_change)
