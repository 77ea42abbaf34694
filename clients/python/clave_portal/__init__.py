"""clave_portal: the portal's side of Clave's topic contract (docs/asyncapi.yaml).

from clave_portal import HpkeSealer, PortalClient, PortalSettings

sealer = HpkeSealer.from_file("sealing-public.pem")  # Clave's public key (PORTAL_INPUT=sealed)
async with PortalClient(PortalSettings.from_properties("portal.properties"), sealer=sealer) as clave:
    request_id = await clave.request_recovery(national_id=..., email=..., answers=..., client_ip=...,
                                              captcha_passed=True)
    outcome = await clave.submit_reset(request_id, token=token, new_password=new_key)
    ok = await clave.check_credentials(national_id, key, client_ip=ip)
    result = await clave.update_contact(national_id, key, client_ip=ip, backup_email=..., phone=...)
    async for change in clave.key_changes(group_id="portal-sessions"):  # a `portal…` group
        end_other_sessions(change.national_id)
"""

from clave_portal.client import PortalClient
from clave_portal.errors import ClaveError, ClaveTimeout
from clave_portal.events import CONTENT_TYPE, cloud_event
from clave_portal.models import ContactResult, KeyChange, LoginResult, Outcome, Reason
from clave_portal.sealing import HpkeSealer, InputSealer, PlainInput
from clave_portal.settings import PortalSettings

__all__ = [
    "CONTENT_TYPE",
    "ClaveError",
    "ClaveTimeout",
    "ContactResult",
    "HpkeSealer",
    "InputSealer",
    "KeyChange",
    "LoginResult",
    "Outcome",
    "PlainInput",
    "PortalClient",
    "PortalSettings",
    "Reason",
    "cloud_event",
]
