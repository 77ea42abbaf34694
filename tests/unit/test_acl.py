"""The Kafka ACLs (shared/acl.py): made from the topic contract's table (shared/contract.py,
which tests/unit/test_contract.py checks against what the services really consume and emit),
they cover every topic and grant nothing beyond least privilege. The broker enforcing it
is tested end to end in tests/e2e/test_acls.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import acl, contract
from shared import topics as t
from shared.acl import AUDITOR, OPERATOR, PORTAL, SERVICES, Operation, PatternType, ResourceType, all_acls
from shared.kafka import connection, read_properties, render_properties
from shared.settings import PlatformSettings

ALL_TOPICS = {spec.name for spec in t.all_topics(6, 1, 1)}


def topic_acls(principal: str, operation: Operation) -> set[str]:
    return {
        a.resource_name
        for a in all_acls()
        if a.principal == principal and a.operation is operation and a.resource_type is ResourceType.TOPIC
    }


# Declared in the contract ahead of their rules in the tokens service (the anti-oracle decoy,
# the code lockout): identity already writes identity.declined and reads tokens.code_rejected,
# tokens does neither yet. Until shared/contract.py says tokens does, nobody may write
# tokens.code_rejected (nor identity.declined's DLQ) and nobody reads identity.declined.
NOT_YET_WRITTEN: set[str] = set()  # every topic has its writer now
NOT_YET_READ: set[str] = set()


def test_every_topic_is_covered_and_every_acl_names_a_real_topic() -> None:
    acls = all_acls()
    named = {a.resource_name for a in acls if a.resource_type is ResourceType.TOPIC}
    assert named <= ALL_TOPICS, f"ACLs for topics that do not exist: {named - ALL_TOPICS}"
    # The operator key registry is written by admin alone (a super user: no ACL at all).
    assert {topic for topic in ALL_TOPICS if not acl.writers(topic)} == NOT_YET_WRITTEN | set(contract.ADMIN_ONLY)
    # DLQs and the notifier's reports have no consumer in Clave: only admin reads them.
    unread = {topic for topic in ALL_TOPICS if not acl.readers(topic) and not topic.endswith(t.DLQ_SUFFIX)}
    assert unread == {t.NOTIFIER_SENT, t.NOTIFIER_FAILED, *NOT_YET_READ}


def test_every_consumed_topic_has_a_dlq_its_consumers_may_write() -> None:
    for service, spec in SERVICES.items():
        for topic in spec.consumes:
            assert t.dlq(topic) in ALL_TOPICS, f"{service} consumes {topic} but {t.dlq(topic)} is never created"
            assert service in acl.writers(t.dlq(topic))


def test_acls_come_from_the_contract_table() -> None:
    """One table: shared/acl.py grants what shared/contract.py lists (which
    tests/unit/test_contract.py checks against each service's subscriptions and code), and
    every party of the contract has its principal."""
    assert acl.SERVICES is contract.SERVICES
    assert set(acl.PRINCIPALS) == {acl.ADMIN, *contract.SERVICES, *contract.CLIENTS}
    assert {PORTAL, OPERATOR, AUDITOR} == set(contract.CLIENTS)
    for service in SERVICES:
        assert topic_acls(service, Operation.WRITE) == set(contract.writes(service))
        assert topic_acls(service, Operation.READ) == set(SERVICES[service].consumes)
    for client, spec in contract.CLIENTS.items():
        assert topic_acls(client, Operation.WRITE) == set(spec.produces)
        assert topic_acls(client, Operation.READ) == set(spec.consumes)


def test_services_write_only_their_topics_dlqs_and_the_audit_log() -> None:
    for service, spec in SERVICES.items():
        wanted = {*spec.produces, *(t.dlq(x) for x in spec.consumes), t.AUDIT_EVENTS}
        assert topic_acls(service, Operation.WRITE) == wanted
        assert topic_acls(service, Operation.READ) == set(spec.consumes)
        mine = [a for a in all_acls() if a.principal == service]
        groups = {a.resource_name for a in mine if a.resource_type is ResourceType.GROUP}
        assert groups == {f"clave-{service}"}


def test_people_facing_principals_get_least_privilege() -> None:
    assert topic_acls(PORTAL, Operation.WRITE) == {
        t.RECOVERY_REQUESTS,
        t.RECOVERY_RESETS,
        t.LOGIN_CHECKS,
        t.CONTACT_UPDATES,
    }
    assert topic_acls(PORTAL, Operation.READ) == {
        t.RECOVERY_OUTCOMES,
        t.LOGIN_RESULTS,
        t.ACCOUNT_KEY_CHANGED,
        t.CONTACT_RESULTS,
    }
    assert topic_acls(OPERATOR, Operation.WRITE) == {t.IDENTITY_COMMANDS}
    # The operator sees its commands' results on their own topic, not the whole audit log.
    assert topic_acls(OPERATOR, Operation.READ) == {t.IDENTITY_COMMAND_RESULTS}
    assert topic_acls(AUDITOR, Operation.WRITE) == set()
    assert topic_acls(AUDITOR, Operation.READ) == {t.AUDIT_EVENTS}
    prefixed = {(a.principal, a.resource_name) for a in all_acls() if a.pattern is PatternType.PREFIXED}
    assert prefixed == {(PORTAL, "portal"), (AUDITOR, "auditor")}  # their consumer groups only


def test_internal_topics_have_one_writer_and_the_secrets_one_reader() -> None:
    # Forging an internal event needs that service's credentials: the portal's are not enough.
    for topic in (t.IDENTITY_VERIFIED, t.IDENTITY_EMAIL_CHANGED, t.IDENTITY_ACCOUNT_REGISTERED):
        assert acl.writers(topic) == {"identity"}
    assert acl.writers(t.TOKENS_ISSUED) == acl.writers(t.TOKENS_REDEEMED) == {"tokens"}
    assert acl.writers(t.PASSWORD_UPDATED) == acl.writers(t.PASSWORD_REJECTED) == {"password"}
    assert acl.writers(t.RECOVERY_OUTCOMES) == {"identity", "tokens"}
    assert acl.writers(t.IDENTITY_COMMANDS) == {OPERATOR}
    assert acl.writers(t.AUDIT_EVENTS) == set(SERVICES)
    # Sealed link/code and sealed keys travel here: only their one reader may fetch them.
    assert acl.readers(t.TOKENS_ISSUED) == {"notifier"}
    assert acl.readers(t.TOKENS_REDEEMED) == {"password"}
    assert acl.readers(t.RECOVERY_REQUESTS) == {"identity"}
    assert acl.readers(t.RECOVERY_RESETS) == {"tokens"}
    # Keys typed at login: only the password service reads them; only it answers.
    assert acl.readers(t.LOGIN_CHECKS) == {"password"}
    assert acl.writers(t.LOGIN_RESULTS) == acl.writers(t.ACCOUNT_KEY_CHANGED) == {"password"}
    # Contact updates carry the key too: the password service alone reads them; it passes only
    # an authorised change (no key) to identity, which alone applies it.
    assert acl.readers(t.CONTACT_UPDATES) == {"password"}
    assert acl.writers(t.PASSWORD_CONTACT_AUTHORIZED) == {"password"}
    assert acl.readers(t.PASSWORD_CONTACT_AUTHORIZED) == {"identity"}
    assert acl.writers(t.IDENTITY_CONTACT_CHANGED) == {"identity"}
    assert acl.writers(t.CONTACT_RESULTS) == {"identity", "password"}


def test_no_cluster_wildcard_or_admin_acls() -> None:
    for a in all_acls():
        assert a.resource_type in (ResourceType.TOPIC, ResourceType.GROUP), a
        assert "*" not in a.resource_name, a
        assert a.operation in (Operation.READ, Operation.WRITE), a
        assert a.principal in acl.PRINCIPALS and a.principal not in acl.SUPER_USERS, a


def test_properties_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tokens.properties"
    text = render_properties("b1:9093,b2:9093", "SASL_SSL", "SCRAM-SHA-512", "tokens", "pw=with=eq", "/ca.pem")
    path.write_text(text)
    settings = connection(PlatformSettings(kafka_client_properties=str(path), kafka_sasl_username="admin"))
    assert settings.kafka_bootstrap_servers == "b1:9093,b2:9093"
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_username == "tokens"  # the file wins over the environment
    assert settings.kafka_sasl_password == "pw=with=eq"
    assert settings.kafka_ssl_cafile == "/ca.pem"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("ssl.key.location=/k.pem\n", "unsupported property 'ssl.key.location'"),
        ("security.protocol=SASL_TLS\n", "security.protocol must be one of"),
        ("sasl.mechanism=GSSAPI\n", "sasl.mechanism must be one of"),
        ("sasl.password\n", "expected key=value"),
    ],
)
def test_properties_errors_name_the_key_never_a_value(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "x.properties"
    path.write_text("# comment\nsasl.password=s3cret-value\n" + text)
    with pytest.raises(ValueError, match=error) as caught:
        read_properties(path)
    assert "s3cret-value" not in str(caught.value)
