"""Clave's reference recovery page.

A server-rendered page (FastAPI + Jinja2, no JavaScript needed) that shows a portal team
how to put Clave in front of citizens: the request form, the same "check your e-mail"
page for every outcome, the reset page the recovery mail links to, and a login form that
tries the new key. It talks to Clave only through the `clave_portal` client.
"""
