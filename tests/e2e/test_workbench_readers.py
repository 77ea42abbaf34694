"""The workbench's readers against the real broker and mail catcher: a watcher started from
offsets noted earlier sees what was published in between, a fresh read of the same range
(shared.kafkaio.read_topic from those offsets) finds the same records and ends, and the mail
reader indexes the recovery e-mail by its request."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from shared.topics import RECOVERY_OUTCOMES
from tests.e2e.conftest import World
from tools.mail import Mailbox
from tools.watch import TopicWatcher, end_offsets, read_from

pytestmark = pytest.mark.e2e


async def test_a_watcher_from_earlier_offsets_and_a_fresh_read_see_the_same_records(world: World) -> None:
    citizen = await world.citizen()
    starts = await end_offsets(world.settings, [RECOVERY_OUTCOMES])
    rid = await world.request(citizen)
    outcome = await world.portal.wait_outcome(rid, "request")  # published after `starts`

    async with TopicWatcher(world.settings, starts=starts) as late:  # started after it was published
        [rec] = await late.wait_records(lambda r: r.data.get("request_id") == rid, timeout=60)
    assert rec.data == outcome and rec.key == rid and rec.topic == RECOVERY_OUTCOMES
    assert rec.offset >= starts[TopicPartition(RECOVERY_OUTCOMES, rec.partition)]

    again = await read_from(world.settings, starts, timeout=60)
    mine = [r for r in again if r.data.get("request_id") == rid]
    assert [(r.partition, r.offset, r.value) for r in mine] == [(rec.partition, rec.offset, rec.value)]
    assert all(r.offset >= starts[TopicPartition(r.topic, r.partition)] for r in again)


async def test_the_mail_reader_indexes_the_recovery_mail_by_request(world: World) -> None:
    citizen = await world.citizen()
    earlier = world.mailbox.snapshot()
    box = Mailbox(world.settings.mail_dir, ignore_existing=True, poll_s=0.05)
    async with box:
        rid = await world.request(citizen)
        mail = await box.recovery_mail(rid, timeout=60)
    _, token = await world.recovery_mail(rid)  # the e2e suite's own mailbox, by body text
    assert (mail.token, mail.recipients) == (token, frozenset({citizen.email.lower()}))
    assert len(box.by_request[rid]) == 1
    assert earlier and not {m.path for m in box.mails} & earlier  # nothing from before it started
