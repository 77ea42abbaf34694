"""/readyz: a service is ready only once every consumer has completed its group join."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.runtime import Service, consumer_has_joined
from shared.settings import PlatformSettings
from shared.store import ServiceStore


async def test_a_consumer_is_ready_once_its_group_join_completed() -> None:
    # The real aiokafka class (pinned): this also checks that the state read is still there.
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", group_id="g")
    assert not consumer_has_joined(consumer), "not subscribed"
    consumer.subscribe(["t"])
    assert not consumer_has_joined(consumer), "subscribed, join not completed"
    # What aiokafka's coordinator does when a join completes, here with nothing for us
    # (a group with more consumers than partitions): joined, and ready.
    consumer._subscription.assign_from_subscribed(set())
    assert consumer_has_joined(consumer)
    consumer._subscription.begin_reassignment()  # a rebalance started
    assert not consumer_has_joined(consumer)
    consumer._subscription.assign_from_subscribed({TopicPartition("t", 0)})
    assert consumer_has_joined(consumer) and consumer.assignment() == {TopicPartition("t", 0)}


async def test_the_service_waits_for_every_consumer_of_every_subscription() -> None:
    settings = PlatformSettings(clave_env="development")
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_ready"), settings)
    joined = SimpleNamespace(_subscription=SimpleNamespace(reassignment_in_progress=False))
    joining = SimpleNamespace(_subscription=SimpleNamespace(reassignment_in_progress=True))
    single = SimpleNamespace(consumer=joined)
    group = SimpleNamespace(consumer=None, consumer_subgroup=[joined, joining, joined])
    service._subscribers = [single, group]
    assert not service.consumers_assigned()
    joining._subscription.reassignment_in_progress = False
    assert service.consumers_assigned()
    service._subscribers.append(SimpleNamespace(consumer=None))  # not started yet
    assert not service.consumers_assigned()
    assert not await service.ready()
    await service.store.close()
