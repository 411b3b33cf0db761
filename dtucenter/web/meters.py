"""The /api/meters and /api/links endpoints: the Modbus bridge's meters, their samples, writes and links.

What a meter is and what was stored comes from the database, so meters
that left the config stay readable; how the running poller sees it (last
poll, last error, link state) comes from the bridge, to the second.

Scoped like /api/dtus: a meter of another account answers 404. The
config file's links belong to the operator: only admins see them (until
links are rows with an owner of their own).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial
from typing import Any

from sqlalchemy.orm import Session
from twisted.logger import Logger

from dtucenter.isotime import utc_from_seconds
from dtucenter.modbus.errors import (
    LinkDisconnected,
    LinkOffline,
    ModbusError,
    ModbusExceptionResponse,
    ModbusTimeout,
)
from dtucenter.modbus.links import LinkStatus
from dtucenter.modbus.points import PointValueError
from dtucenter.modbus.poller import MeterStatus, UnknownMeter, UnknownPoint
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store import accounts, meters
from dtucenter.store.recorder import MeterRecorder
from dtucenter.web.params import (
    DEFAULT_SAMPLES,
    MAX_SAMPLES,
    check_keys,
    limit_param,
    newest_first_param,
    time_param,
)
from dtucenter.web.router import ApiError, Call, Router

log = Logger()

DEFAULT_HISTORY = 50
MAX_HISTORY = 1000

#: HTTP status and audit outcome for each way a write can fail; the first match counts.
WRITE_ERRORS: tuple[tuple[type[ModbusError], int, str], ...] = (
    (LinkOffline, 409, "offline"),
    (ModbusTimeout, 504, "timeout"),
    (ModbusExceptionResponse, 502, "refused"),
    (LinkDisconnected, 502, "disconnected"),
    (ModbusError, 502, "error"),
)


def _iso_seconds(seconds: float | None) -> str | None:
    return None if seconds is None else utc_from_seconds(seconds).isoformat()


class MeterApi:
    def __init__(self, recorder: MeterRecorder, bridge: ModbusBridge | None, now: Callable[[], dt.datetime]) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.bridge = bridge
        self.now = now

    def install(self, router: Router) -> None:
        router.add("GET", "/api/meters", self.list_meters)
        router.add("GET", "/api/meters/{name}", self.get_meter)
        router.add("GET", "/api/meters/{name}/samples", self.samples)
        router.add("GET", "/api/meters/{name}/latest", self.latest)
        router.add("GET", "/api/meters/{name}/failures", self.failures)
        router.add("POST", "/api/meters/{name}/write", self.write)
        router.add("GET", "/api/meters/{name}/writes", self.writes)
        router.add("PUT", "/api/meters/{name}/account", self.move)
        router.add("GET", "/api/links", self.list_links)
        router.add("GET", "/api/links/{name}", self.get_link)

    # -- meters -----------------------------------------------------------------------------------

    def _live(self, name: str) -> MeterStatus | None:
        if self.bridge is None:
            return None
        try:
            return self.bridge.meter_status(name)
        except UnknownMeter:
            return None

    def _meter_json(self, info: meters.MeterInfo) -> dict[str, object]:
        body = info.to_json()
        live = self._live(info.name)
        if live is None or self.bridge is None:
            body.update(next_poll=None, polls=None, failures=None, timeouts_in_a_row=None,
                        link_online=None, link_remote=None)
            return body
        # Right after a restart the poller knows nothing yet: what was stored still holds.
        for key in ("last_poll", "last_success", "last_error_time"):
            if getattr(live, key) is not None:
                body[key] = _iso_seconds(getattr(live, key))
        if live.last_error is not None:
            body["last_error"] = live.last_error
        if live.last_poll is not None:
            body["failing"] = live.failing
        link = self.bridge.links[live.link].status()
        body.update(
            link=live.link, next_poll=_iso_seconds(live.next_poll), polls=live.polls, failures=live.failures,
            timeouts_in_a_row=live.timeouts_in_a_row, link_online=link.online, link_remote=link.remote,
        )
        return body

    async def _known(self, call: Call, name: str) -> meters.MeterInfo:
        await self.recorder.synced()
        info = await self.store.read(partial(meters.get_meter, name=name, account=call.caller.scope))
        if info is None:
            raise ApiError(404, f"no meter {name!r}")
        return info

    async def list_meters(self, call: Call) -> dict[str, object]:
        call.query(())
        await self.recorder.synced()
        found = await self.store.read(partial(meters.list_meters, account=call.caller.scope))
        return {"meters": [self._meter_json(info) for info in found]}

    async def get_meter(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        return self._meter_json(await self._known(call, name))

    async def samples(self, call: Call, name: str) -> dict[str, object]:
        params = call.query(("point", "since", "until", "limit", "order"))
        point = params.get("point")
        since, until = time_param(params, "since"), time_param(params, "until")
        limit = limit_param(params, DEFAULT_SAMPLES, MAX_SAMPLES)
        newest_first = newest_first_param(params)
        await self.recorder.synced()
        scope = call.caller.scope

        def job(session: Session) -> list[meters.MeterSampleInfo]:
            info = meters.get_meter(session, name, scope)
            if info is None:
                raise ApiError(404, f"no meter {name!r}")
            # A point that left the config still has its samples.
            if point is not None and info.point(point) is None and not meters.has_samples(session, name, point):
                raise ApiError(404, f"meter {name} has no point {point!r}")
            return meters.query_meter_samples(session, info, point, since, until, limit + 1, newest_first)

        found = await self.store.read(job)
        return {"samples": [s.to_json() for s in found[:limit]], "more": len(found) > limit}

    async def latest(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        info = await self._known(call, name)
        found = await self.store.read(partial(meters.latest_meter_values, meter=info))
        return {"samples": [s.to_json() for s in found]}

    async def failures(self, call: Call, name: str) -> dict[str, object]:
        limit = limit_param(call.query(("limit",)), DEFAULT_HISTORY, MAX_HISTORY)
        await self._known(call, name)
        streaks = await self.store.read(partial(meters.list_failures, meter=name, limit=limit))
        return {"failures": [s.to_json() for s in streaks]}

    async def move(self, call: Call, name: str) -> dict[str, object]:
        """Admins only: give the meter to another account (the config file's start as the admin's)."""
        call.query(())
        call.require_admin()
        body = call.json_object()
        check_keys(body, "the body", {"account"})
        owner = body["account"]
        await self.recorder.synced()

        def job(session: Session) -> int | None:
            try:
                return accounts.account_id(session, accounts.check_name(owner, "account"))
            except accounts.AccountError:
                return None

        owner_id = await self.store.read(job)
        if owner_id is None:
            raise ApiError(400, f"no account {owner!r}")
        info = await self.store.write(partial(meters.move_meter, name=name, account=owner_id))
        if info is None:
            raise ApiError(404, f"no meter {name!r}")
        return self._meter_json(info)

    # -- writes -----------------------------------------------------------------------------------

    async def write(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        body = call.json_object()
        check_keys(body, "the body", {"point", "value"})
        point, value = body["point"], body["value"]
        if not isinstance(point, str):
            raise ApiError(400, f"point must be a point name, got {point!r}")
        if self.bridge is None:
            raise ApiError(404, f"no configured meter {name!r}")
        if not call.caller.admin:
            await self._known(call, name)
        requested = self.now()
        try:
            written = self.bridge.write(name, point, value)
        except (UnknownMeter, UnknownPoint) as e:
            raise ApiError(404, str(e)) from None
        except PointValueError as e:
            raise ApiError(400, str(e)) from None
        except OverflowError:  # a JSON integer too large to scale as a float
            raise ApiError(400, f"value out of range for {point}") from None
        outcome, status, error = "ok", 200, None
        try:
            await written
        except ModbusError as e:
            status, outcome = next((s, o) for kind, s, o in WRITE_ERRORS if isinstance(e, kind))
            error = str(e)
        await self._audit(
            meter=name, point=point, value=float(value), who=call.who, requested=requested,
            finished=self.now(), outcome=outcome, error=error,
        )
        if error is not None:
            raise ApiError(status, error)
        return {"meter": name, "point": point, "value": value}

    async def _audit(self, **fields: Any) -> None:
        """The answer matters more than its record: a failed audit write is logged, not raised."""
        try:
            await self.store.write(partial(meters.record_write, **fields))
        except Exception:
            log.failure("Could not record a write to meter {meter} in the audit trail", meter=fields["meter"])

    async def writes(self, call: Call, name: str) -> dict[str, object]:
        limit = limit_param(call.query(("limit",)), DEFAULT_HISTORY, MAX_HISTORY)
        await self._known(call, name)
        found = await self.store.read(partial(meters.list_writes, meter=name, limit=limit))
        return {"writes": [w.to_json() for w in found]}

    # -- links ------------------------------------------------------------------------------------

    def _link_json(self, status: LinkStatus) -> dict[str, object]:
        body = status.as_json()
        body["connected_since"] = _iso_seconds(status.connected_since)
        body["last_disconnect"] = _iso_seconds(status.last_disconnect)
        assert self.bridge is not None
        body["meters"] = [m.name for m in self.bridge.settings.meters if m.link == status.name]
        return body

    async def list_links(self, call: Call) -> dict[str, object]:
        call.query(())
        if not call.caller.admin:
            return {"links": []}
        statuses = self.bridge.link_statuses() if self.bridge is not None else []
        return {"links": [self._link_json(status) for status in statuses]}

    async def get_link(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        link = self.bridge.links.get(name) if self.bridge is not None and call.caller.admin else None
        if link is None:
            raise ApiError(404, f"no link {name!r}")
        return self._link_json(link.status())
