"""The /api/meters and /api/links endpoints: the Modbus bridge's meters, their samples, writes and links.

What a meter is and what was stored comes from the database, so meters
that left the config stay readable; how the running poller sees it (last
poll, last error, link state) comes from the bridge, to the second.

Scoped like /api/dtus: a meter of another account answers 404, reads on
demand and their trail included; an account sees its own links (the config
file's belong to the first admin account) and only admins exchange raw bytes
on links. Creating, changing and deleting links and meters: ``definitions``.
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import math
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
from dtucenter.modbus.points import PointValueError
from dtucenter.modbus.poller import MeterStatus, Reading, UnknownMeter, UnknownPoint
from dtucenter.modbus.raw import EXPECT_KINDS, MAX_RAW_BYTES, MAX_RAW_TIMEOUT, Expect, RawAnswer
from dtucenter.modbus.service import ModbusBridge
from dtucenter.store import accounts, meters, retention
from dtucenter.store import links as device_links
from dtucenter.store.facade import Store
from dtucenter.store.links import DeviceConflict
from dtucenter.store.nodes import NodeInfo
from dtucenter.store.recorder import MeterRecorder
from dtucenter.web.params import (
    DEFAULT_SAMPLES,
    MAX_SAMPLES,
    check_keys,
    limit_param,
    newest_first_param,
    resolution_param,
    rollups_answer,
    time_param,
)
from dtucenter.web.peers import Peers, PeerUnreachable
from dtucenter.web.router import ApiError, Call, Reply, Router

log = Logger()

#: Seconds to wait for the node running a meter's link to answer a read, write or raw exchange passed on to it.
FORWARD_WAIT = 120.0

DEFAULT_HISTORY = 50
MAX_HISTORY = 1000
#: Meters per page of ``GET /api/latest``: by default, and at most (a fleet of 10,000 in one request).
DEFAULT_FLEET_LATEST = 1000
MAX_FLEET_LATEST = 10_000

#: HTTP status and audit outcome for each way a write can fail; the first match counts.
WRITE_ERRORS: tuple[tuple[type[ModbusError], int, str], ...] = (
    (LinkOffline, 409, "offline"),
    (ModbusTimeout, 504, "timeout"),
    (ModbusExceptionResponse, 502, "refused"),
    (LinkDisconnected, 502, "disconnected"),
    (ModbusError, 502, "error"),
)


def _error_status(error: ModbusError) -> tuple[int, str]:
    """The HTTP status and audit outcome of a failed request to a device."""
    return next((status, outcome) for kind, status, outcome in WRITE_ERRORS if isinstance(error, kind))


def _printable(data: bytes) -> str:
    """The answer as text, for AT commands: ASCII as is, every other byte as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 or b in (9, 10, 13) else f"\\x{b:02x}" for b in data)


def _iso_seconds(seconds: float | None) -> str | None:
    return None if seconds is None else utc_from_seconds(seconds).isoformat()


