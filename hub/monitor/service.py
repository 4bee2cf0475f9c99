"""The GPU monitor: a control-plane service that samples, attributes, accounts and alerts.

One sampler thread runs :meth:`GpuMonitor.tick` every ``interval_seconds``. Each tick runs
fixed steps, in order:

(1) **read** every GPU, MIG device and GPU process from the source (NVML or a trace);
(2) **attribute** each process to its holder through its cgroup and attach the lease its
    device is under (:mod:`~ztlab.hub.monitor.attribution`);
(3) **account** GPU-seconds, energy and memory per user (:mod:`~ztlab.hub.monitor.accounting`);
(4) **detect** (:mod:`~ztlab.hub.monitor.detectors`) and, for each new alert, **respond**:
    always audited, and the responses the policy permits (:mod:`~ztlab.hub.monitor.responses`);
(5) **hand over**: GPUs whose lease ended are checked for processes of the old holder and
    released for new leases, or held back with a ``handover_dirty`` alert.

The latest tick is kept for the Prometheus endpoint (:meth:`GpuMonitor.metrics`). A tick that
fails is logged and counted (``ztlab_monitor_errors_total``), and the next one runs: the
monitor never stops because one reading was bad.

The hub feeds the monitor what only it knows, from its event loop: which Unix account is
which user, and when each server last saw its user (:meth:`GpuMonitor.set_directory`), and
how to stop a server (:attr:`GpuMonitor.stop_holder`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ztlab.common.config import ZtlabConfig
from ztlab.common.errors import ConfigError
from ztlab.hub.monitor.accounting import Accounting
from ztlab.hub.monitor.alerts import AlertStore, StoredAlert
from ztlab.hub.monitor.attribution import Attributor, LeaseView
from ztlab.hub.monitor.detectors import Detectors, Tick
from ztlab.hub.monitor.exporter import XidMemory, render
from ztlab.hub.monitor.findings import Alert, AttributedProcess, Holder, LeaseHold
from ztlab.hub.monitor.procfacts import ProcessFactsCache
from ztlab.hub.monitor.responses import Notifier, Responder
from ztlab.hub.monitor.telemetry import Reading, TelemetrySource
from ztlab.hub.private import private_directory

if TYPE_CHECKING:
    from ztlab.hub.gpu.backend import LeaseBackend
    from ztlab.hub.gpu.inventory import Inventory
    from ztlab.hub.policy import PolicyEngine
    from ztlab.hub.sandbox.cgroups import CgroupManager

__all__ = ["GpuMonitor", "TickResult", "open_source"]

_log = logging.getLogger(__name__)

#: the audit actor of what the monitor does on its own
SYSTEM_ACTOR: Final = "ztlab-hub"


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick saw and raised."""

    reading: Reading
    processes: tuple[AttributedProcess, ...]
    alerts: tuple[Alert, ...]
    #: seconds the tick took
    duration: float


def open_source(config: ZtlabConfig) -> TelemetrySource | None:
    """The readings' source ``[gpu.monitor] source`` names, or ``None`` for no monitor.

    ``auto`` is NVML where it works; ``nvml`` raises :class:`ConfigError` where it does not.
    """
    settings = config.gpu.monitor
    if settings.source == "off":
        return None
    if settings.source == "replay":
        from ztlab.hub.monitor.sources import WatchedTrace

        return WatchedTrace(Path(settings.trace))
    from ztlab.hub.gpu.nvml import NvmlUnavailableError
    from ztlab.hub.monitor.sources import NvmlTelemetry

    try:
        return NvmlTelemetry()
    except NvmlUnavailableError as exc:
        if settings.source == "nvml":
            raise ConfigError(
                f'gpu.monitor.source = "nvml", but {exc.message}',
                hint=exc.hint or 'set gpu.monitor.source = "auto" to run without a monitor',
            ) from exc
        _log.info("no GPU monitor: %s", exc.message)
        return None


