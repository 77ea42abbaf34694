"""The page's words in Spanish (the default) and English.

Reason codes from Clave's contract (README, "Reset reasons") map to sentences here; a code
the page does not know yet is shown with a generic sentence, so a new reason never breaks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

Lang = Literal["es", "en"]
LANGS: Final[tuple[Lang, ...]] = ("es", "en")

_ES: Final[dict[str, str]] = {
    "institution": "Instituto Ecuatoriano de Seguridad Social",
    "title.request": "Recuperar su clave",
    "title.check_mail": "Revise su correo electrónico",
    "title.reset": "Crear una clave nueva",
    "title.done": "Su clave fue cambiada",
    "title.login": "Ingresar con su clave",
    "lang.switch": "English",
    "skip": "Saltar al contenido",
    "errors.summary": "Revise los campos marcados:",
    "field.profile": "¿Cómo usa el portal?",
    "profile.affiliate": "Afiliado o pensionista (cédula)",
    "profile.employer": "Empleador (RUC y representante legal)",
    "field.national_id": "Número de cédula o RUC",
    "hint.national_id": "Afiliados: los 10 dígitos de su cédula. Empleadores: los 13 dígitos del RUC.",
    "field.representative_id": "Cédula del representante legal",
    "hint.representative_id": "Solo empleadores.",
    "field.email": "Correo electrónico registrado",
    "hint.email": "El mismo correo que tiene registrado con nosotros.",
    "legend.questions": "Preguntas de seguridad",
    "question.birth_date": "Fecha de nacimiento (AAAA-MM-DD)",
    "question.fingerprint_code": "Código dactilar (al reverso de la cédula)",
    "question.mother_surname": "Primer apellido de su madre",
    "field.captcha": "No soy un robot",
    "hint.captcha": "Verificación de desarrollo: en producción el portal coloca su propio captcha.",
    "submit.request": "Enviar solicitud",
    "check_mail.body": (
        "Si los datos que ingresó coinciden con los que tenemos registrados, en unos minutos recibirá "
        "un correo con un enlace y un código para crear una clave nueva. El enlace vence en 30 minutos "
        "y el código en 10."
    ),
    "check_mail.spam": "Si no lo ve, revise también la carpeta de correo no deseado.",
    "check_mail.code_intro": "¿Recibió un código? Escríbalo aquí junto con su clave nueva.",
    "field.code": "Código de 6 dígitos",
    "field.new_password": "Clave nueva",
    "field.new_password_confirm": "Repita la clave nueva",
    "submit.reset": "Cambiar mi clave",
    "reset.intro": "Escriba su clave nueva dos veces.",
    "policy.seed": (
        "Entre 6 y 15 caracteres, solo letras sin tilde y números, con al menos una letra y un número. "
        "No use claves comunes como abc123."
    ),
    "policy.nist": (
        "Entre 15 y 64 caracteres; puede usar espacios, tildes y símbolos. Una frase larga es más segura. "
        "No use claves comunes."
    ),
    "done.body": "Su clave fue cambiada. Le enviamos un correo de confirmación.",
    "done.try": "Pruebe su clave nueva:",
    "submit.login": "Ingresar",
    "field.key": "Clave",
    "login.valid": "Su clave es correcta. Ya puede ingresar al portal.",
    "login.must_change": "Su clave es correcta, pero debe reemplazarla por una nueva antes de usarla en el portal.",
    "login.invalid": "La cédula o la clave no son correctas.",
    "error.required": "Este campo es obligatorio.",
    "error.national_id": "Escriba una cédula de 10 dígitos o un RUC de 13 dígitos válidos.",
    "error.representative_id": "Escriba la cédula de 10 dígitos del representante legal.",
    "error.email": "Escriba un correo electrónico válido.",
    "error.code": "El código tiene 6 dígitos.",
    "error.confirm": "Las dos claves no son iguales.",
    "error.captcha": "Confirme que no es un robot.",
    "error.form_expired": "El formulario venció. Vuelva a enviarlo.",
    "error.timeout": "No recibimos respuesta a tiempo. Intente de nuevo en unos minutos.",
    "error.request_invalid": "No pudimos procesar su solicitud: algún dato no tiene el formato esperado. "
    "Revise los datos y vuelva a enviarla.",
    "error.no_token": "Falta el enlace o el código. Abra el enlace del correo o escriba el código.",
    "reason.token_invalid": "El enlace o el código no es válido. Revise el último correo que le enviamos.",
    "reason.token_expired": "El enlace o el código venció. Solicite uno nuevo.",
    "reason.token_used": "Este enlace ya fue usado. Si no fue usted, solicite uno nuevo.",
    "reason.code_attempts_exceeded": "Demasiados códigos incorrectos. Use el enlace del correo o solicite uno nuevo.",
    "reason.reset_invalid": "La solicitud no es válida. Vuelva a empezar desde el correo.",
    "reason.password_too_short": "Es demasiado corta.",
    "reason.password_too_long": "Es demasiado larga.",
    "reason.password_not_alphanumeric": "Use solo letras sin tilde y números.",
    "reason.password_needs_letter_and_digit": "Debe tener al menos una letra y un número.",
    "reason.password_blocklisted": "Es una clave muy común: la probarían primero.",
    "reason.password_not_printable": "Tiene caracteres que no se pueden escribir.",
    "reason.password_reused": "Es igual a una de sus últimas claves.",
    "reason.unknown": "No pudimos cambiar su clave. Solicite un correo nuevo.",
    "link.start": "Solicitar un correo nuevo",
    "link.login": "Probar mi clave",
    "link.forgot": "¿Olvidó su clave? Cree una nueva",
}

_EN: Final[dict[str, str]] = {
    "institution": "Ecuadorian Social Security Institute",
    "title.request": "Recover your key",
    "title.check_mail": "Check your e-mail",
    "title.reset": "Choose a new key",
    "title.done": "Your key was changed",
    "title.login": "Sign in with your key",
    "lang.switch": "Español",
    "skip": "Skip to content",
    "errors.summary": "Please check the marked fields:",
    "field.profile": "How do you use the portal?",
    "profile.affiliate": "Affiliate or pensioner (ID card)",
    "profile.employer": "Employer (RUC and legal representative)",
    "field.national_id": "ID card or RUC number",
    "hint.national_id": "Affiliates: the 10 digits of your ID card. Employers: the 13 digits of the RUC.",
    "field.representative_id": "Legal representative's ID card",
    "hint.representative_id": "Employers only.",
    "field.email": "Registered e-mail address",
    "hint.email": "The address you have on file with us.",
    "legend.questions": "Security questions",
    "question.birth_date": "Date of birth (YYYY-MM-DD)",
    "question.fingerprint_code": "Fingerprint code (on the back of the ID card)",
    "question.mother_surname": "Your mother's first surname",
    "field.captcha": "I am not a robot",
    "hint.captcha": "Development check: in production the portal puts its own captcha here.",
    "submit.request": "Send request",
    "check_mail.body": (
        "If the details you typed match our records, you will receive an e-mail within minutes with a "
        "link and a code to choose a new key. The link expires in 30 minutes and the code in 10."
    ),
    "check_mail.spam": "If you do not see it, check your spam folder too.",
    "check_mail.code_intro": "Got a code? Type it here with your new key.",
    "field.code": "6-digit code",
    "field.new_password": "New key",
    "field.new_password_confirm": "Repeat the new key",
    "submit.reset": "Change my key",
    "reset.intro": "Type your new key twice.",
    "policy.seed": (
        "6 to 15 characters, only unaccented letters and digits, with at least one letter and one digit. "
        "Do not use common keys such as abc123."
    ),
    "policy.nist": (
        "15 to 64 characters; spaces, accents and symbols are allowed. A long phrase is safer. "
        "Do not use common keys."
    ),
    "done.body": "Your key was changed. We sent you a confirmation e-mail.",
    "done.try": "Try your new key:",
    "submit.login": "Sign in",
    "field.key": "Key",
    "login.valid": "Your key is correct. You can now sign in to the portal.",
    "login.must_change": "Your key is correct, but you must replace it with a new one before you use it on the portal.",
    "login.invalid": "The ID or the key is not correct.",
    "error.required": "This field is required.",
    "error.national_id": "Type a valid 10-digit ID card or 13-digit RUC.",
    "error.representative_id": "Type the legal representative's 10-digit ID card.",
    "error.email": "Type a valid e-mail address.",
    "error.code": "The code has 6 digits.",
    "error.confirm": "The two keys are not the same.",
    "error.captcha": "Confirm that you are not a robot.",
    "error.form_expired": "The form expired. Please send it again.",
    "error.timeout": "We got no answer in time. Please try again in a few minutes.",
    "error.request_invalid": "We could not process your request: some data is not in the expected format. "
    "Check the data and send it again.",
    "error.no_token": "The link or the code is missing. Open the link in the e-mail or type the code.",
    "reason.token_invalid": "The link or code is not valid. Check the latest e-mail we sent you.",
    "reason.token_expired": "The link or code has expired. Request a new one.",
    "reason.token_used": "This link was already used. If it was not you, request a new one.",
    "reason.code_attempts_exceeded": "Too many wrong codes. Use the link in the e-mail or request a new one.",
    "reason.reset_invalid": "The request is not valid. Start again from the e-mail.",
    "reason.password_too_short": "It is too short.",
    "reason.password_too_long": "It is too long.",
    "reason.password_not_alphanumeric": "Use only unaccented letters and digits.",
    "reason.password_needs_letter_and_digit": "It needs at least one letter and one digit.",
    "reason.password_blocklisted": "It is a very common key: attackers try it first.",
    "reason.password_not_printable": "It has characters that cannot be typed.",
    "reason.password_reused": "It is the same as one of your last keys.",
    "reason.unknown": "We could not change your key. Request a new e-mail.",
    "link.start": "Request a new e-mail",
    "link.login": "Try my key",
    "link.forgot": "Forgot your key? Choose a new one",
}

CATALOGS: Final[dict[Lang, dict[str, str]]] = {"es": _ES, "en": _EN}


def translator(lang: Lang) -> Callable[[str], str]:
    catalog = CATALOGS[lang]

    def t(key: str) -> str:
        return catalog.get(key, CATALOGS["es"].get(key, key))

    return t


def reason_text(lang: Lang, code: str) -> str:
    catalog = CATALOGS[lang]
    return catalog.get(f"reason.{code}", catalog["reason.unknown"])


def question_label(lang: Lang, question: str) -> str:
    return CATALOGS[lang].get(f"question.{question}", question.replace("_", " ").capitalize())