class MeterApi:
    def __init__(
        self, recorder: MeterRecorder, bridge: ModbusBridge | None, now: Callable[[], dt.datetime],
        peers: Peers | None = None,
    ) -> None:
        self.recorder = recorder
        self.store = recorder.store
        self.bridge = bridge
        self.now = now
        #: The other nodes of the cluster, which run the dialled links this node does not.
        self.peers = peers

    def install(self, router: Router) -> None:
        router.add("GET", "/api/meters", self.list_meters)
        router.add("GET", "/api/meters/{name}", self.get_meter)
        router.add("GET", "/api/meters/{name}/samples", self.samples)
        router.add("GET", "/api/meters/{name}/latest", self.latest)
        router.add("GET", "/api/latest", self.fleet_latest)
        router.add("GET", "/api/meters/{name}/failures", self.failures)
        router.add("POST", "/api/meters/{name}/write", self.write)
        router.add("GET", "/api/meters/{name}/writes", self.writes)
        router.add("POST", "/api/meters/{name}/read", self.read_now)
        router.add("GET", "/api/meters/{name}/reads", self.reads)
        router.add("PUT", "/api/meters/{name}/account", self.move)
        router.add("GET", "/api/links", self.list_links)
        router.add("GET", "/api/links/{name}", self.get_link)
        router.add("POST", "/api/links/{name}/raw", self.raw)
        router.add("GET", "/api/links/{name}/raw", self.raw_exchanges)

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

    async def _held_elsewhere(self, call: Call, link: str | None) -> NodeInfo | None:
        """The node that runs ``link`` when it is a dialled link another node of the cluster runs:
        a read, write or raw exchange on it goes there."""
        if link is None or self.peers is None or self.bridge is None or link not in self.bridge.poller.paused_links:
            return None
        return await self.peers.link_holder(call, link)

    async def _answered_elsewhere(self, call: Call, link: str | None) -> Reply | None:
        """The answer of the node that runs ``link``, when another node does; None to serve it here."""
        holder = await self._held_elsewhere(call, link)
        return None if holder is None else await self._forward(call, holder)

    async def _meter_answered_elsewhere(self, call: Call, name: str) -> Reply | None:
        """Before asking meter ``name`` now: 404 unless the caller may and the bridge polls it; then
        the answer of the node that runs its link, when another node does; None to ask it here."""
        if self.bridge is None:
            raise ApiError(404, f"no configured meter {name!r}")
        await self._own(call, name)
        return await self._answered_elsewhere(call, self._link_of(name))

    def _link_of(self, meter: str) -> str | None:
        try:
            return self.bridge.poller.settings_of(meter).link if self.bridge is not None else None
        except UnknownMeter:
            return None

    async def _forward(self, call: Call, holder: NodeInfo) -> Reply:
        assert self.peers is not None
        try:
            return await self.peers.forward(call, holder, FORWARD_WAIT)
        except PeerUnreachable as e:
            raise ApiError(502, str(e)) from None

    async def _own(self, call: Call, name: str) -> None:
        """Before asking a meter: another account's answers 404 like an unknown one. An admin's
        request goes straight to the bridge, which knows every configured meter."""
        if not call.caller.admin:
            await self._known(call, name)

    async def list_meters(self, call: Call) -> dict[str, object]:
        call.query(())
        await self.recorder.synced()
        found = await self.store.read(partial(meters.list_meters, account=call.caller.scope))
        return {"meters": [self._meter_json(info) for info in found]}

    async def get_meter(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        return self._meter_json(await self._known(call, name))

    async def samples(self, call: Call, name: str) -> dict[str, object]:
        params = call.query(("point", "since", "until", "limit", "order", "resolution"))
        point = params.get("point")
        since, until = time_param(params, "since"), time_param(params, "until")
        limit = limit_param(params, DEFAULT_SAMPLES, MAX_SAMPLES)
        newest_first = newest_first_param(params)
        resolution = resolution_param(params)
        await self.recorder.synced()
        scope = call.caller.scope

        def known(session: Session) -> meters.MeterInfo:
            info = meters.get_meter(session, name, scope)
            if info is None:
                raise ApiError(404, f"no meter {name!r}")
            # A point that left the config still has its samples.
            if point is not None and info.point(point) is None and not meters.has_samples(session, name, point):
                raise ApiError(404, f"meter {name} has no point {point!r}")
            return info

        def job(session: Session) -> list[meters.MeterSampleInfo] | retention.Series:
            info = known(session)
            chosen = resolution
            if chosen == "auto":
                chosen = retention.resolve_resolution(session, retention.METER_SAMPLES, name, since, until, point)
            if chosen == "hour" or chosen == "day":
                return retention.read_series(
                    session, retention.METER_SAMPLES, name, since, until, chosen, point, limit + 1, newest_first)
            return meters.query_meter_samples(session, info, point, since, until, limit + 1, newest_first)

        found = await self.store.read(job)
        if isinstance(found, retention.Series):
            return rollups_answer(found, "point", limit)
        answer: dict[str, object] = {"samples": [s.to_json() for s in found[:limit]], "more": len(found) > limit}
        return answer if resolution is None else {"resolution": "raw", **answer}

    async def latest(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        info = await self._known(call, name)
        found = await self.store.read(partial(meters.latest_meter_values, meter=info))
        return {"samples": [s.to_json() for s in found]}

    async def fleet_latest(self, call: Call) -> dict[str, object]:
        """The latest values of many meters at once, a page of them by name: a dashboard of a fleet."""
        params = call.query(("q", "link", "after", "limit"))
        limit = limit_param(params, DEFAULT_FLEET_LATEST, MAX_FLEET_LATEST)
        await self.recorder.synced()
        scope, now = call.caller.scope, self.now()

        def job(session: Session) -> list[dict[str, Any]]:
            # Made JSON-ready on the store's thread: tens of thousands of values are not the reactor's work.
            return [m.to_json() for m in meters.latest_values(
                session, scope, now, params.get("after"), limit + 1, params.get("q"), params.get("link"))]

        found = await self.store.read(job)
        more = len(found) > limit
        return {"meters": found[:limit], "next": found[limit - 1]["meter"] if more else None}

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
        await self.recorder.synced()
        owner_id = await account_named(self.store, body["account"])

        def job(session: Session) -> meters.MeterInfo | DeviceConflict | None:
            try:
                return meters.move_meter(session, name, owner_id)
            except DeviceConflict as e:  # returned: raised, it would fail the batch it went in with
                return e

        info = await self.store.write(job)
        if isinstance(info, DeviceConflict):
            raise ApiError(409, str(info))
        if info is None:
            raise ApiError(404, f"no meter {name!r}")
        return self._meter_json(info)

    # -- writes -----------------------------------------------------------------------------------

    async def write(self, call: Call, name: str) -> dict[str, object] | Reply:
        call.query(())
        body = call.json_object()
        check_keys(body, "the body", {"point", "value"})
        point, value = body["point"], body["value"]
        if not isinstance(point, str):
            raise ApiError(400, f"point must be a point name, got {point!r}")
        forwarded = await self._meter_answered_elsewhere(call, name)
        if forwarded is not None:
            return forwarded
        assert self.bridge is not None  # checked by _meter_answered_elsewhere
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
            status, outcome = _error_status(e)
            error = str(e)
        await self._audit(
            meters.record_write, f"a write to meter {name}",
            meter=name, point=point, value=float(value), who=call.who, requested=requested,
            finished=self.now(), outcome=outcome, error=error,
        )
        if error is not None:
            raise ApiError(status, error)
        return {"meter": name, "point": point, "value": value}

    async def _audit(self, record: Callable[..., None], what: str, **fields: Any) -> None:
        """The answer matters more than its record: a failed audit write is logged, not raised."""
        try:
            await self.store.write(partial(record, **fields))
        except Exception:
            log.failure("Could not record {what} in the audit trail", what=what)

    # -- reads on demand --------------------------------------------------------------------------

    async def read_now(self, call: Call, name: str) -> dict[str, object] | Reply:
        call.query(())
        body = call.json_object() if self._has_body(call) else {}
        check_keys(body, "the body", set(), frozenset({"points"}))
        points = body.get("points")
        if points is not None and (
            not isinstance(points, list) or not points or not all(isinstance(p, str) for p in points)
        ):
            raise ApiError(400, f"points must be a non-empty list of point names, got {points!r}")
        forwarded = await self._meter_answered_elsewhere(call, name)
        if forwarded is not None:
            return forwarded
        assert self.bridge is not None  # checked by _meter_answered_elsewhere
        requested = self.now()
        try:
            reading = await self.bridge.read_now(name, points)
        except (UnknownMeter, UnknownPoint) as e:
            raise ApiError(404, str(e)) from None
        status, outcome, error = self._read_outcome(reading)
        values = {point: _json_value(value) for point, value in reading.values.items()}
        await self._audit(
            meters.record_operation, f"a read of meter {name}",
            kind="read", target=name, who=call.who, requested=requested, finished=self.now(), outcome=outcome,
            request={"points": points}, answer={"values": values} if values else None, error=error,
        )
        if status != 200:
            raise ApiError(status, error or outcome)
        return {"meter": name, "time": _iso_seconds(reading.time), "values": values,
                "errors": list(reading.errors), "stored": True}

    @staticmethod
    def _read_outcome(reading: Reading) -> tuple[int, str, str | None]:
        error = "; ".join(reading.errors) or None
        if reading.values:
            return 200, "partial" if error else "ok", error
        if reading.stopped_by is not None:
            status, outcome = _error_status(reading.stopped_by)
            return status, outcome, error
        return 502, "refused", error  # every block got an exception response

    @staticmethod
    def _has_body(call: Call) -> bool:
        content = call.request.content
        if content is None:
            return False
        present = bool(content.read().strip())
        content.seek(0)
        return present

    async def reads(self, call: Call, name: str) -> dict[str, object]:
        limit = limit_param(call.query(("limit",)), DEFAULT_HISTORY, MAX_HISTORY)
        await self._known(call, name)
        found = await self.store.read(partial(meters.list_operations, kind="read", target=name, limit=limit))
        return {"reads": [r.to_json() for r in found]}

    async def writes(self, call: Call, name: str) -> dict[str, object]:
        limit = limit_param(call.query(("limit",)), DEFAULT_HISTORY, MAX_HISTORY)
        await self._known(call, name)
        found = await self.store.read(partial(meters.list_writes, meter=name, limit=limit))
        return {"writes": [w.to_json() for w in found]}

    # -- links ------------------------------------------------------------------------------------

    def _link_json(self, row: device_links.LinkRow) -> dict[str, object]:
        """The link's definition and owner, and how the bridge serves it (null fields when it
        does not: a link of the database that could not be started)."""
        link = self.bridge.links.get(row.name) if self.bridge is not None else None
        if link is None:
            body: dict[str, object] = {"name": row.name, "online": None}
        else:
            status = link.status()
            body = status.as_json()
            body["connected_since"] = _iso_seconds(status.connected_since)
            body["last_disconnect"] = _iso_seconds(status.last_disconnect)
        meters_of_link = self.bridge.poller.meter_settings() if self.bridge is not None else []
        body["meters"] = [m.name for m in meters_of_link if m.link == row.name]
        body.update(account=row.account, managed_by=row.managed_by, definition=json.loads(row.definition))
        return body

    async def list_links(self, call: Call) -> dict[str, object]:
        call.query(())
        await self.recorder.synced()
        rows = await self.store.read(partial(device_links.list_links, account_id=call.caller.scope))
        return {"links": [self._link_json(row) for row in rows]}

    async def get_link(self, call: Call, name: str) -> dict[str, object]:
        call.query(())
        await self.recorder.synced()
        row = await self.store.read(partial(device_links.get_link, name=name, account=call.caller.scope))
        if row is None:
            raise ApiError(404, f"no link {name!r}")
        return self._link_json(row)

    # -- raw exchanges (admin only) ---------------------------------------------------------------

    async def raw(self, call: Call, name: str) -> dict[str, object] | Reply:
        call.query(())
        call.require_admin()
        body = call.json_object()
        check_keys(body, "the body", {"hex"}, frozenset({"timeout", "expect", "max_bytes"}))
        link = self.bridge.links.get(name) if self.bridge is not None else None
        if link is None:
            raise ApiError(404, f"no link {name!r}")
        forwarded = await self._answered_elsewhere(call, name)
        if forwarded is not None:
            return forwarded
        data = _raw_bytes(body.get("hex"))
        timeout = _bounded_number(body, "timeout", link.settings.timeout, MAX_RAW_TIMEOUT)
        max_bytes = int(_bounded_number(body, "max_bytes", MAX_RAW_BYTES, MAX_RAW_BYTES))
        expect = body.get("expect", "modbus-tcp" if link.settings.protocol == "tcp" else "modbus-rtu")
        if expect not in EXPECT_KINDS:
            raise ApiError(400, f"expect must be one of {', '.join(EXPECT_KINDS)}, got {expect!r}")
        request = {"hex": data.hex(), "timeout": timeout, "expect": expect, "max_bytes": max_bytes}
        requested = self.now()
        answer: RawAnswer | None = None
        status, outcome, error = 200, "ok", None
        try:
            answer = await link.exchange(data, timeout=timeout, expect=_expect(expect), max_bytes=max_bytes)
        except ModbusError as e:
            status, outcome = _error_status(e)
            error = str(e)
        if answer is not None and not answer.received:
            outcome = "timeout"  # nothing came back: still an answer (200), but the trail says so
        await self._audit(
            meters.record_operation, f"a raw exchange with link {name}",
            kind="raw", target=name, who=call.who, requested=requested, finished=self.now(), outcome=outcome,
            request=request, answer=None if answer is None else {"hex": answer.received.hex()}, error=error,
        )
        if answer is None:
            raise ApiError(status, error or outcome)
        return {
            "link": name, "sent": data.hex(), "received": answer.received.hex(), "text": _printable(answer.received),
            "complete": answer.complete, "truncated": answer.truncated, "elapsed": round(answer.elapsed, 6),
        }

    async def raw_exchanges(self, call: Call, name: str) -> dict[str, object]:
        limit = limit_param(call.query(("limit",)), DEFAULT_HISTORY, MAX_HISTORY)
        call.require_admin()
        if self.bridge is None or name not in self.bridge.links:
            raise ApiError(404, f"no link {name!r}")
        found = await self.store.read(partial(meters.list_operations, kind="raw", target=name, limit=limit))
        return {"exchanges": [r.to_json() for r in found]}


async def account_named(store: Store, name: object) -> int:
    """The id of the account a body names (to own a device); 400 if there is none."""

    def job(session: Session) -> int | None:
        try:
            return accounts.account_id(session, accounts.check_name(name, "account"))
        except accounts.AccountError:
            return None

    found = await store.read(job)
    if found is None:
        raise ApiError(400, f"no account {name!r}")
    return found


async def account_meant(call: Call, store: Store, named: str | None) -> tuple[int, str]:
    """(id, name) of the account a request means: the caller's, or the one an admin names
    (``?account=``); 403 for another account naming one not its own."""
    if named is None or named == call.caller.account:
        return call.caller.account_id, call.caller.account
    call.require_admin()
    return await account_named(store, named), named


def _json_value(value: object) -> object:
    """A decoded value as JSON can carry it: NaN and infinities as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _expect(text: str) -> Expect:
    for kind in EXPECT_KINDS:
        if kind == text:
            return kind
    raise ApiError(400, f"expect must be one of {', '.join(EXPECT_KINDS)}")


def _raw_bytes(text: object) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, f"hex must be the bytes to send as hex digits, got {text!r}")
    try:
        data = binascii.unhexlify("".join(text.split()))
    except (binascii.Error, ValueError):
        raise ApiError(400, f"hex is not an even number of hex digits: {text[:64]!r}") from None
    if not data or len(data) > MAX_RAW_BYTES:
        raise ApiError(400, f"hex must hold 1 to {MAX_RAW_BYTES} bytes, got {len(data)}")
    return data


def _bounded_number(body: dict[str, Any], key: str, default: float, most: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ApiError(400, f"{key} must be a number above 0 and at most {most:g}, got {value!r}")
    return float(value)
