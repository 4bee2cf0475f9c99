"""The dataset registry: signed, immutable versions, registered and read through policy.

Uses the real default policies, a real P-256 attestation key on disk and a real sqlite
file; only the audit sink is an in-memory list (the protocol is one ``record`` method).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ztlab.common.attest import (
    Envelope,
    PrivateKey,
    key_id,
    load_public_keys,
    verify_signed_manifest,
)
from ztlab.common.errors import KeyFileError, UsageError
from ztlab.common.manifest import ManifestError, UnsafeTreeError, fingerprint
from ztlab.hub.datasets import (
    DatasetExists,
    DatasetNotFound,
    DatasetRegistry,
    RegisteredDataset,
    RegistryDenied,
    RegistryError,
)
from ztlab.hub.keys import load_or_create_attestation_key
from ztlab.hub.policy import AUDIT_ACTION, PolicyEngine, Principal

STEWARD = Principal(name="sam", roles=frozenset({"data-steward"}))
TRAINER = Principal(name="alice", roles=frozenset({"trainer"}))
VIEWER = Principal(name="vera", roles=frozenset({"viewer"}))
NOBODY = Principal(name="nobody", roles=frozenset())
TRAINER_STEWARD = Principal(name="tess", roles=frozenset({"data-steward", "trainer"}))


@dataclass(frozen=True)
class Event:
    actor: str
    action: str
    detail: dict[str, Any]


@dataclass
class MemorySink:
    """An audit sink that keeps what it is given."""

    events: list[Event] = field(default_factory=list)

    def record(self, *, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        self.events.append(Event(actor, action, dict(detail)))

    def actions(self, action: str) -> list[Event]:
        return [event for event in self.events if event.action == action]


@dataclass
class Lab:
    tmp: Path
    store: Path
    db: Path
    key_path: Path
    key: PrivateKey
    sink: MemorySink
    registry: DatasetRegistry

    def open(self) -> DatasetRegistry:
        """A second registry on the same database, key and policy."""
        return DatasetRegistry(
            path=self.db,
            key=load_or_create_attestation_key(self.key_path),
            policy=PolicyEngine.defaults(audit=self.sink),
            audit=self.sink,
            storage_roots=[self.store],
        )


def _write_dataset(directory: Path, *, seed: int = 0) -> Path:
    (directory / "train").mkdir(parents=True)
    (directory / "train" / "images.bin").write_bytes(bytes(range(256)) * (seed + 3))
    (directory / "train" / "labels.csv").write_text(f"label\n{seed}\n1\n")
    (directory / "README").write_text("a small dataset\n")
    return directory


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    store = tmp_path / "store"
    store.mkdir()
    _write_dataset(store / "mnist" / "3")
    key_path = tmp_path / "keys" / "attest.key"
    key = load_or_create_attestation_key(key_path)
    sink = MemorySink()
    db = tmp_path / "registry" / "datasets.sqlite"
    registry = DatasetRegistry(
        path=db,
        key=key,
        policy=PolicyEngine.defaults(audit=sink),
        audit=sink,
        storage_roots=[store],
    )
    yield Lab(tmp_path, store, db, key_path, key, sink, registry)
    registry.close()


def _register(lab: Lab, ref: str = "mnist@3", directory: Path | None = None) -> RegisteredDataset:
    return lab.registry.register(STEWARD, ref, str(directory or lab.store / "mnist" / "3"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- registration ------------------------------------------------------------------------


def test_steward_registers_a_signed_version(lab: Lab) -> None:
    directory = lab.store / "mnist" / "3"
    expected = fingerprint(directory)
    row = _register(lab)

    assert row.ref == "mnist@3"
    assert (row.name, row.version) == ("mnist", "3")
    assert row.root == expected.root
    assert row.algorithm == expected.algorithm
    assert row.files == len(expected.entries) == 3
    assert row.bytes == expected.total_size
    assert row.source == str(directory.resolve())
    assert row.registered_by == "sam"
    assert row.keyid == key_id(lab.key.public_key()) == lab.registry.keyid

    public = lab.key.public_key()
    envelope = Envelope.from_json(row.envelope)
    signed = verify_signed_manifest(envelope, {key_id(public): public}, expected_ref="mnist@3")
    assert signed.manifest == expected
    assert signed.registered_by == "sam"
    assert signed.source == row.source
    assert signed.registered_at == row.registered_at
    assert lab.registry.envelope(row) == envelope

    # the published .pub file is the key that signed it
    published = load_public_keys([lab.key_path.with_name("attest.key.pub")])
    assert verify_signed_manifest(envelope, published).keyid == row.keyid

    (registered,) = lab.sink.actions("dataset.register")
    assert registered.actor == "sam"
    assert registered.detail["dataset"] == "mnist@3"
    assert registered.detail["root"] == expected.root
    assert registered.detail["keyid"] == row.keyid
    (decision,) = lab.sink.actions(AUDIT_ACTION)
    assert decision.detail["action"] == "register_dataset"
    assert decision.detail["resource"] == "dataset:mnist@3"
    assert decision.detail["allowed"] is True
    assert lab.sink.events.index(decision) < lab.sink.events.index(registered)
    assert lab.registry.all_versions() == [row]


def test_registry_and_key_files_are_private(lab: Lab) -> None:
    _register(lab)
    assert _mode(lab.db) == 0o600
    assert _mode(lab.db.parent) == 0o700
    for side in lab.db.parent.iterdir():  # the WAL and shared-memory files too
        assert _mode(side) & 0o077 == 0, side
    assert _mode(lab.key_path) == 0o600
    assert _mode(lab.key_path.parent) == 0o700
    public = lab.key_path.with_name("attest.key.pub")
    assert public.is_file()
    assert _mode(public) == 0o644
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_attestation_key_is_reloaded_not_replaced(lab: Lab) -> None:
    again = load_or_create_attestation_key(lab.key_path)
    assert key_id(again.public_key()) == key_id(lab.key.public_key())
    lab.key_path.chmod(0o644)
    with pytest.raises(KeyFileError):
        load_or_create_attestation_key(lab.key_path)


def test_same_version_cannot_be_registered_twice(lab: Lab) -> None:
    directory = lab.store / "mnist" / "3"
    first = _register(lab)
    (directory / "train" / "extra.bin").write_bytes(b"added later")
    assert fingerprint(directory).root != first.root

    with pytest.raises(DatasetExists) as caught:
        _register(lab)
    assert caught.value.status == 409
    assert lab.registry.get(TRAINER, "mnist@3") == first
    assert len(lab.sink.actions("dataset.register")) == 1

    # the changed data goes in as a new version
    second = _register(lab, "mnist@4", directory)
    assert second.root == fingerprint(directory).root != first.root
    assert [row.ref for row in lab.registry.all_versions()] == ["mnist@3", "mnist@4"]


@pytest.mark.parametrize("who", [TRAINER, VIEWER, NOBODY], ids=lambda p: p.name)
def test_register_denied_without_the_steward_role(lab: Lab, who: Principal) -> None:
    with pytest.raises(RegistryDenied) as caught:
        lab.registry.register(who, "mnist@3", str(lab.store / "mnist" / "3"))
    assert caught.value.status == 403
    (decision,) = lab.sink.actions(AUDIT_ACTION)
    assert decision.actor == who.name
    assert decision.detail["action"] == "register_dataset"
    assert decision.detail["resource"] == "dataset:mnist@3"
    assert decision.detail["allowed"] is False
    assert lab.sink.actions("dataset.register") == []
    assert lab.registry.all_versions() == []


def _outside_absolute(lab: Lab) -> str:
    return str(_write_dataset(lab.tmp / "outside" / "data"))


def _relative(lab: Lab) -> str:
    # relative to the working directory, where it would name a directory inside the root
    return os.path.relpath(lab.store / "mnist" / "3")


def _dotdot_escape(lab: Lab) -> str:
    _write_dataset(lab.tmp / "outside" / "data")
    return f"{lab.store}/mnist/../../outside/data"


def _symlink_escape(lab: Lab) -> str:
    target = _write_dataset(lab.tmp / "outside" / "data")
    (lab.store / "link").symlink_to(target, target_is_directory=True)
    return str(lab.store / "link")


def _sibling_prefix(lab: Lab) -> str:
    # /tmp/.../store-evil starts with the root's name but is not inside it
    return str(_write_dataset(lab.tmp / "store-evil" / "data"))


def _a_file(lab: Lab) -> str:
    return str(lab.store / "mnist" / "3" / "README")


def _missing(lab: Lab) -> str:
    return str(lab.store / "nothing-here")


ESCAPES: dict[str, Callable[[Lab], str]] = {
    "absolute-outside": _outside_absolute,
    "relative": _relative,
    "dotdot-escape": _dotdot_escape,
    "symlink-in-root-to-outside": _symlink_escape,
    "sibling-with-root-prefix": _sibling_prefix,
    "not-a-directory": _a_file,
    "missing": _missing,
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_register_refuses_paths_outside_the_storage_roots(
    lab: Lab, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(lab.tmp)
    source = ESCAPES[case](lab)
    with pytest.raises(RegistryError) as caught:
        lab.registry.register(STEWARD, "mnist@3", source)
    assert caught.value.status == 400
    assert lab.registry.all_versions() == []
    assert lab.sink.actions("dataset.register") == []
    # the control: the same registry accepts a directory inside the root
    assert _register(lab).ref == "mnist@3"


def test_a_symlink_to_a_directory_inside_the_root_is_registered_as_its_target(lab: Lab) -> None:
    (lab.store / "current").symlink_to(lab.store / "mnist" / "3", target_is_directory=True)
    row = lab.registry.register(STEWARD, "mnist@3", str(lab.store / "current"))
    assert row.source == str((lab.store / "mnist" / "3").resolve())


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_dataset_containing_a_symlink_is_refused(lab: Lab, target: str) -> None:
    directory = _write_dataset(lab.store / "linked" / "1")
    secret = lab.tmp / "secret.txt"
    secret.write_text("not part of any dataset")
    pointee = secret if target == "outside" else directory / "README"
    (directory / "train" / "alias.txt").symlink_to(pointee)
    with pytest.raises(UnsafeTreeError) as caught:
        lab.registry.register(STEWARD, "linked@1", str(directory))
    assert isinstance(caught.value, ManifestError)
    assert "alias.txt" in caught.value.message
    assert lab.registry.all_versions() == []
    assert lab.sink.actions("dataset.register") == []


@pytest.mark.parametrize("ref", ["", "mnist", "MNIST@3", "a@", "../x@1", "a@b@c"])
def test_register_refuses_malformed_refs(lab: Lab, ref: str) -> None:
    with pytest.raises(UsageError):
        lab.registry.register(STEWARD, ref, str(lab.store / "mnist" / "3"))
    assert lab.registry.all_versions() == []


# -- immutability in the database --------------------------------------------------------


def _tamper(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()


COLUMNS = (
    "name, version, source, algorithm, root, files, bytes, registered_by, registered_at, "
    "keyid, envelope"
)

TAMPERING = {
    "update-root": "UPDATE dataset_versions SET root = 'ff'",
    "update-envelope": "UPDATE dataset_versions SET envelope = '{}' WHERE name = 'mnist'",
    "delete": "DELETE FROM dataset_versions WHERE name = 'mnist' AND version = '3'",
    "delete-all": "DELETE FROM dataset_versions",
    "insert-or-replace": (
        f"INSERT OR REPLACE INTO dataset_versions ({COLUMNS}) "
        "SELECT name, version, source, algorithm, 'ff', files, bytes, registered_by, "
        "registered_at, keyid, envelope FROM dataset_versions"
    ),
    "replace": (
        f"REPLACE INTO dataset_versions ({COLUMNS}) "
        "SELECT name, version, source, algorithm, root, files, bytes, 'mallory', "
        "registered_at, keyid, envelope FROM dataset_versions"
    ),
}


@pytest.mark.parametrize("sql", sorted(TAMPERING))
def test_versions_are_immutable_in_the_database(lab: Lab, sql: str) -> None:
    row = _register(lab)
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        _tamper(lab.db, TAMPERING[sql])
    assert lab.registry.get(TRAINER, "mnist@3") == row
    reopened = lab.open()
    try:
        assert reopened.all_versions() == [row]
    finally:
        reopened.close()


def test_a_new_version_can_still_be_inserted_directly(lab: Lab) -> None:
    """The triggers refuse changes to versions, not new versions (the control)."""
    row = _register(lab)
    _tamper(
        lab.db,
        f"INSERT INTO dataset_versions ({COLUMNS}) "
        "SELECT name, '9', source, algorithm, root, files, bytes, registered_by, "
        "registered_at, keyid, envelope FROM dataset_versions",
    )
    assert [r.ref for r in lab.registry.all_versions()] == [row.ref, "mnist@9"]


def test_a_duplicate_insert_is_refused_by_the_database(lab: Lab) -> None:
    _register(lab)
    with pytest.raises(sqlite3.IntegrityError):
        _tamper(
            lab.db,
            f"INSERT INTO dataset_versions ({COLUMNS}) SELECT * FROM dataset_versions",
        )


def test_a_concurrent_registration_of_the_same_version_loses(lab: Lab) -> None:
    """Another registry inserts the version while this one is fingerprinting."""
    other = lab.open()
    won: list[RegisteredDataset] = []

    def meanwhile(done: int, total: int) -> None:
        if not won:
            won.append(other.register(TRAINER_STEWARD, "mnist@3", str(lab.store / "mnist" / "3")))

    try:
        with pytest.raises(DatasetExists, match="meanwhile") as caught:
            lab.registry.register(
                STEWARD, "mnist@3", str(lab.store / "mnist" / "3"), progress=meanwhile
            )
        assert caught.value.status == 409
        assert len(won) == 1
        assert lab.registry.all_versions() == won
        assert lab.registry.get(TRAINER, "mnist@3").registered_by == TRAINER_STEWARD.name
        assert [e.actor for e in lab.sink.actions("dataset.register")] == ["tess"]
    finally:
        other.close()


# -- reading -----------------------------------------------------------------------------


def test_trainer_gets_a_version_and_the_decision_is_audited(lab: Lab) -> None:
    row = _register(lab)
    before = len(lab.sink.events)
    assert lab.registry.get(TRAINER, "mnist@3") == row
    (decision,) = lab.sink.events[before:]
    assert decision.action == AUDIT_ACTION
    assert decision.actor == "alice"
    assert decision.detail["action"] == "read_dataset"
    assert decision.detail["resource"] == "dataset:mnist@3"
    assert decision.detail["allowed"] is True
    assert lab.registry.get(STEWARD, "mnist@3") == row


def test_viewer_may_not_get_a_version(lab: Lab) -> None:
    _register(lab)
    before = len(lab.sink.events)
    with pytest.raises(RegistryDenied) as caught:
        lab.registry.get(VIEWER, "mnist@3")
    assert caught.value.status == 403
    (decision,) = lab.sink.events[before:]
    assert decision.action == AUDIT_ACTION
    assert decision.actor == "vera"
    assert decision.detail["allowed"] is False


def test_unknown_version_is_not_found(lab: Lab) -> None:
    _register(lab)
    for ref in ("mnist@4", "cifar@3"):
        with pytest.raises(DatasetNotFound) as caught:
            lab.registry.get(TRAINER, ref)
        assert caught.value.status == 404
    with pytest.raises(UsageError):
        lab.registry.get(TRAINER, "mnist")


def test_readable_lists_only_permitted_versions(lab: Lab) -> None:
    first = _register(lab)
    second = _register(lab, "cifar@1", _write_dataset(lab.store / "cifar" / "1", seed=1))
    before = len(lab.sink.events)
    assert {row.ref for row in lab.registry.readable(TRAINER)} == {first.ref, second.ref}
    assert {row.ref for row in lab.registry.readable(STEWARD)} == {first.ref, second.ref}
    assert lab.registry.readable(VIEWER) == []
    assert lab.registry.readable(NOBODY) == []
    assert lab.sink.events[before:] == []  # listing decisions are not audited


# -- reports from kernels ----------------------------------------------------------------


def test_report_records_a_verification_failure(lab: Lab) -> None:
    row = _register(lab)
    problem = {
        "kind": "modified",
        "file": "train/images.bin",
        "expected": "ab" * 32,
        "actual": "cd" * 32,
        "detail": "digest mismatch on read",
    }
    lab.registry.report(TRAINER, "mnist@3", problem)
    (event,) = lab.sink.actions("dataset.verify.failed")
    assert event.actor == "alice"
    assert event.detail == {
        **problem,
        "dataset": "mnist@3",
        "root": row.root,
        "reported_by": "kernel",
    }
    assert lab.sink.actions("dataset.read.unverified") == []


def test_report_of_an_unverified_open(lab: Lab) -> None:
    _register(lab)
    lab.registry.report(TRAINER, "mnist@3", {"kind": "unverified-open", "file": "README"})
    (event,) = lab.sink.actions("dataset.read.unverified")
    assert event.actor == "alice"
    assert event.detail["reported_by"] == "kernel"
    assert event.detail["file"] == "README"
    assert lab.sink.actions("dataset.verify.failed") == []


@pytest.mark.parametrize(
    "problem",
    [
        {"kind": "modified", "reported_by": "hub"},
        {"actor": "sam"},
        {"kind": "modified", "dataset": "cifar@1"},
        {"root": "00" * 32},
        {"kind": "x" * 1025},
        {"file": "f", "detail": "d" * 4096},
        {"kind": 3},
        {"file": ["a", "b"]},
        {"expected": None},
    ],
    ids=lambda p: ",".join(sorted(p)),
)
def test_report_refuses_bad_problems(lab: Lab, problem: dict[str, object]) -> None:
    _register(lab)
    with pytest.raises(RegistryError) as caught:
        lab.registry.report(TRAINER, "mnist@3", problem)
    assert caught.value.status == 400
    assert lab.sink.actions("dataset.verify.failed") == []
    assert lab.sink.actions("dataset.read.unverified") == []


def test_report_accepts_values_up_to_the_limit(lab: Lab) -> None:
    _register(lab)
    lab.registry.report(TRAINER, "mnist@3", {"detail": "d" * 1024})
    (event,) = lab.sink.actions("dataset.verify.failed")
    assert event.detail["detail"] == "d" * 1024


def test_report_from_a_viewer_is_refused(lab: Lab) -> None:
    _register(lab)
    with pytest.raises(RegistryDenied):
        lab.registry.report(VIEWER, "mnist@3", {"kind": "modified"})
    with pytest.raises(DatasetNotFound):
        lab.registry.report(TRAINER, "mnist@9", {"kind": "modified"})
    assert lab.sink.actions("dataset.verify.failed") == []


# -- reopening ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_loose_registry_file_is_refused_on_reopen(lab: Lab, mode: int) -> None:
    _register(lab)
    lab.registry.close()
    lab.db.chmod(mode)
    with pytest.raises(RegistryError, match="0600"):
        lab.open()
    lab.db.chmod(0o600)
    lab.open().close()


def test_reopening_keeps_the_versions(lab: Lab) -> None:
    row = _register(lab)
    lab.registry.close()
    reopened = lab.open()
    try:
        assert reopened.keyid == row.keyid
        assert reopened.get(TRAINER, "mnist@3") == row
        assert reopened.all_versions() == [row]
        public = reopened.public_key
        verify_signed_manifest(
            reopened.envelope(row), {key_id(public): public}, expected_ref="mnist@3"
        )
        with pytest.raises(DatasetExists):
            reopened.register(STEWARD, "mnist@3", str(lab.store / "mnist" / "3"))
    finally:
        reopened.close()


def test_a_reader_without_permission_cannot_tell_what_exists(lab: Lab) -> None:
    _register(lab)
    for ref in ("mnist@3", "mnist@999"):
        with pytest.raises(RegistryDenied):
            lab.registry.get(VIEWER, ref)


def test_a_loose_registry_directory_is_refused(lab: Lab, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(RegistryError, match=r"\(mode 0755\); expected 0700"):
        DatasetRegistry(
            path=loose / "registry.sqlite",
            key=lab.key,
            policy=PolicyEngine.defaults(audit=lab.sink),
            audit=lab.sink,
            storage_roots=[lab.store],
        )
