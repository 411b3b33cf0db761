"""Reloading the config file while the center runs (SIGHUP, or ``reloader.reload()`` from the manhole).

The file is read again with the same command-line options and environment on top, by the
same reader as at start. A file that does not read is one error line (file, table, key) and
nothing changes. Otherwise, in this order:

1. the file's links and meters are imported into the database as at start (file-managed;
   the API's are left alone, but for the API's meters on a link the file dropped);
2. the same changes are made to the running bridge as the API would make them: a new link
   is served at once, a changed one is served anew (its meters keep their schedules), a
   removed one's connection is closed and its meters stop; a new or changed meter is polled
   with its points from its next slot;
3. every changed setting declared ``Reload.LIVE`` (``dtucenter.setting``) is handed to the
   appliers the services registered with :meth:`Reloader.on_reload`; each one declared
   ``Reload.RESTART`` is logged as waiting for a restart and keeps its running value;
4. one line says what was applied.

Reloads run one at a time: a reload asked for while one runs waits for it, and any number
asked for meanwhile are one more reload, which reads the file as it is by then. The first
waits for the start-up import and the start of the database's devices.

A setting added later says whether a reload applies it in its own declaration; if it does,
what uses it either reads it again where it is used (the bridge's ``settings``, for
example, replaced at each reload) or registers an applier here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import suppress

import attrs
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dtucenter.config import SettingChange, Settings, UsageError, changed_settings, running_settings
from dtucenter.modbus.config import LinkSettings, MeterSettings, ModbusSettings
from dtucenter.modbus.poller import UnknownMeter
from dtucenter.modbus.service import LinkConflict, ModbusBridge, UnknownLink
from dtucenter.store.recorder import MeterRecorder

log = Logger()

#: Takes up the live settings of a reload; given the whole settings the center now runs with.
Applier = Callable[[Settings], None]


@attrs.frozen
class DevicePlan:
    """What a reload changes in the running bridge: the file's links and meters, old against new."""

    links_added: tuple[LinkSettings, ...] = ()
    links_changed: tuple[LinkSettings, ...] = ()
    links_removed: tuple[str, ...] = ()
    meters_added: tuple[MeterSettings, ...] = ()
    meters_changed: tuple[MeterSettings, ...] = ()
    meters_removed: tuple[str, ...] = ()

    def summary(self) -> str:
        def counts(added: tuple[object, ...], changed: tuple[object, ...], removed: tuple[object, ...]) -> str:
            return f"{len(added)} added, {len(changed)} changed, {len(removed)} removed"

        return (f"links {counts(self.links_added, self.links_changed, self.links_removed)}; "
                f"meters {counts(self.meters_added, self.meters_changed, self.meters_removed)}")


def plan_devices(
    old: ModbusSettings, new: ModbusSettings, served: Collection[str] | None = None,
    polled: Collection[str] | None = None,
) -> DevicePlan:
    """The file's links and meters that a reread file adds, changes and removes, by name.

    ``served`` and ``polled`` name the links and meters the bridge runs: one of the old file
    that it does not (refused, or its port would not bind) counts as new, so that each reload
    tries it again."""
    old_links = {link.name: link for link in old.links if served is None or link.name in served}
    new_links = {link.name: link for link in new.links}
    old_meters = {meter.name: meter for meter in old.meters if polled is None or meter.name in polled}
    new_meters = {meter.name: meter for meter in new.meters}
    return DevicePlan(
        links_added=tuple(link for name, link in new_links.items() if name not in old_links),
        links_changed=tuple(link for name, link in new_links.items() if name in old_links and old_links[name] != link),
        links_removed=tuple(name for name in old_links if name not in new_links),
        meters_added=tuple(meter for name, meter in new_meters.items() if name not in old_meters),
        meters_changed=tuple(
            meter for name, meter in new_meters.items() if name in old_meters and old_meters[name] != meter
        ),
        meters_removed=tuple(name for name in old_meters if name not in new_meters),
    )


@attrs.frozen
class ReloadOutcome:
    """What one reload did."""

    devices: DevicePlan
    changes: tuple[SettingChange, ...]

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(change.name for change in self.changes if change.live)

    @property
    def need_restart(self) -> tuple[str, ...]:
        return tuple(change.name for change in self.changes if not change.live)


