"""The catalogue of audit events: every action the control plane records, and its fields.

One list, used three ways: the control plane's writers go through
:class:`CataloguedSink`, which checks each event against it (a misspelt action would
otherwise be an event nobody searches for); the documentation's audit page is rendered from
it; and the end-to-end tests check every record their hubs wrote against it. A mismatch is
a programming error: the sink logs it and still records the event (evidence is never
dropped, and an operation is never left half done because of its record), and the tests
fail on it. Operators' own records (``ztlab audit append``) are not bound by the catalogue.

Each :class:`EventType` names its ``actor`` (who the record's actor is) and the ``detail``
fields it may carry; fields marked optional may be left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ztlab.common.auditlog.sink import AuditSink
from ztlab.common.errors import AuditError

__all__ = ["CATALOGUE", "CataloguedSink", "EventType", "check_event_type", "event_types"]


@dataclass(frozen=True, slots=True)
class EventType:
    """One kind of audit record."""

    #: the dotted action name (``login.refused``)
    name: str
    #: what happened, in one sentence
    summary: str
    #: who the record's actor is
    actor: str
    #: detail field -> what it holds
    fields: Mapping[str, str] = field(default_factory=dict)
    #: fields that may be left out
    optional: frozenset[str] = frozenset()

    @property
    def section(self) -> str:
        """The first part of the name (``login``), which groups events in the docs."""
        return self.name.split(".", 1)[0]


_USER = "the hub user"
_SCHEDULE = {"schedule": "the schedule's name", "owner": "whose schedule it is"}
_RUN = {
    "run": "the run's id",
    "owner": "whose run it is (its sandbox, token and models are theirs)",
    "schedule": "its schedule (none: started by hand)",
    "attempt": "1, or the retry's number",
}
_CLUSTER = {
    "cluster": "cluster id",
    "owner": "the user who started it",
    "pool": "the pool",
}
_SYSTEM = "``ztlab-hub`` (the control plane on its own)"

_HANDOVER = {
    "gpu": "the GPU id as configured",
    "lease": "the lease that ended",
    "user": "its holder",
    "server": "the holder's server (empty: the default one)",
    "pool": "the pool",
    "state": "the state until this event (checking or held)",
    "since": "when the lease ended (UTC)",
    "waited_seconds": "seconds since the lease ended",
}

_LEASE_FIELDS = {
    "lease": "lease id",
    "user": "the holder",
    "server": "the holder's server name (empty: the default server)",
    "pool": "GPU pool",
    "gpus": "GPU ids, as configured",
    "minors": "``N`` of each ``/dev/nvidiaN``",
    "granted_at": "when it was granted (UTC)",
    "expires_at": "when it expires (UTC)",
}
_LEASE_ENDED = {
    **_LEASE_FIELDS,
    "released_at": "when it ended (UTC)",
    "held_seconds": "how long it was held",
    "reason": "why it ended (``server stopped``, ``start failed``, ``reconciled``, ...)",
}
_MODEL_REFUSED = {"model": "``NAME@VERSION``", "reason": "why, as the user was told"}
_MODEL_DECISION = {
    "model": "``NAME@VERSION``",
    "alias": "the protected alias moved (empty for a rejection)",
    "reason": "the reason the approver gave",
}
_DATASET_REPORT = {
    "dataset": "``NAME@VERSION``",
    "root": "the signed manifest's root digest",
    "kind": "what the kernel found (``mismatch``, ``unverified-open``, ...)",
    "file": "the file concerned",
    "expected": "the digest the manifest lists",
    "actual": "the digest the kernel computed",
    "detail": "free text from the kernel",
    "reported_by": "``kernel``",
}


_PACKAGE_FILE = {
    "project": "the project (normalised name)",
    "version": "the file's version (``null`` when its name has none)",
    "filename": "the file asked for",
    "source_ip": "the caller's address (a user's sandbox, or the build's)",
}
_ENV = {"environment": "the environment's name"}
_TYPES: tuple[EventType, ...] = (
    # -- the control plane itself --
    EventType(
        "control_plane.up",
        "``ztlab up`` validated the configuration and policies and started the environment.",
        "``ztlab``",
        {
            "config": "the configuration file",
            "policies": "policy ids",
            "roles": "role names",
            "pid": "process id of ``ztlab up``",
        },
    ),
    EventType(
        "control_plane.started",
        "The hub's control plane opened its services.",
        _SYSTEM,
        {
            "config": "the configuration file",
            "pid": "the hub's process id",
            "services": "the services opened",
            "version": "ztlab's version",
        },
    ),
    EventType(
        "control_plane.reconciled",
        "After a (re)start, leases and sandboxes were matched with the servers that run.",
        _SYSTEM,
        {
            "running": "servers found running (``user/server``)",
            "leases_released": "leases whose server no longer runs",
            "sandboxes_stopped": "accounts whose processes ran without a server",
        },
    ),
    EventType(
        "control_plane.stopped",
        "The hub's control plane closed its services (a clean stop).",
        _SYSTEM,
        {"pid": "the hub's process id"},
    ),
    EventType(
        "control_plane.service_restarted",
        "A service the control plane runs (MLflow) had exited and was started again.",
        _SYSTEM,
        {"service": "its name", "exit_status": "how it ended", "log": "its log file"},
        optional=frozenset({"exit_status"}),
    ),
    EventType(
        "audit.torn_tail_quarantined",
        "Opening the log found a half-written last line (a crash) and moved it aside.",
        "``ztlab-audit``",
        {"file": "where the torn bytes were moved", "bytes": "how many"},
    ),
    # -- login and sessions --
    EventType(
        "login.success",
        "A user signed in with both factors proven.",
        _USER,
        {
            "mfa": "``provider``, ``totp`` or ``recovery``",
            "roles": "policy roles granted",
            "client_ip": "the browser's address",
        },
    ),
    EventType(
        "login.refused",
        "A sign-in was refused; ``reason`` says at which check.",
        "the user, or ``anonymous`` before the user is known",
        {
            "reason": "the check that failed (``network``, ``id-token-signature``, ``no-role``, "
            "...)",
            "client_ip": "the browser's address",
            "groups": "the provider's groups",
            "error": "the verifier's message",
        },
        optional=frozenset({"client_ip", "groups", "error"}),
    ),
    EventType(
        "login.mfa_required",
        "The provider proved no second factor (or the context changed): TOTP step-up asked.",
        _USER,
        {"why": "why the step-up was asked", "client_ip": "the browser's address"},
    ),
    EventType(
        "session.expired",
        "A session ended at its maximum or idle age.",
        _USER,
        {"reason": "``max-age`` or ``idle``", "idle_seconds": "how long it was idle"},
        optional=frozenset({"idle_seconds"}),
    ),
    EventType(
        "session.signed_out",
        "A user signed out: every session of theirs (all browsers, every server's "
        "enforcement-point session) ended.",
        _USER,
    ),
    EventType(
        "session.refresh_refused",
        "Re-checking a session at the provider failed (account disabled, no role left, ...).",
        _USER,
        {"reason": "why"},
    ),
    EventType(
        "session.roles_changed",
        "The provider's groups now map to other roles.",
        _USER,
        {"old": "roles before", "new": "roles now"},
    ),
    # -- the hub's TOTP ----------------------------------------------------------------------
    EventType(
        "mfa.totp.enrollment_started",
        "A user was shown a new TOTP secret (not yet confirmed).",
        _USER,
        {"replaced_pending": "whether an unconfirmed one was replaced"},
    ),
    EventType(
        "mfa.totp.enrolled",
        "A user confirmed a TOTP enrollment with a first code.",
        _USER,
        {"recovery_codes": "recovery codes issued"},
    ),
    EventType(
        "mfa.totp.verified",
        "A TOTP or recovery code was accepted.",
        _USER,
        {"method": "``totp`` or ``recovery``", "stage": "``verify`` or ``enroll``"},
    ),
    EventType(
        "mfa.totp.failed",
        "A TOTP or recovery code was refused.",
        _USER,
        {
            "reason": "``wrong-code``, ``replayed``, ``locked``, ...",
            "failures": "failures in a row",
            "stage": "``verify`` or ``enroll``",
        },
        optional=frozenset({"stage"}),
    ),
    EventType(
        "mfa.totp.locked",
        "Too many wrong codes in a row: the user's step-up is locked.",
        _USER,
        {"failures": "failures in a row", "lockout_seconds": "how long"},
    ),
    EventType(
        "mfa.totp.unlocked",
        "An administrator lifted a user's lockout.",
        "the administrator",
        {
            "user": "whose lockout",
            "was_locked": "whether it was locked",
            "failures": "failures before",
        },
    ),
    EventType(
        "mfa.totp.reset",
        "An administrator reset a user's enrollment.",
        "the administrator",
        {"user": "whose", "was_enrolled": "whether one existed"},
    ),
    EventType(
        "mfa.recovery_code.used",
        "A single-use recovery code was spent.",
        _USER,
        {"codes_left": "unused codes left"},
    ),
    # -- policy --
    EventType(
        "policy.decision",
        "The policy engine allowed or denied a request.",
        "the principal asking",
        {
            "roles": "the principal's roles",
            "action": "the policy action",
            "resource": "the resource",
            "allowed": "the decision",
            "policy_id": "the deciding policy",
            "reason": "the decision's reason",
            "context": "the request's context",
        },
    ),
    # -- servers --
    EventType(
        "account.created",
        "The dedicated Unix account of a user was created (first spawn).",
        _USER,
        {"account": "the Unix account"},
    ),
    EventType(
        "server.started",
        "A user's server started in its sandbox.",
        _USER,
        {
            "account": "the Unix account",
            "cgroup": "its cgroup",
            "netns": "its network namespace",
            "lease": "its GPU lease, or null",
            "gpus": "leased GPU ids",
            "server": "server name (empty: the default server)",
        },
        optional=frozenset({"cgroup", "netns", "lease", "gpus"}),
    ),
    EventType(
        "server.spawn_failed",
        "A server did not start; ``stage`` says where (decide, account, lease, sandbox, start).",
        _USER,
        {
            "stage": "the spawn stage that failed",
            "reason": "what the user was told",
            "server": "server name (empty: the default server)",
        },
    ),
    EventType(
        "server.stopped",
        "A user's server was stopped and its sandbox ended.",
        _USER,
        {"server": "server name", "leases_released": "GPU leases released", "reason": "why"},
    ),
    EventType(
        "server.lifetime_ended",
        "A server reached the longest lifetime its roles allow and was stopped.",
        _USER,
        {"hours": "the lifetime"},
    ),
    EventType(
        "server.lease_expired",
        "A server's GPU lease expired; the server was stopped.",
        _USER,
        {"lease": "lease id"},
    ),
    # -- the enforcement point --
    EventType(
        "proxy.refused",
        "The enforcement point refused a request to a user's server (HTTP or WebSocket).",
        "the caller, or ``anonymous`` when it brought no valid credential",
        {
            "server": "whose server the request was for",
            "route": "the route class (files, notebooks, kernels, terminals, other)",
            "method": "the HTTP method",
            "path": "the path inside the server (at most 200 characters)",
            "reason": "why (``anonymous``, ``bad-token``, ``token-scope``, "
            "``session-expired``, ``policy: ID``, ``rule: NAME``, ...)",
        },
    ),
    EventType(
        "proxy.egress",
        "The bytes one caller took out of a server today passed another multiple of their "
        "roles' ``egress_report``.",
        "the caller",
        {
            "server": "whose server",
            "day": "the UTC day (``YYYY-MM-DD``)",
            "bytes_today": "response bytes sent to the caller from that server today",
            "routes": "route class -> bytes today",
            "report_every": "the ``egress_report`` size that applies, in bytes",
        },
    ),
    EventType(
        "proxy.access.summary",
        "What the enforcement point let through in the last minute, per caller and server.",
        "the caller",
        {"server": "whose server", "requests": "route class -> requests let through"},
    ),
    # -- GPU leases --
    EventType(
        "gpu.lease.granted",
        "GPUs of a pool were leased to a user's server.",
        _USER,
        {
            **_LEASE_FIELDS,
            "roles": "the holder's roles",
            "hours": "the lifetime granted",
            "policy_id": "the policy that allowed it",
        },
    ),
    EventType("gpu.lease.released", "A lease ended before its expiry.", "the holder", _LEASE_ENDED),
    EventType("gpu.lease.expired", "A lease reached its expiry.", _SYSTEM, _LEASE_ENDED),
    # -- GPU monitor --
    EventType(
        "gpu.alert",
        "The GPU monitor raised an alert (each kind is listed on the monitor page).",
        _SYSTEM,
        {
            "alert": "the alert's id in the monitor's store (null if storing it failed)",
            "kind": "the alert kind (unleased_process, outside_cgroup, miner, ...)",
            "severity": "warning or critical",
            "message": "what was seen, for admins",
            "uuid": "the GPU or MIG device",
            "pid": "the process (null for device errors)",
            "user": "the holder of the process (null: outside every ztlab cgroup)",
            "server": "the holder's server, cluster-ID or run-ID",
            "lease": "the lease the device is under (null: not leased)",
            "pool": "the device's pool",
            "subject": "the principal the policy decided the responses for",
            "evidence": "the numbers behind the alert",
            "responses": "the responses the policy permitted",
            "decisions": "response -> the policy's reason",
        },
    ),
    EventType(
        "gpu.alert_response",
        "The control plane carried out a response the policy permitted for an alert.",
        _SYSTEM,
        {
            "alert": "the alert's id",
            "kind": "the alert kind",
            "response": "notify, stop_server or revoke_lease",
            "outcome": "done or failed",
            "target": "what it acted on (webhook, server:USER/NAME, lease:ID (GPU N), ...)",
            "error": "why it failed",
        },
        optional=frozenset({"error"}),
    ),
    EventType(
        "gpu.handover.cleared",
        "After a lease ended, the monitor saw no process of its holder on the GPU: it may "
        "be leased again.",
        _SYSTEM,
        {
            **_HANDOVER,
            "ecc_mode": "whether ECC was on (null: not reported)",
            "checked": "what was checked",
        },
    ),
    EventType(
        "gpu.handover.held",
        "After a lease ended, processes of its holder still ran on the GPU: it is held back.",
        _SYSTEM,
        {**_HANDOVER, "reason": "the processes found"},
    ),
    EventType(
        "gpu.handover.released_by_admin",
        "An admin gave a GPU waiting for (or failing) its hand-over check back to its pool.",
        "the admin",
        {**_HANDOVER, "reason": "the last reason stored"},
    ),
    EventType(
        "gpu.alert_acknowledged",
        "An admin marked a GPU alert as seen.",
        "the admin",
        {"alert": "the alert's id"},
    ),
    # -- datasets --
    EventType(
        "dataset.register",
        "The control plane fingerprinted, signed and registered a dataset version.",
        "the data steward",
        {
            "dataset": "``NAME@VERSION``",
            "root": "manifest root digest",
            "algorithm": "``blake3`` or ``sha256``",
            "files": "files",
            "bytes": "total size",
            "source": "the directory",
            "keyid": "the signing key's id",
        },
    ),
    EventType(
        "dataset.verify.failed",
        "A kernel reported data that does not match its signed manifest.",
        _USER,
        _DATASET_REPORT,
        optional=frozenset({"kind", "file", "expected", "actual", "detail"}),
    ),
    EventType(
        "dataset.read.unverified",
        "A kernel reported a dataset file opened without verification.",
        _USER,
        _DATASET_REPORT,
        optional=frozenset({"kind", "file", "expected", "actual", "detail"}),
    ),
    # -- models --
    EventType(
        "model.sign",
        "The control plane signed a registered model version over its artifacts and lineage.",
        "the trainer",
        {
            "model": "``NAME@VERSION``",
            "trainer": "who trained it",
            "run_id": "MLflow run",
            "datasets": "the datasets it read",
            "bundle_sha256": "digest of the signature bundle",
            "keyid": "the signing key's id",
            "on_register": "signed as it was registered",
        },
        optional=frozenset({"on_register"}),
    ),
    EventType("model.sign.refused", "Signing a version was refused.", _USER, _MODEL_REFUSED),
    EventType(
        "model.approve", "A version was approved; its alias moved.", "the approver", _MODEL_DECISION
    ),
    EventType("model.approve.refused", "An approval was refused.", _USER, _MODEL_REFUSED),
    EventType("model.reject", "A version was rejected.", "the approver", _MODEL_DECISION),
    EventType("model.reject.refused", "A rejection was refused.", _USER, _MODEL_REFUSED),
    EventType("model.revoke", "A protected alias was removed.", "the approver", _MODEL_DECISION),
    EventType("model.revoke.refused", "A revocation was refused.", _USER, _MODEL_REFUSED),
    EventType(
        "model.withdrawn",
        "A version registered by a run that did not succeed was deleted with its signature.",
        "``ztlab-scheduler``",
        {"model": "``NAME@VERSION``", "reason": "why (the run and how it ended)"},
    ),
    EventType(
        "model.alias.refused",
        "Someone tried to move a protected alias through MLflow's own API.",
        _USER,
        {"model": "the registered model", "alias": "the alias"},
    ),
    EventType(
        "package.served",
        "The package gateway served a file, its hash checked against the index.",
        "the user, or ``environment NAME build N (by ADMIN)`` for a build",
        {
            **_PACKAGE_FILE,
            "sha256": "the file's SHA-256 (equal to the index's)",
            "size": "bytes",
            "rule": "the allowlist rule that allowed it, and its source",
        },
    ),
    EventType(
        "package.refused",
        "The package gateway refused a file: off the allowlist, or its hash differs.",
        "the user, or the build",
        {
            **_PACKAGE_FILE,
            "reason": "the message the caller got",
            "sha256": "the SHA-256 of what the mirror gave (hash mismatch only)",
            "expected": "the SHA-256 the index lists (hash mismatch only)",
        },
        frozenset({"sha256", "expected"}),
    ),
    EventType(
        "package.requested",
        "A user asked for a package to be added to the allowlist.",
        _USER,
        {"request": "request id", "requirement": "what was asked for", "reason": "why"},
    ),
    EventType(
        "package.request_decided",
        "An admin approved or denied a package request.",
        "the admin",
        {
            "request": "request id",
            "requirement": "what was asked for",
            "user": "who asked",
            "decision": "``approved`` or ``denied``",
            "scope": "who the approval allows (``user:NAME`` or ``role:NAME``)",
            "note": "the admin's note",
        },
    ),
    EventType(
        "pool.cluster_started",
        "A user's Dask cluster started in a pool (scheduler listening, workers starting).",
        _USER,
        {
            **_CLUSTER,
            "workers": "how many workers",
            "gpus": "GPU ids leased for the workers, one per GPU worker",
            "lease": "the GPU lease id (none without GPUs)",
            "shared_with": "users the owner shares it with",
            "scheduler": "the scheduler's address (in the owner's network namespace)",
            "expires_at": "when the control plane stops it at the latest (UTC)",
        },
        frozenset({"lease"}),
    ),
    EventType(
        "pool.cluster_refused",
        "A cluster was not started: the policy, the pool's roles or a quota said no.",
        _USER,
        {
            "pool": "the pool",
            "workers": "workers asked for",
            "gpus": "GPUs asked for",
            "reason": "the message the user got",
        },
    ),
    EventType(
        "pool.cluster_failed",
        "A cluster's processes did not start; its GPUs were released.",
        _USER,
        {**_CLUSTER, "error": "what failed"},
    ),
    EventType(
        "pool.cluster_stopped",
        "A cluster was stopped and its GPUs released.",
        "who stopped it, or ``ztlab-hub`` (lifetime, lost role or session, reconciliation)",
        {**_CLUSTER, "reason": "why", "leases_released": "lease ids released"},
    ),
    EventType(
        "pool.certificate_issued",
        "The pool's authority issued a client certificate to a user.",
        _USER,
        {
            "pool": "the pool",
            "holder": "the identity the certificate names",
            "serial": "its serial number (hex)",
            "expires_at": "when it expires (UTC)",
            "cluster": "the cluster it was issued with (empty for a renewal)",
        },
    ),
    EventType(
        "pool.connection_refused",
        "A cluster's scheduler or worker refused a connection (collected from the scheduler).",
        "``cluster ID`` (the owner's processes hold the record until the hub collects it)",
        {
            **_CLUSTER,
            "peer": "the address that connected",
            "reason": "why it was refused",
            "holder": "the identity its certificate named (none: no valid certificate)",
            "count": "how many times within 10 s from that address for that reason",
        },
    ),
    # -- scheduled and one-off notebook runs --
    EventType(
        "schedule.added",
        "A schedule of notebook runs was added (or, from ztlab.toml, changed).",
        "its owner, or ``ztlab-scheduler`` for one in ``[[runs.schedules]]``",
        {
            **_SCHEDULE,
            "cron": "the cron expression",
            "timezone": "its time zone",
            "notebook": "the notebook's name",
            "notebook_sha256": "the notebook's SHA-256 (the copy the control plane keeps)",
            "source": "``api`` or ``config``",
        },
    ),
    EventType("schedule.paused", "A schedule was paused.", "who paused it", _SCHEDULE),
    EventType("schedule.resumed", "A schedule was resumed.", "who resumed it", _SCHEDULE),
    EventType(
        "schedule.removed",
        "A schedule was removed; its queued runs were cancelled.",
        "who removed it (``ztlab-scheduler``: gone from ``[[runs.schedules]]``)",
        {**_SCHEDULE, "cancelled": "the queued runs cancelled"},
    ),
    EventType(
        "run.queued",
        "A run was queued: started by hand, fired by its schedule, or a retry.",
        "who started it, or ``ztlab-scheduler``",
        {
            **_RUN,
            "scheduled_for": "the fire time it is for (UTC)",
            "notebook": "the notebook's name",
            "notebook_sha256": "its SHA-256",
            "parameters": "the papermill parameters",
        },
        optional=frozenset({"schedule", "scheduled_for"}),
    ),
    EventType(
        "run.skipped",
        "A fire time made no run: the previous run still ran (``skip``) or the hub was down "
        "(``missed``).",
        "``ztlab-scheduler``",
        {
            **_RUN,
            "scheduled_for": "the fire time (UTC)",
            "status": "skipped or missed",
            "reason": "why",
        },
    ),
    EventType(
        "run.refused",
        "A run did not start: the policy (``run_schedule``) or the identity provider (account "
        "disabled, no role left) said no; it is not retried.",
        "``ztlab-scheduler``",
        {**_RUN, "reason": "the refusal, as its owner sees it"},
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "run.started",
        "A run's sandbox started (cgroup, lease, token for this run only).",
        "``ztlab-scheduler``",
        {
            **_RUN,
            "cgroup": "its cgroup",
            "lease": "its GPU lease (none: no GPU)",
            "gpus": "GPU ids",
        },
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "run.succeeded",
        "Every cell ran; the executed notebook is kept and the provenance signed.",
        "``ztlab-scheduler``",
        {
            **_RUN,
            "duration_seconds": "from start to finish",
            "executed_sha256": "the executed notebook's SHA-256",
            "provenance_sha256": "SHA-256 of the signed provenance envelope",
            "models": "versions it registered (``NAME@VERSION``)",
            "datasets": "registered datasets it read, with their root digests",
        },
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "run.failed",
        "A run failed: no GPU for it (quota, full pool), its sandbox could not start, a cell "
        "raised, its memory limit stopped it, or it ran too long; models it registered were "
        "withdrawn.",
        "``ztlab-scheduler``",
        {
            **_RUN,
            "reason": "what failed",
            "failed_cell": "index of the cell that raised",
            "duration_seconds": "from start to the end",
            "executed_sha256": "the executed notebook's SHA-256, where it wrote one",
            "models_withdrawn": "versions it had registered, now deleted",
        },
        optional=frozenset({"schedule", "failed_cell", "duration_seconds", "executed_sha256"}),
    ),
    EventType(
        "run.interrupted",
        "A run's scheduler died while it ran; the next one ended what was left of it.",
        "``ztlab-scheduler``",
        {**_RUN, "reason": "what was found", "models_withdrawn": "versions deleted"},
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "run.cancelled",
        "A run was cancelled (by its owner, an admin, or the GPU monitor).",
        "who cancelled it",
        {**_RUN, "reason": "why"},
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "run.provenance",
        "The control plane signed a run's SLSA provenance (in-toto, DSSE); the envelope is "
        "here in full.",
        "``ztlab-scheduler``",
        {
            **_RUN,
            "provenance_sha256": "SHA-256 of the envelope",
            "keyid": "the signing key's id",
            "subjects": "what it is about (executed notebook, models)",
            "mlflow_runs": "MLflow runs it was stored with",
            "envelope": "the DSSE envelope (JSON)",
        },
        optional=frozenset({"schedule"}),
    ),
    EventType(
        "environment.defined",
        "An environment was defined or redefined.",
        "the admin (``ztlab-hub`` for the shipped ones)",
        {**_ENV, "requirements": "its requirements", "layer_on": "interpreter it layers on"},
    ),
    EventType(
        "environment.build_started",
        "A build of an environment started.",
        "the admin (``ztlab-hub`` for the build of ``base`` a new hub starts)",
        {**_ENV, "build": "build number", "layer_on": "interpreter it layers on"},
    ),
    EventType(
        "environment.built",
        "A build finished; its lock was written.",
        "who started it",
        {
            **_ENV,
            "build": "build number",
            "digest": "the lock's digest (what lineage records)",
            "files": "files in the build's folder",
            "distributions": "distributions the environment sees",
        },
    ),
    EventType(
        "environment.build_failed",
        "A build failed (the step and the message).",
        "who started it",
        {**_ENV, "build": "build number", "error": "what failed"},
    ),
    EventType(
        "environment.retired",
        "An environment was retired (running kernels keep it).",
        "the admin",
        _ENV,
    ),
    EventType(
        "environment.verified",
        "A build was compared with its lock.",
        "the admin",
        {
            **_ENV,
            "build": "build number",
            "digest": "the lock's digest",
            "ok": "whether everything matched",
            "problems": "the first differences",
        },
    ),
)

#: every event type, by action name
CATALOGUE: Final[Mapping[str, EventType]] = {event.name: event for event in _TYPES}


def event_types() -> Iterator[EventType]:
    """Every event type, in the catalogue's order (grouped by section)."""
    return iter(_TYPES)


