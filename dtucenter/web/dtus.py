"""The /api/dtus endpoints: DTU records, samples, setup, live commands and their audit trails.

Every endpoint is scoped to the caller's account (an admin's to all): a DTU
of another account answers 404 exactly as one that does not exist. Only an
admin creates a DTU record or moves one to another account (``account``);
an account changes and deletes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from dtucenter.dtu import commands, wire
from dtucenter.dtu.center import DTUCenter
from dtucenter.dtu.control import Control, UnknownDTU
from dtucenter.store import accounts, audit, queries, retention
from dtucenter.store.facade import Store
from dtucenter.store.nodes import NodeInfo
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

T = TypeVar("T")

#: Seconds added to the longest a command may take on the node holding its DTU, for the way there and back.
FORWARD_MARGIN = 10.0

DEFAULT_COMMANDS = 50
MAX_COMMANDS = 1000
#: DTUs in one page of the list, unless ``limit`` says otherwise, and at most.
DEFAULT_PAGE = 50
MAX_PAGE = 1000

#: HTTP status for each way a command can fail.
COMMAND_ERROR_STATUS: dict[type[Exception], int] = {
    commands.InvalidCommand: 400,
    UnknownDTU: 404,
    commands.DTUOffline: 409,
    commands.QueueFull: 503,
    commands.CommandTimeout: 504,
    commands.CommandRefused: 502,
    commands.CommandDisconnected: 502,
    commands.BadAnswer: 502,
    commands.NotStored: 500,
    commands.CommandError: 502,
}


# -- reading request values -----------------------------------------------------------------


def psn_param(text: str) -> int:
    """A PSN from a path segment; 400 if it is not one."""
    try:
        return queries.check_psn(int(text, 10))
    except ValueError:
        raise ApiError(400, f"not a PSN (a whole number 0..4294967295): {text!r}") from None


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be a whole number, got {value!r}")
    return value


def _register_list(body: dict[str, Any], fields: tuple[str, ...]) -> list[tuple[int, ...]]:
    items = body["registers"]
    if not isinstance(items, list):
        raise ApiError(400, "registers must be a list of objects with " + ", ".join(fields))
    parsed = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"registers[{i}] must be an object with " + ", ".join(fields))
        check_keys(item, f"registers[{i}]", set(fields))
        parsed.append(tuple(_whole(item[f], f"registers[{i}].{f}") for f in fields))
    return parsed


def _registers(body: dict[str, Any]) -> tuple[wire.Register, ...]:
    return tuple(wire.Register(*item) for item in _register_list(body, ("dev", "addr")))


def _register_values(body: dict[str, Any]) -> tuple[wire.RegisterValue, ...]:
    return tuple(wire.RegisterValue(*item) for item in _register_list(body, ("dev", "addr", "value")))


def _flag(params: dict[str, str], name: str) -> bool:
    text = params.get(name, "0").lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ApiError(400, f"{name} must be 1 or 0, got {text!r}")


def _account_id(session: Session, name: object) -> int:
    try:
        return accounts.account_id(session, accounts.check_name(name, "account"))
    except accounts.AccountError as e:
        raise ApiError(400, str(e)) from None


# -- the endpoints ---------------------------------------------------------------------------


class DtuApi:
    def __init__(self, center: DTUCenter, control: Control, store: Store, peers: Peers | None = None) -> None:
        self.center = center
        self.control = control
        self.store = store
        #: The other nodes of the cluster, which hold the DTUs not online here.
        self.peers = peers

    def install(self, router: Router) -> None:
        router.add("GET", "/api/dtus", self.list_dtus)
        router.add("GET", "/api/dtus/{psn}", self.get_dtu)
        router.add("PUT", "/api/dtus/{psn}", self.put_dtu)
        router.add("DELETE", "/api/dtus/{psn}", self.delete_dtu)
        router.add("GET", "/api/dtus/{psn}/samples", self.samples)
        router.add("GET", "/api/dtus/{psn}/latest", self.latest)
        router.add("GET", "/api/dtus/{psn}/setup", self.get_setup)
        router.add("POST", "/api/dtus/{psn}/setup", self.save_setup)
        router.add("POST", "/api/dtus/{psn}/read", self.read_test)
        router.add("POST", "/api/dtus/{psn}/write", self.set_control)
        router.add("GET", "/api/dtus/{psn}/commands", self.command_log)
        router.add("GET", "/api/dtus/{psn}/edits", self.edit_log)

    def _dtu_json(self, info: queries.DtuInfo) -> dict[str, Any]:
        """The stored record, with what only the live registry knows to the second."""
        body = info.to_json()
        session = self.center.sessions.get(info.psn)
        # Online on another node of the cluster: the database says where (``node``). This node's
        # own DTUs are online while their session is.
        here = self.peers.node if self.peers is not None else None
        body["online"] = session is not None or (info.online and info.node not in (None, here))
        if session is not None:
            body["remote"] = session.peer
            body["last_seen"] = session.last_seen.isoformat()
        return body

    async def _known(self, call: Call, psn: int) -> queries.DtuInfo:
        """DTU ``psn`` if the caller may see it; else 404, the same whether it exists or not."""
        info = await self.store.read(partial(queries.get_dtu, psn=psn, account=call.caller.scope))
        if info is None:
            raise ApiError(404, f"no DTU {psn}")
        return info

    def _scoped_job(self, call: Call, psn: int, job: Callable[[Session], T]) -> Callable[[Session], T | None]:
        """``job``, run only when the caller may see DTU ``psn`` (None otherwise), in one transaction."""
        scope = call.caller.scope

        def scoped(session: Session) -> T | None:
            if queries.get_dtu(session, psn, scope) is None:
                return None
            return job(session)

        return scoped

    # -- records ------------------------------------------------------------------------------

    async def list_dtus(self, call: Call) -> Any:
        """Every DTU the caller sees; or, with any of q, sort, order, offset and limit, one page and the total."""
        params = call.query(("q", "sort", "order", "offset", "limit"))
        if not params:
            dtus = await self.store.read(partial(queries.list_dtus, account=call.caller.scope))
            return {"dtus": [self._dtu_json(info) for info in dtus], "total": len(dtus)}
        sort = params.get("sort", "psn")
        if sort not in queries.DTU_SORT_KEYS:
            raise ApiError(400, f"sort must be one of {', '.join(queries.DTU_SORT_KEYS)}, got {sort!r}")
        limit = limit_param(params, DEFAULT_PAGE, MAX_PAGE)
        offset_text = params.get("offset", "0")
        if not (offset_text.isascii() and offset_text.isdigit()) or len(offset_text) > 9:
            raise ApiError(400, f"offset must be a whole number 0..999999999, got {offset_text!r}")
        page, total = await self.store.read(partial(
            queries.search_dtus, account=call.caller.scope, text=params.get("q", "").strip(), sort=sort,
            descending=newest_first_param(params), offset=int(offset_text), limit=limit,
        ))
        return {"dtus": [self._dtu_json(info) for info in page], "total": total}

    async def get_dtu(self, call: Call, psn: str) -> Any:
        call.query(())
        return self._dtu_json(await self._known(call, psn_param(psn)))

    async def put_dtu(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)
        body = call.json_object()
        owner = body.pop("account", None)
        owner_id = None
        if owner is not None:
            call.require_admin()
            owner_id = await self.store.read(partial(_account_id, name=owner))
        try:
            fields = queries.validate_dtu_fields(body)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        caller, now = call.caller, self.center.now()

        def job(session: Session) -> tuple[queries.DtuInfo, bool] | None:
            if not caller.admin and queries.get_dtu(session, number, caller.scope) is None:
                return None  # only an admin creates records; another account's is not there
            info, created = queries.upsert_dtu(session, number, fields, now, owner_id)
            edited = dict(fields, account=owner) if owner is not None else fields
            audit.record_dtu_edit(session, number, "create" if created else "update", edited, caller.who, now)
            return info, created

        done = await self.store.write(job)
        if done is None:
            raise ApiError(404, f"no DTU {number}")
        info, created = done
        return Reply(self._dtu_json(info), 201 if created else 200)

    async def delete_dtu(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)
        caller, now = call.caller, self.center.now()

        def job(session: Session) -> bool:
            if queries.get_dtu(session, number, caller.scope) is None:
                return False
            audit.record_dtu_edit(session, number, "delete", {}, caller.who, now)
            return queries.delete_dtu(session, number)

        if not await self.store.write(job):
            raise ApiError(404, f"no DTU {number}")
        session = self.center.sessions.get(number)
        if session is not None:
            session.abort("its record was deleted")
        return {"deleted": number}

    async def samples(self, call: Call, psn: str) -> Any:
        params = call.query(("since", "until", "limit", "order", "resolution"))
        number = psn_param(psn)
        since, until = time_param(params, "since"), time_param(params, "until")
        limit = limit_param(params, DEFAULT_SAMPLES, MAX_SAMPLES)
        newest_first = newest_first_param(params)
        resolution = resolution_param(params)

        def job(session: Session) -> list[queries.SampleInfo] | retention.Series:
            chosen = resolution
            if chosen == "auto":
                chosen = retention.resolve_resolution(session, retention.DTU_SAMPLES, number, since, until)
            if chosen == "hour" or chosen == "day":
                return retention.read_series(session, retention.DTU_SAMPLES, number, since, until, chosen,
                                             limit=limit + 1, newest_first=newest_first)
            return queries.query_samples(session, number, since, until, limit + 1, newest_first)

        found = await self.store.read(self._scoped_job(call, number, job))
        if found is None:
            raise ApiError(404, f"no DTU {number}")
        if isinstance(found, retention.Series):
            return rollups_answer(found, "position", limit)
        answer = {"samples": [s.to_json() for s in found[:limit]], "more": len(found) > limit}
        return answer if resolution is None else {"resolution": "raw", **answer}

    async def latest(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)

        found = await self.store.read(self._scoped_job(call, number, partial(queries.latest_upload, psn=number)))
        if found is None:
            raise ApiError(404, f"no DTU {number}")
        return {"samples": [s.to_json() for s in found]}

    async def command_log(self, call: Call, psn: str) -> Any:
        number = psn_param(psn)
        limit = limit_param(call.query(("limit",)), DEFAULT_COMMANDS, MAX_COMMANDS)

        records = await self._trail(call, number, partial(audit.list_commands, psn=number, limit=limit))
        return {"commands": [r.to_json() for r in records]}

    async def _trail(self, call: Call, psn: int, job: Callable[[Session], list[T]]) -> list[T]:
        """An audit trail of DTU ``psn``: an admin's outlives the DTU record, an account's is its DTU's."""
        if not call.caller.admin:
            records = await self.store.read(self._scoped_job(call, psn, job))
        else:
            def outliving(session: Session) -> list[T] | None:
                found = job(session)
                return None if not found and queries.get_dtu(session, psn) is None else found

            records = await self.store.read(outliving)
        if records is None:
            raise ApiError(404, f"no DTU {psn}")
        return records

    async def edit_log(self, call: Call, psn: str) -> Any:
        """The record's changes through the API, newest first: who created, changed, moved or deleted it."""
        number = psn_param(psn)
        limit = limit_param(call.query(("limit",)), DEFAULT_COMMANDS, MAX_COMMANDS)
        records = await self._trail(call, number, partial(audit.list_dtu_edits, psn=number, limit=limit))
        return {"edits": [r.to_json() for r in records]}

    # -- setup and live commands ------------------------------------------------------------------

    async def get_setup(self, call: Call, psn: str) -> Any:
        number = psn_param(psn)
        if _flag(call.query(("live",)), "live"):
            return await self._run(call, number, commands.ReadSetupCommand())
        scope = call.caller.scope

        def job(session: Session) -> dict[str, Any] | None:
            info = queries.get_dtu(session, number, scope)
            if info is None:
                return None
            registers = tuple(wire.Register(dev, addr) for dev, addr in queries.register_list(session, number))
            return commands.Setup(info.send_test_time, registers).to_json()

        setup = await self.store.read(job)
        if setup is None:
            raise ApiError(404, f"no DTU {number}")
        return setup

    async def save_setup(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)
        body = call.json_object()
        check_keys(body, "the body", {"send_test_time", "registers"})
        command = commands.SaveSetupCommand(_whole(body["send_test_time"], "send_test_time"), _registers(body))
        return await self._run(call, number, command)

    async def read_test(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)
        body = call.json_object()
        check_keys(body, "the body", {"registers"})
        return await self._run(call, number, commands.ReadTestCommand(_registers(body)))

    async def set_control(self, call: Call, psn: str) -> Any:
        call.query(())
        number = psn_param(psn)
        body = call.json_object()
        check_keys(body, "the body", {"registers"})
        return await self._run(call, number, commands.SetControlCommand(_register_values(body)))

    async def _run(self, call: Call, psn: int, command: commands.Command) -> Any:
        if not call.caller.admin:
            await self._known(call, psn)
        if psn not in self.center.sessions and self.peers is not None:
            holder = await self.peers.holder(call, psn)
            if holder is not None:
                return await self._forward(call, psn, command, holder)
        try:
            result = await self.control.run(psn, command, who=call.who)
        except (commands.CommandError, UnknownDTU) as e:
            status = next(s for kind, s in COMMAND_ERROR_STATUS.items() if isinstance(e, kind))
            raise ApiError(status, str(e)) from None
        return result.to_json()

    async def _forward(self, call: Call, psn: int, command: commands.Command, holder: NodeInfo) -> Any:
        """Run on the node that holds the DTU; when that node does not answer, the command is
        recorded here as disconnected, as it would be had the DTU's connection gone."""
        assert self.peers is not None
        command.check(self.center.settings.dialect)
        # Behind as many commands as the DTU's queue holds, each with its timeout, and a margin.
        wait = self.center.settings.command_timeout * (commands.QUEUE_LIMIT + 2) + FORWARD_MARGIN
        try:
            return await self.peers.forward(call, holder, wait)
        except PeerUnreachable as e:
            await self.control.record_failed(psn, command, call.who, commands.CommandDisconnected(str(e)))
            raise ApiError(COMMAND_ERROR_STATUS[commands.CommandDisconnected], str(e)) from None