class Reloader:
    """Reads the config file again and applies what changed (module docstring)."""

    def __init__(
        self, settings: Settings, reread: Callable[[], Settings], recorder: MeterRecorder, bridge: ModbusBridge,
        reactor: IReactorThreads,
    ) -> None:
        #: What the center runs with: the last file read, but the running value of each setting
        #: that needs a restart.
        self.settings = settings
        self._reread = reread
        self._reactor = reactor
        self._recorder = recorder
        self._bridge = bridge
        self._appliers: list[Applier] = []
        self._lock = DeferredLock()
        #: The callers of the reload that has been asked for but has not started yet.
        self._next: list[Deferred[ReloadOutcome | None]] | None = None

    def on_reload(self, applier: Applier) -> None:
        """``applier`` takes up the live settings at each reload that read."""
        self._appliers.append(applier)

    def hold_until(self, ready: Deferred[None]) -> None:
        """No reload runs before ``ready`` fires (the start-up import and the database's devices)."""
        self._lock.run(lambda: ready)

    def reload(self) -> Deferred[ReloadOutcome | None]:
        """Reload once the running reload (if any) is done; fires with what it did, None when
        the file did not read or the database could not take its devices (nothing changed)."""
        d: Deferred[ReloadOutcome | None] = Deferred()
        if self._next is not None:
            self._next.append(d)
            return d
        waiting = self._next = [d]
        # The callers hear once the lock is free again: a reload they ask for next starts at once.
        self._lock.run(lambda: ensureDeferred(self._run())).addCallback(self._tell, waiting)
        return d

    async def _run(self) -> ReloadOutcome | None:
        self._next = None  # asked for from now on: the file may have changed again since this read
        try:
            return await self._reload()
        except Exception:
            log.failure("Reload of {file} failed", file=self.settings.source)
            return None

    @staticmethod
    def _tell(outcome: ReloadOutcome | None, waiting: list[Deferred[ReloadOutcome | None]]) -> None:
        for d in waiting:
            d.callback(outcome)

    async def _reload(self) -> ReloadOutcome | None:
        running = self.settings
        try:
            # A file, and the templates it names: read in a thread, as the reactor's must not wait on a disk.
            reread = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._reread)
        except UsageError as e:
            log.error("Reload not applied, the center runs on as it was: {error}", error=e)
            return None
        bridge = self._bridge
        plan = plan_devices(running.modbus, reread.modbus, bridge.links.keys(), bridge.poller.meter_names())
        changes = tuple(changed_settings(running, reread))
        try:
            await self._recorder.resync(reread.modbus)
        except Exception:
            log.failure("Reload not applied, the center runs on as it was: the database did not take "
                        "the links and meters of {file}", file=reread.source)
            return None
        await self._apply_devices(plan)
        self.settings = running_settings(running, reread)
        for applier in self._appliers:
            try:
                applier(self.settings)
            except Exception:
                log.failure("Reload: a live setting could not be applied by {applier!r}", applier=applier)
        outcome = ReloadOutcome(plan, changes)
        for change in changes:
            if not change.live:
                log.warn("Reload: {where} changed; it takes effect at the next restart", where=change.where)
        log.info(
            "Reloaded {file}: {devices}; settings applied: {applied}; waiting for a restart: {restart}",
            file=reread.source, devices=plan.summary(),
            applied=", ".join(outcome.applied) or "none", restart=", ".join(outcome.need_restart) or "none",
        )
        return outcome

    async def _apply_devices(self, plan: DevicePlan) -> None:
        """The plan's changes to the running bridge, as the API makes them; one the bridge refuses
        (a registration that cannot be told from an API link's) is logged and the rest go on."""
        bridge = self._bridge
        for name in plan.meters_removed:
            with suppress(UnknownMeter):  # not polled: its link could not be served
                bridge.remove_meter(name)
        closing = [bridge.remove_link(name) for name in plan.links_removed if name in bridge.links]
        # Changed before added: a registration may move from one link to another.
        for link in (*plan.links_changed, *plan.links_added):
            try:
                if link.name in bridge.links:  # changed, or an API link of that name the file now takes over
                    closing.append(bridge.update_link(link))
                else:
                    bridge.add_link(link)
            except LinkConflict as e:
                self._not_served(link, e)
        await gatherResults(closing, consumeErrors=True)
        for link in (*plan.links_changed, *plan.links_added):
            if link.kind == "listen" and link.name in bridge.links:
                try:
                    await bridge.listening(link.name)
                except Exception as e:  # whatever the endpoint says: in use, no such interface...
                    await bridge.remove_link(link.name, keep_meters=True)
                    self._not_served(link, e)
        for meter in (*plan.meters_changed, *plan.meters_added):
            try:
                taken = bridge.set_meter_unserved_if_taken(meter)
            except UnknownLink as e:
                log.error("Reload: meter {meter} not polled: {error}", meter=meter.name, error=e)
            else:
                if taken is not None:
                    log.error("Reload: meter {meter} polled, but not served to SCADA: {error}",
                              meter=meter.name, error=taken)

    def _not_served(self, link: LinkSettings, error: Exception) -> None:
        """Until the next reload, which tries it again, or a restart."""
        log.error("Reload: link {link} of {file} not served: {error}", link=link.name, file=self.settings.source,
                  error=error)