def check_event_type(action: str, detail: Mapping[str, Any]) -> None:
    """:class:`AuditError` unless ``action`` is catalogued and ``detail`` fits its fields."""
    event = CATALOGUE.get(action)
    if event is None:
        raise AuditError(
            f"audit action {action!r} is not in the catalogue (ztlab.common.auditlog.events)",
            hint="add it there, with its fields, before recording it",
        )
    unknown = set(detail) - set(event.fields)
    missing = set(event.fields) - event.optional - set(detail)
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown field(s) {', '.join(sorted(unknown))}")
        if missing:
            parts.append(f"missing field(s) {', '.join(sorted(missing))}")
        raise AuditError(
            f"audit action {action!r}: {'; '.join(parts)}",
            hint=f"its fields are: {', '.join(event.fields) or 'none'}",
        )


class CataloguedSink:
    """An :class:`~ztlab.common.auditlog.sink.AuditSink` that checks events against the
    catalogue: a mismatch is logged as an error (``ztlab.audit``), the event recorded."""

    def __init__(self, sink: AuditSink) -> None:
        self._sink = sink

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        """Check the event against the catalogue, then queue it."""
        try:
            check_event_type(action, detail)
        except AuditError as exc:
            _log.error("%s (%s)", exc.message, exc.hint)
        self._sink.record(actor=actor, action=action, detail=detail)


_log = logging.getLogger("ztlab.audit")
