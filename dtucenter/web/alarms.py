"""/api/alarms: alarm rules per account, the alarms raised and cleared, and each account's webhook.

A rule's body has the keys of a ``[[alarm]]`` table, read by the same reader with the same
messages (400). A rule belongs to the account that owns the device it watches: an account
makes rules on its own DTUs, meters and links only (another's answer 404 as unknown ones
do); an admin may make them on any device, for the device's account. Names are unique per
account; the config file's rules (the first admin account's) are listed but read-only.
An admin reads and changes another account's rules by naming it with ``?account=``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from dtucenter.alarms.engine import OwnedRule
from dtucenter.alarms.rules import AlarmRule, read_alarm_rule, webhook_url
from dtucenter.alarms.service import AlarmService
from dtucenter.setting import ConfigError, Place
from dtucenter.store import alarms as stored
from dtucenter.store.links import DeviceConflict
from dtucenter.store.recorder import MeterRecorder
from dtucenter.web.definitions import write_or_refuse
from dtucenter.web.meters import DEFAULT_HISTORY, MAX_HISTORY, account_meant
from dtucenter.web.params import check_keys, limit_param
from dtucenter.web.router import ApiError, Call, Reply, Router


def rule_json(owned: OwnedRule, raised: bool) -> dict[str, Any]:
    return {
        **owned.rule.definition(), "account": owned.account, "managed_by": "file" if owned.from_file else "api",
        "raised": raised,
    }


def _device_words(rule: AlarmRule) -> str:
    return f"no {rule.device_kind} {rule.device if rule.device_kind == 'dtu' else repr(rule.device)}"


class AlarmApi:
    def __init__(self, alarms: AlarmService, recorder: MeterRecorder, now: Callable[[], dt.datetime]) -> None:
        self.alarms = alarms
        self.engine = alarms.engine
        self.store = alarms.store
        self.recorder = recorder
        self.now = now

    def install(self, router: Router) -> None:
        router.add("GET", "/api/alarms", self.list_alarms)
        router.add("GET", "/api/alarms/rules", self.list_rules)
        router.add("POST", "/api/alarms/rules", self.create_rule)
        router.add("GET", "/api/alarms/rules/{name}", self.get_rule)
        router.add("PUT", "/api/alarms/rules/{name}", self.replace_rule)
        router.add("DELETE", "/api/alarms/rules/{name}", self.delete_rule)
        router.add("GET", "/api/alarms/webhook", self.get_webhook)
        router.add("PUT", "/api/alarms/webhook", self.set_webhook)
        router.add("DELETE", "/api/alarms/webhook", self.delete_webhook)

    # -- shared steps -----------------------------------------------------------------------------

    def _owned(self, account_id: int, name: str) -> OwnedRule:
        owned = self.engine.rule(account_id, name)
        if owned is None:
            raise ApiError(404, f"no alarm rule {name!r}")
        return owned

    @staticmethod
    def _read(body: dict[str, Any]) -> AlarmRule:
        try:
            return read_alarm_rule(body, Place("the body"))
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    def _owner_job(self, call: Call, rule: AlarmRule) -> Callable[[Session], tuple[int, str]]:
        """A job finding the account of the device ``rule`` watches: 404 for one the caller may not see."""

        def job(session: Session) -> tuple[int, str]:
            owner = stored.device_owner(session, rule.device_kind, rule.device)
            if owner is None or (call.caller.scope is not None and owner[0] != call.caller.scope):
                raise ApiError(404, _device_words(rule))
            return owner

        return job

    # -- rules ------------------------------------------------------------------------------------

    async def list_rules(self, call: Call) -> Any:
        call.query(())
        await self.alarms.ready()
        scope = call.caller.scope
        return {"rules": [
            rule_json(owned, self.engine.is_raised(*owned.key))
            for owned in self.engine.rules() if scope is None or owned.account_id == scope
        ]}

    async def get_rule(self, call: Call, name: str) -> Any:
        account_id, _ = await account_meant(call, self.store, call.query(("account",)).get("account"))
        await self.alarms.ready()
        owned = self._owned(account_id, name)
        return rule_json(owned, self.engine.is_raised(account_id, name))

    async def create_rule(self, call: Call) -> Reply:
        call.query(())
        rule = self._read(call.json_object())
        await self.alarms.ready()
        owner_of = self._owner_job(call, rule)

        def job(session: Session) -> tuple[int, str]:
            account_id, account = owner_of(session)
            if self._taken_by_file(account_id, rule.name):
                raise DeviceConflict(f"alarm rule {rule.name!r} is in the config file; choose another name")
            stored.create_rule(session, account_id, rule.name, json.dumps(rule.definition()), self.now())
            return account_id, account

        account_id, account = await write_or_refuse(self.recorder, job)
        owned = OwnedRule(account_id, account, rule)
        self.engine.put_rule(owned)
        return Reply(rule_json(owned, self.engine.is_raised(account_id, rule.name)), 201)

    def _taken_by_file(self, account_id: int, name: str) -> bool:
        owned = self.engine.rule(account_id, name)
        return owned is not None and owned.from_file

    def _refuse_file_rule(self, owned: OwnedRule) -> None:
        if owned.from_file:
            raise ApiError(409, f"alarm rule {owned.rule.name!r} is in the config file: change it there")

    async def replace_rule(self, call: Call, name: str) -> Any:
        account_id, _ = await account_meant(call, self.store, call.query(("account",)).get("account"))
        body = call.json_object()
        if body.setdefault("name", name) != name:
            raise ApiError(400, f"name: a PUT cannot rename {name!r}; create {body['name']!r} and delete this one")
        rule = self._read(body)
        await self.alarms.ready()
        self._refuse_file_rule(self._owned(account_id, name))
        owner_of = self._owner_job(call, rule)

        def job(session: Session) -> str:
            owner_id, owner = owner_of(session)
            if owner_id != account_id:
                raise ApiError(409, f"{rule.device_kind} {rule.device} belongs to another account than the rule")
            if not stored.replace_rule(session, account_id, name, json.dumps(rule.definition()), self.now()):
                raise ApiError(404, f"no alarm rule {name!r}")
            return owner

        account = await write_or_refuse(self.recorder, job)
        owned = OwnedRule(account_id, account, rule)
        self.engine.put_rule(owned)
        return rule_json(owned, self.engine.is_raised(account_id, name))

    async def delete_rule(self, call: Call, name: str) -> Any:
        account_id, _ = await account_meant(call, self.store, call.query(("account",)).get("account"))
        await self.alarms.ready()
        self._refuse_file_rule(self._owned(account_id, name))
        found = await write_or_refuse(self.recorder, partial(stored.delete_rule, account=account_id, name=name))
        if not found:
            raise ApiError(404, f"no alarm rule {name!r}")
        self.engine.remove_rule(account_id, name)
        return {"deleted": name}

    # -- alarms -----------------------------------------------------------------------------------

    async def list_alarms(self, call: Call) -> Any:
        params = call.query(("active", "before", "limit", "rule", "account"))
        limit = limit_param(params, DEFAULT_HISTORY, MAX_HISTORY)
        active = params.get("active", "0")
        if active not in ("0", "1"):
            raise ApiError(400, f"active must be 0 or 1, got {active!r}")
        before = None
        if "before" in params:
            text = params["before"]
            if not (text.isascii() and text.isdigit()):
                raise ApiError(400, f"before must be an alarm id, got {text!r}")
            before = int(text)
        if "account" in params:
            account: int | None = (await account_meant(call, self.store, params["account"]))[0]
        else:
            account = call.caller.scope
        rows = await self.store.read(partial(
            stored.list_alarms, account=account, active=active == "1", before=before, limit=limit,
            rule=params.get("rule"),
        ))
        page: dict[str, Any] = {"alarms": [row.to_json() for row in rows]}
        if len(rows) == limit:
            page["next"] = rows[-1].id
        return page

    # -- the account's webhook --------------------------------------------------------------------

    async def get_webhook(self, call: Call) -> Any:
        account_id, account = await account_meant(call, self.store, call.query(("account",)).get("account"))
        await self.alarms.ready()
        return {"account": account, "url": self.alarms.account_webhooks.get(account_id)}

    async def set_webhook(self, call: Call) -> Any:
        account_id, account = await account_meant(call, self.store, call.query(("account",)).get("account"))
        body = call.json_object()
        check_keys(body, "the body", {"url"})
        try:
            url = webhook_url(body["url"])
        except ValueError as e:
            raise ApiError(400, f"url: {e}") from None
        await self.alarms.ready()
        await write_or_refuse(self.recorder, partial(stored.set_webhook, account=account_id, url=url, now=self.now()))
        self.alarms.account_webhooks[account_id] = url
        return {"account": account, "url": url}

    async def delete_webhook(self, call: Call) -> Any:
        account_id, account = await account_meant(call, self.store, call.query(("account",)).get("account"))
        await self.alarms.ready()
        had = await write_or_refuse(self.recorder, partial(
            stored.set_webhook, account=account_id, url=None, now=self.now()
        ))
        if not had:
            raise ApiError(404, f"account {account!r} has no alarm webhook")
        self.alarms.account_webhooks.pop(account_id, None)
        return {"account": account, "url": None}
