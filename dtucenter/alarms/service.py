"""The alarms in the running center: the engine, fed its rules from the file and the store, and the webhooks.

At start the service reads the API's rules, the accounts' webhooks and the active alarms
from the store, then starts the engine with them and the file's rules (the first admin
account's). The API changes rules and webhooks through :meth:`AlarmService.put_rule` and
friends once the store has them; a reload of the file replaces the file's rules.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from dtucenter.alarms.engine import ActiveAlarm, AlarmEngine, OnlineCheck, OwnedRule, Registers
from dtucenter.alarms.rules import AlarmRule, read_alarm_rule
from dtucenter.alarms.webhooks import WebhookSender
from dtucenter.events import AlarmCleared, AlarmRaised, EventHub
from dtucenter.setting import ConfigError, Place
from dtucenter.store import accounts
from dtucenter.store import alarms as stored
from dtucenter.store.facade import Store
from dtucenter.store.queries import register_list

log = Logger()


class StoreAlarmSink:
    """The engine's :class:`~dtucenter.alarms.engine.AlarmSink`: writes through the store's writer,
    which runs jobs in the order they were given, so a clear never overtakes its raise."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def raised(self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime) -> Deferred[int | None]:
        rule = owned.rule
        return self._store.write(partial(
            stored.raise_alarm, account_id=owned.account_id, account=owned.account, rule=rule.name,
            device_kind=rule.device_kind, device=rule.device, point=rule.point, limit=rule.limit, value=value,
            message=message, time=time,
        ))

    def cleared(self, owned: OwnedRule, value: float | None, message: str, time: dt.datetime) -> Deferred[int | None]:
        return self._store.write(partial(
            stored.clear_alarm, account_id=owned.account_id, rule=owned.rule.name, value=value, message=message,
            time=time,
        ))


def read_stored_rule(row: stored.StoredRule) -> AlarmRule:
    """An API rule as stored; ``ConfigError`` if it no longer reads."""
    return read_alarm_rule(json.loads(row.definition), Place(f"database: alarm rule {row.name!r} of {row.account!r}"))


class AlarmService(Service):
    def __init__(
        self, store: Store, hub: EventHub, reactor: Any, now: Callable[[], dt.datetime], online: OnlineCheck,
        file_rules: Iterable[AlarmRule], webhooks: WebhookSender | None = None,
    ) -> None:
        self.store = store
        self.engine = AlarmEngine(hub, StoreAlarmSink(store), reactor, now, online, self._registers)
        self.webhooks = webhooks if webhooks is not None else WebhookSender(reactor)
        self._file_rules = tuple(file_rules)
        self._admin: tuple[int, str] | None = None
        #: Each account's own webhook, by account id.
        self.account_webhooks: dict[int, str] = {}
        #: True once started, the Failure if the start failed; None meanwhile.
        self._outcome: Failure | bool | None = None
        self._waiters: list[Deferred[None]] = []
        self.engine.on_alarm(self._deliver)

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._start()).addErrback(self._start_failed)

    def _start_failed(self, failure: Failure) -> None:
        log.failure("Could not start the alarms: no alarm is evaluated", failure)
        # The API's alarm endpoints answer 500 from now on, rather than wait for ever.
        self._outcome = failure
        self._tell_waiters()

    async def _start(self) -> None:
        admin = await self.store.read(partial(accounts.first_admin_owner, token_name=""))
        self._admin = (admin.account_id, admin.account)
        self.account_webhooks = await self.store.read(stored.list_webhooks)
        api_rules = []
        for row in await self.store.read(stored.list_rules):
            try:
                api_rules.append(OwnedRule(row.account_id, row.account, read_stored_rule(row)))
            except (ConfigError, ValueError) as e:
                log.error("database: alarm rule {rule!r} of {account!r} not evaluated: {error}",
                          rule=row.name, account=row.account, error=e)
        active = [
            ActiveAlarm(a.account_id, a.account, a.rule, a.device_kind, a.device, a.point)
            for a in await self.store.read(stored.active_alarms)
        ]
        if not self.running:
            return
        self.engine.start(self._owned_file_rules(self._file_rules), api_rules, active)
        log.info("Alarms: {rules} rules, {active} active", rules=len(self.engine.rules()), active=len(active))
        self._outcome = True
        self._tell_waiters()

    def ready(self) -> Deferred[None]:
        """Fires once the engine has its rules (the API's writers wait for it); fails if it could not start."""
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if self._outcome is not None:
            self._tell_waiters()
        return d

    def _tell_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if isinstance(self._outcome, Failure):
                d.errback(self._outcome)
            else:
                d.callback(None)

    def stopService(self) -> None:
        super().stopService()
        self.engine.stop()
        self.webhooks.stop()

    def _owned_file_rules(self, rules: Iterable[AlarmRule]) -> list[OwnedRule]:
        assert self._admin is not None
        account_id, account = self._admin
        return [OwnedRule(account_id, account, rule, from_file=True) for rule in rules]

    def set_file_rules(self, rules: Iterable[AlarmRule]) -> None:
        """The file's rules after a reload (before the start: they are taken at the start)."""
        self._file_rules = tuple(rules)
        if self._outcome is True:
            self.engine.set_file_rules(self._owned_file_rules(self._file_rules))

    def _registers(self, psn: int) -> Deferred[Registers | None]:
        return self.store.read(partial(register_list, psn=psn))

    def _deliver(self, event: AlarmRaised | AlarmCleared, owned: OwnedRule) -> None:
        urls = [owned.rule.webhook, self.account_webhooks.get(owned.account_id)]
        for url in dict.fromkeys(url for url in urls if url is not None):
            self.webhooks.send_alarm(url, event)
