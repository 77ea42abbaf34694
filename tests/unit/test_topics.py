"""Topic specs: what citizens typed leaves the broker's disk within 2 hours."""

from __future__ import annotations

from shared.settings import PlatformSettings
from shared.topics import (
    AUDIT_EVENTS,
    CONSUMED,
    HOUR_MS,
    LOGIN_CHECKS,
    PORTAL_INPUTS,
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    all_topics,
    dlq,
)

S = PlatformSettings()
SPECS = {
    s.name: s for s in all_topics(S.kafka_topic_partitions, S.portal_topic_retention_ms, S.internal_topic_retention_ms)
}


def test_portal_inputs_are_gone_within_two_hours() -> None:
    assert {RECOVERY_REQUESTS, RECOVERY_RESETS, LOGIN_CHECKS} <= set(PORTAL_INPUTS)  # keys typed at login too
    for name in PORTAL_INPUTS:
        spec = SPECS[name]
        configs = spec.configs()
        assert configs["retention.ms"] == str(HOUR_MS)
        assert configs["segment.ms"] == str(HOUR_MS // 2)  # not the broker's 7 days
        assert configs["message.timestamp.type"] == "LogAppendTime"  # the broker's clock counts
        assert configs["file.delete.delay.ms"] == "60000"
        kept = spec.kept_at_most_ms()
        assert kept is not None and kept <= 2 * HOUR_MS


def test_other_topics_keep_the_broker_defaults_but_retention() -> None:
    assert SPECS[AUDIT_EVENTS].configs() == {"retention.ms": "-1", "retention.bytes": "-1"}
    assert SPECS["identity.verified"].configs() == {"retention.ms": str(S.internal_topic_retention_ms)}
    assert SPECS["identity.verified"].kept_at_most_ms() is None


def test_a_short_portal_retention_still_rolls_segments() -> None:
    specs = {s.name: s for s in all_topics(6, 90_000, HOUR_MS)}
    assert specs[RECOVERY_RESETS].segment_ms == 60_000  # never under a minute


def test_every_consumed_topic_has_a_dead_letter_twin() -> None:
    """Including audit.events, which the audit read model consumes: a letter to a topic that does
    not exist would hold up its service's outbox relay for good."""
    assert AUDIT_EVENTS in CONSUMED
    for name in CONSUMED:
        assert dlq(name) in SPECS


def test_min_insync_replicas_is_a_topic_config_when_the_cluster_sets_it() -> None:
    """The provisioning passes KAFKA_MIN_INSYNC_REPLICAS: every topic, DLQs included, sets it
    (creation and the config update alike use TopicSpec.configs()); unset, the broker's default."""
    with_isr = all_topics(6, HOUR_MS, HOUR_MS, min_insync_replicas=2)
    assert {s.configs()["min.insync.replicas"] for s in with_isr} == {"2"}
    assert len(with_isr) == len(SPECS)
    assert all("min.insync.replicas" not in s.configs() for s in SPECS.values())