class GpuMonitor:
    """Samples the GPUs and acts on what it sees (see the module docstring)."""

    def __init__(
        self,
        *,
        source: TelemetrySource,
        interval: float,
        inventory: Inventory | None,
        leases: LeaseBackend | None,
        cgroups: CgroupManager | None,
        detectors: Detectors,
        accounting: Accounting,
        alerts: AlertStore,
        policy: PolicyEngine,
        record: Callable[..., None],
        notifier: Notifier | None = None,
        cgroup_parent: str = "ztlab",
        handover_checks: bool = True,
        hostname: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Use :meth:`open`; this takes the parts already built."""
        self.source = source
        self.interval = interval
        self.inventory = inventory
        self.leases = leases
        self.cgroups = cgroups
        self.detectors = detectors
        self.accounting = accounting
        self.alerts = alerts
        self.record = record
        self.hostname = hostname or socket.gethostname()
        self._clock = clock
        self._facts = ProcessFactsCache()
        self._accounts: Mapping[str, str] = {}
        self._activity: Mapping[tuple[str, str], float | None] = {}
        self._roles: Mapping[str, frozenset[str]] = {}
        self.attributor = Attributor(
            accounts=lambda: self._accounts, facts=self._facts.get, parent=cgroup_parent
        )
        self.responder = Responder(
            policy=policy,
            roles_of=lambda user: self._roles.get(user, frozenset()),
            store=alerts,
            record=record,
            stop_server=self._stop_holder,
            revoke_lease=self._revoke_lease,
            notifier=notifier,
        )
        #: how the hub stops a holder's server (set by the hub; ``None``: not possible)
        self.stop_holder: Callable[[Holder], None] | None = None
        self.handover_checks = handover_checks and leases is not None
        if self.handover_checks and leases is not None:
            leases.require_handover_checks(True)
        self._notifier = notifier
        self._responses = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztlab-alerts")
        self._pending: list[Future[list[str]]] = []
        self._lock = threading.Lock()
        self._latest: TickResult | None = None
        self._xid = XidMemory()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.errors = 0

    @classmethod
    def open(
        cls,
        config: ZtlabConfig,
        *,
        source: TelemetrySource,
        policy: PolicyEngine,
        record: Callable[..., None],
        inventory: Inventory | None,
        leases: LeaseBackend | None,
        cgroups: CgroupManager | None,
    ) -> GpuMonitor:
        """The monitor of ``config`` reading ``source``, its state under ``state_dir/monitor``."""
        settings = config.gpu.monitor
        state = private_directory(
            config.state_dir / "monitor", what="monitor state", error=ConfigError, tighten=True
        )
        detectors = Detectors(
            interval=settings.interval_seconds,
            baseline_threshold=settings.baseline_threshold,
            baseline_window_hours=settings.baseline_window_hours,
            baseline_min_samples=max(
                1, round(settings.baseline_min_hours * 3600 / settings.interval_seconds)
            ),
            idle_minutes=settings.idle_minutes,
            full_load_percent=settings.full_load_percent,
            full_load_seconds=settings.full_load_seconds,
            ecc_sbe_threshold=settings.ecc_sbe_threshold,
            extra_miner_patterns=tuple(settings.miner_patterns),
        )
        return cls(
            source=source,
            interval=settings.interval_seconds,
            inventory=inventory,
            leases=leases,
            cgroups=cgroups,
            detectors=detectors,
            accounting=Accounting.open(state / "accounting.sqlite"),
            alerts=AlertStore.open(state / "alerts.sqlite"),
            policy=policy,
            record=record,
            notifier=Notifier(settings.notify_url) if settings.notify_url else None,
            cgroup_parent=cgroups.parent if cgroups is not None else "ztlab",
            handover_checks=settings.handover_checks,
        )

    # -- what the hub tells the monitor --------------------------------------------------

    def set_directory(
        self,
        *,
        accounts: Mapping[str, str],
        activity: Mapping[tuple[str, str], float | None],
        roles: Mapping[str, frozenset[str]],
    ) -> None:
        """Unix account -> user, ``(user, server)`` -> last user activity (POSIX seconds),
        and user -> roles (for the policy's decisions on responses); replaced as a whole."""
        self._accounts = dict(accounts)
        self._activity = dict(activity)
        self._roles = dict(roles)

    def acknowledge(self, alert_id: int, *, by: str) -> StoredAlert:
        """An admin marks alert ``alert_id`` as seen (recorded in the audit log)."""
        stored = self.alerts.acknowledge(alert_id, by=by)
        self.record(by, "gpu.alert_acknowledged", alert=alert_id)
        return stored

    # -- one tick --------------------------------------------------------------------------

    def tick(self) -> TickResult:
        """Read, attribute, account, detect and respond, hand over (see the module doc)."""
        started = time.perf_counter()
        # (1) read
        reading = self.source.read()
        now = reading.t
        # (2) attribute
        leases = self.leases.active() if self.leases is not None else []
        view = LeaseView(inventory=self.inventory, leases=leases, devices=reading.devices)
        processes = self.attributor.attribute(reading.processes, view)
        self._facts.prune({p.pid for p in reading.processes})
        # (3) account (Accounting measures the time between ticks, capped after a stall)
        self.accounting.add(now, self.interval, reading, processes)
        self._xid.observe(reading)
        # (4) detect and respond
        alerts = self.detectors.check(
            Tick(
                t=now,
                reading=reading,
                processes=processes,
                pool_devices=view.pool_devices,
                idle_since=self._activity,
            )
        )
        # (5) hand over
        if self.handover_checks:
            alerts += self._hand_over(reading, processes, view)
        result = TickResult(
            reading=reading,
            processes=tuple(processes),
            alerts=tuple(alerts),
            duration=time.perf_counter() - started,
        )
        with self._lock:
            self._latest = result
        self._pending = [future for future in self._pending if not future.done()]
        for alert in alerts:  # responses may stop a server: off the sampler's thread
            self._pending.append(self._responses.submit(self.responder.respond, alert))
        return result

    def wait_responses(self, timeout: float = 60.0) -> None:
        """Wait until the responses to every alert raised so far are carried out."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result(timeout=timeout)

    def _hand_over(
        self, reading: Reading, processes: Sequence[AttributedProcess], view: LeaseView
    ) -> list[Alert]:
        """Clear the GPUs whose old holder left nothing behind; hold back the others."""
        assert self.leases is not None
        raised: list[Alert] = []
        for handover in self.leases.pending_handovers():
            if handover.since > reading.t:
                continue  # the lease ended after this reading: judge it on the next one
            uuid = view.uuid_of(handover.gpu)
            device = reading.device(uuid) if uuid is not None else None
            if uuid is None or device is None:
                continue  # not seen: it stays held until it is
            left = [
                p
                for p in processes
                if p.reading.uuid == uuid
                and (
                    p.holder is None
                    or (p.holder.user, p.holder.server) == (handover.user, handover.server)
                )
            ]
            if not left:
                self.leases.clear_handover(
                    handover.gpu,
                    actor=SYSTEM_ACTOR,
                    ecc_mode=device.ecc_mode,
                    checked=f"no process of {handover.user}'s holder on {uuid}",
                    lease=handover.lease,
                )
                continue
            if handover.state == "held":
                continue  # already held back and alerted
            shown = ", ".join(
                f"pid {p.reading.pid} ({p.facts.comm if p.facts else '?'})" for p in left
            )
            reason = f"processes still run after the lease {handover.lease} ended: {shown}"
            self.leases.hold_handover(
                handover.gpu, reason=reason, actor=SYSTEM_ACTOR, lease=handover.lease
            )
            first = left[0]
            raised.append(
                Alert(
                    kind="handover_dirty",
                    severity="critical",
                    message=(
                        f"GPU {handover.gpu} ({uuid}) is held back: the lease {handover.lease} "
                        f"of {handover.user} ended and {shown} still run on it"
                    ),
                    uuid=uuid,
                    pid=first.reading.pid,
                    holder=first.holder,
                    lease=LeaseHold(
                        lease=handover.lease,
                        user=handover.user,
                        server=handover.server,
                        pool=view.pool_devices.get(uuid, ""),
                        gpu=handover.gpu,
                    ),
                    t=reading.t,
                    evidence={"pids": [p.reading.pid for p in left], "gpu": handover.gpu},
                )
            )
        return raised

    # -- responses ---------------------------------------------------------------------

    def _stop_holder(self, holder: Holder) -> None:
        if self.stop_holder is None:
            raise RuntimeError("this hub cannot stop servers from the monitor")
        self.stop_holder(holder)

    def _revoke_lease(self, lease: LeaseHold) -> None:
        """Take the GPUs from ``lease``: end the lease, close the device fence of every
        cgroup of its holder, and end the holder's processes on the lease's GPUs (a closed
        fence stops new opens only)."""
        if self.leases is None:
            raise RuntimeError("this hub has no GPU leases")
        held = next((h for h in self.leases.active() if h.id == lease.lease), None)
        gpus = held.gpus if held is not None else (lease.gpu,)
        self.leases.release(lease.lease, reason="revoked by the GPU monitor", actor=SYSTEM_ACTOR)
        holder = (lease.user, lease.server)
        if self.cgroups is not None:
            for name in self.cgroups.names():
                owner = self.attributor.cgroup_holder(name)
                cgroup = self.cgroups.get(name)
                if owner is not None and (owner.user, owner.server) == holder and cgroup:
                    cgroup.fence_devices()
        latest = self.latest
        if latest is None:
            return
        view = LeaseView(inventory=self.inventory, leases=(), devices=latest.reading.devices)
        devices = {view.uuid_of(gpu) for gpu in gpus} - {None}
        for process in latest.processes:
            mine = process.holder and (process.holder.user, process.holder.server) == holder
            if mine and process.reading.uuid in devices:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.reading.pid, signal.SIGKILL)

    # -- the sampler thread ------------------------------------------------------------

    @property
    def latest(self) -> TickResult | None:
        """The last tick, or ``None`` before the first."""
        with self._lock:
            return self._latest

    def start(self) -> None:
        """Run :meth:`tick` every ``interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ztlab-gpu-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
                self.samples += 1
            except Exception:
                self.errors += 1
                _log.exception("GPU monitor: a sample failed (the next one runs)")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind: skip the missed ticks rather than burst
                next_at = time.monotonic()
                delay = 0.0
            self._stop.wait(delay)

    def metrics(self) -> str:
        """The Prometheus exposition of the latest tick and the accounts."""
        latest = self.latest
        return render(
            reading=latest.reading if latest else None,
            processes=latest.processes if latest else (),
            accounting=self.accounting,
            alert_counts=self.alerts.counts(),
            hostname=self.hostname,
            sampler={
                "last_sample_duration_seconds": latest.duration if latest else None,
                "samples_total": self.samples,
                "errors_total": self.errors,
                "last_sample_timestamp_seconds": latest.reading.t if latest else None,
            },
            last_xid=self._xid.last(),
        )

    def close(self) -> None:
        """Stop the thread, then close the source and stores (accounts flushed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
        self._responses.shutdown(wait=True)
        if self._notifier is not None:
            self._notifier.close()
        with contextlib.suppress(Exception):
            self.source.close()
        self.accounting.close()
        self.alerts.close()


def describe(result: TickResult) -> dict[str, Any]:
    """A JSON-able summary of one tick (for the API and the CLI)."""
    return {
        "t": result.reading.t,
        "devices": len(result.reading.devices),
        "processes": [
            {
                "pid": p.reading.pid,
                "gpu": p.reading.uuid,
                "user": p.holder.user if p.holder else None,
                "server": p.holder.server if p.holder else None,
                "lease": p.lease.lease if p.lease else None,
            }
            for p in result.processes
        ],
    }
