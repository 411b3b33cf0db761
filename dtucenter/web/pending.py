"""Pending devices through the API: ``GET /api/pending``, ``POST /api/pending/{id}/adopt`` and
``DELETE /api/pending/{id}``.

A pending device belongs to nobody yet. An admin lists them all and adopts any into any
account. An ordinary account cannot list them: it finds a device only by its exact
registration (``?registration=``, the serial number it was given and set in its DTU), and
adopts it into itself; ids are random, so another's device cannot be reached by guessing
one. Dropping a device is an admin's.
"""

from __future__ import annotations

from dtucenter.adoption import Adopter, AdoptionRefused, device_json, shown_registration
from dtucenter.discovery import DTU, PendingBook, PendingDevice
from dtucenter.web.router import ApiError, Call, Reply, Router

#: What an adoption's body may say besides the account, the template, the unit and the interval:
#: the new link's keys that are the device's own (how its DTU sends and frames).
LINK_KEYS = ("protocol", "registration_mode", "heartbeat", "timeout", "retries", "idle_timeout")


class PendingApi:
    def __init__(self, book: PendingBook, adopter: Adopter) -> None:
        self.book = book
        self.adopter = adopter

    def install(self, router: Router) -> None:
        router.add("GET", "/api/pending", self.list_pending)
        router.add("POST", "/api/pending/{id}/adopt", self.adopt)
        router.add("DELETE", "/api/pending/{id}", self.drop)

    async def list_pending(self, call: Call) -> dict[str, object]:
        wanted = call.query(("registration",)).get("registration")
        if wanted is None and not call.caller.admin:
            # An account finds its own device by the registration it was given, never by browsing.
            return {"pending": []}
        devices = [d for d in self.book.devices() if wanted is None or shown_registration(d) == wanted]
        return {"pending": [device_json(d) for d in devices]}

    def _device(self, device_id: str) -> PendingDevice:
        device = self.book.get(device_id)
        if device is None:
            raise ApiError(404, f"no pending device {device_id!r}")
        return device

    async def adopt(self, call: Call, id: str) -> Reply:
        call.query(())
        body = call.json_object()
        device = self._device(id)
        unknown = set(body) - {"account", "template", "unit", "interval", *LINK_KEYS}
        if unknown:
            raise ApiError(400, f"unknown key(s) {', '.join(sorted(unknown))}")
        account = body.get("account", call.caller.account)
        if account != call.caller.account:
            call.require_admin()
        if device.kind == DTU and set(body) - {"account"}:
            raise ApiError(400, "a binary-protocol DTU is adopted into an account only: no template or link keys")
        try:
            adopted = await self.adopter.adopt_pending(
                device, account=account, template=body.get("template"), unit=body.get("unit", 1),
                interval=body.get("interval", 10.0), link_keys={k: body[k] for k in LINK_KEYS if k in body},
                who=call.who,
            )
        except AdoptionRefused as e:
            raise ApiError(e.status, str(e)) from None
        return Reply({"adopted": device.id, **adopted.as_json()}, 201)

    async def drop(self, call: Call, id: str) -> dict[str, object]:
        call.query(())
        call.require_admin()
        device = self._device(id)
        self.book.forget(device.id)
        await self.book.flush()
        return {"dropped": device.id}
