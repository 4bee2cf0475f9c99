"""Dataset manifests: format, fingerprinting, and tamper detection by ``verify``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dataset_fixtures import LARGE_SIZE, SMALL_FILES, make_dataset
from ztlab.common.errors import UsageError
from ztlab.common.manifest import (
    FORMAT,
    Entry,
    Manifest,
    ManifestError,
    UnsafeTreeError,
    VerifyResult,
    fingerprint,
    load_manifest,
    parse_manifest,
    root_digest,
    verify,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("pristine") / "data"
    root.mkdir()
    make_dataset(root)
    return root, fingerprint(root)


@pytest.fixture
def dataset(pristine: tuple[Path, Manifest], tmp_path: Path) -> tuple[Path, Manifest]:
    """A fresh copy of the pristine dataset and its manifest."""
    source, manifest = pristine
    copy = tmp_path / "data"
    shutil.copytree(source, copy)
    return copy, manifest


def digest_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def paths_of(result: VerifyResult) -> dict[str, list[str]]:
    return {
        "modified": [item.path for item in result.modified],
        "missing": [entry.path for entry in result.missing],
        "extra": [entry.path for entry in result.extra],
        "unsafe": [item.path for item in result.unsafe],
    }


def only(**changes: list[str]) -> dict[str, list[str]]:
    expected: dict[str, list[str]] = {"modified": [], "missing": [], "extra": [], "unsafe": []}
    expected.update(changes)
    return expected


# -- the manifest itself ------------------------------------------------------------------


def test_manifest_lists_every_regular_file(pristine: tuple[Path, Manifest]) -> None:
    root, manifest = pristine
    assert len(manifest.entries) == SMALL_FILES + 2 + 3
    paths = [entry.path for entry in manifest.entries]
    assert paths == sorted(paths)
    assert "name with spaces é.txt" in paths
    assert "shard-0/sub-0/item-0000.bin" in paths
    for entry in manifest.entries:
        data = (root / entry.path).read_bytes()
        assert entry.size == len(data)
        assert entry.digest == blake3.blake3(data).hexdigest()
    assert verify(root, manifest).ok


def test_sha256_digests_match_hashlib(pristine: tuple[Path, Manifest]) -> None:
    root, _ = pristine
    manifest = fingerprint(root, algorithm="sha256", workers=3)
    assert manifest.algorithm == "sha256"
    for entry in manifest.entries:
        assert entry.digest == hashlib.sha256((root / entry.path).read_bytes()).hexdigest()
    assert verify(root, manifest).ok


def test_large_file_paths_agree(pristine: tuple[Path, Manifest]) -> None:
    """Memory-mapped multi-threaded BLAKE3 and the pool's chunked hashing give one answer."""
    root, manifest = pristine
    pooled = fingerprint(root, large_file_threshold=1 << 40)
    mapped = fingerprint(root, large_file_threshold=1)
    assert pooled == mapped == manifest


def test_root_digest_is_defined_by_the_docstring(pristine: tuple[Path, Manifest]) -> None:
    _, manifest = pristine
    payload = bytearray(b"ztlab-manifest/1\nblake3\n")
    for entry in manifest.entries:
        line = json.dumps([entry.path, entry.size, entry.digest], separators=(",", ":"))
        payload += line.encode("ascii") + b"\n"
    assert manifest.root == blake3.blake3(bytes(payload)).hexdigest()
    assert manifest.root == root_digest("blake3", manifest.entries)


def test_manifest_round_trips_and_is_deterministic(
    pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    root, manifest = pristine
    out = tmp_path / "m.json"
    manifest.write(out)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["format"] == FORMAT
    assert set(data) == {"format", "algorithm", "root", "entries"}
    assert load_manifest(out) == manifest
    assert fingerprint(root).to_json() == out.read_text(encoding="utf-8")


def test_root_changes_with_any_entry() -> None:
    entries = [Entry("a", 1, "0" * 64), Entry("b", 2, "1" * 64)]
    base = Manifest.build("blake3", entries).root
    assert Manifest.build("blake3", [Entry("a", 1, "0" * 64)]).root != base
    assert Manifest.build("blake3", [entries[0], Entry("b", 3, "1" * 64)]).root != base
    assert Manifest.build("blake3", [entries[0], Entry("c", 2, "1" * 64)]).root != base
    assert Manifest.build("sha256", entries).root != base


def _hand_edited(manifest: Manifest, path: str) -> str:
    entries = [*manifest.entries[:1], Entry(path, 3, "a" * 64)]
    data = {
        "format": FORMAT,
        "algorithm": "blake3",
        "root": root_digest("blake3", sorted(entries)),
        "entries": [e.__dict__ for e in sorted(entries)],
    }
    return json.dumps(data)


@pytest.mark.parametrize(
    "path",
    ["../outside", "/etc/passwd", "a/../../b", "a//b", "./a", "a/", "", "a\x00b", "x/.."],
)
def test_unsafe_paths_in_a_manifest_are_bad_input(
    pristine: tuple[Path, Manifest], path: str
) -> None:
    _, manifest = pristine
    with pytest.raises(ManifestError, match="unsafe path") as caught:
        parse_manifest(_hand_edited(manifest, path))
    assert isinstance(caught.value, UsageError)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="ztlab-manifest/2"), "format"),
        (lambda d: d.update(algorithm="md5"), "unknown digest algorithm"),
        (lambda d: d.update(root="f" * 64), "root digest does not match"),
        (lambda d: d.update(extra=1), "expected exactly"),
        (lambda d: d["entries"].reverse(), "not sorted"),
        (lambda d: d["entries"].append(dict(d["entries"][-1])), "listed twice"),
        (lambda d: d["entries"][0].update(size=-1), "bad size"),
        (lambda d: d["entries"][0].update(size=True), "bad size"),
        (lambda d: d["entries"][0].update(digest="XYZ"), "bad digest"),
        (lambda d: d["entries"][0].pop("digest"), "exactly path, size, digest"),
    ],
)
def test_malformed_manifests_are_bad_input(
    pristine: tuple[Path, Manifest], mutate: object, message: str
) -> None:
    _, manifest = pristine
    data = json.loads(manifest.to_json())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(data))


def test_unreadable_and_non_json_manifests(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")


# -- every tamper kind is detected, and only it ---------------------------------------------


def test_single_byte_flip(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    target = root / "shard-3" / "sub-1" / "item-0010.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = verify(root, manifest)
    assert paths_of(result) == only(modified=["shard-3/sub-1/item-0010.bin"])
    (item,) = result.modified
    assert item.expected_digest == manifest.by_path()[item.path].digest
    assert item.actual_digest == digest_of(bytes(data))
    assert item.expected_size == item.actual_size


def test_flip_in_a_large_file(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    with (root / "large-1.bin").open("r+b") as handle:
        handle.seek(LARGE_SIZE - 17)
        byte = handle.read(1)
        handle.seek(LARGE_SIZE - 17)
        handle.write(bytes([byte[0] ^ 0x80]))
    assert paths_of(verify(root, manifest)) == only(modified=["large-1.bin"])


def test_truncation_and_append(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    with (root / "large-0.bin").open("r+b") as handle:
        handle.truncate(LARGE_SIZE - 1)
    with (root / "empty.txt").open("ab") as handle:
        handle.write(b"\x00")
    result = verify(root, manifest)
    assert paths_of(result) == only(modified=["empty.txt", "large-0.bin"])
    sizes = {item.path: (item.expected_size, item.actual_size) for item in result.modified}
    assert sizes == {"empty.txt": (0, 1), "large-0.bin": (LARGE_SIZE, LARGE_SIZE - 1)}


def test_renamed_file(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    (root / "shard-1" / "sub-1" / "item-0001.bin").rename(root / "shard-1" / "renamed.bin")
    result = verify(root, manifest)
    assert paths_of(result) == only(
        missing=["shard-1/sub-1/item-0001.bin"], extra=["shard-1/renamed.bin"]
    )
    assert result.missing[0].digest == result.extra[0].digest


def test_added_and_removed_files(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    (root / "new-dir").mkdir()
    (root / "new-dir" / "added.txt").write_bytes(b"hello")
    (root / ".hidden").write_bytes(b"")
    (root / "large-2.bin").unlink()
    result = verify(root, manifest)
    assert paths_of(result) == only(missing=["large-2.bin"], extra=[".hidden", "new-dir/added.txt"])
    assert result.extra[1].digest == digest_of(b"hello")


def test_swapped_pair(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    first, second = root / "shard-0" / "sub-0" / "item-0000.bin", root / "large-2.bin"
    tmp = root / "swap.tmp"
    first.rename(tmp)
    second.rename(first)
    tmp.rename(second)
    result = verify(root, manifest)
    assert paths_of(result) == only(modified=["large-2.bin", "shard-0/sub-0/item-0000.bin"])
    by_path = manifest.by_path()
    for item in result.modified:
        other = next(
            p for p in by_path if p != item.path and p in {m.path for m in result.modified}
        )
        assert item.actual_digest == by_path[other].digest


def test_empty_directories_are_not_recorded(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    (root / "empty-dir" / "deeper").mkdir(parents=True)
    assert verify(root, manifest).ok


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["flip", "truncate", "append"]),
    pick=st.integers(min_value=0),
    where=st.floats(min_value=0, max_value=1),
    bit=st.integers(min_value=0, max_value=7),
    extra=st.binary(min_size=1, max_size=3),
)
def test_random_single_byte_changes(
    pristine: tuple[Path, Manifest],
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    pick: int,
    where: float,
    bit: int,
    extra: bytes,
) -> None:
    source, manifest = pristine
    candidates = [e for e in manifest.entries if kind == "append" or e.size > 0]
    entry = candidates[pick % len(candidates)]
    root = tmp_path_factory.mktemp("random")
    target = root / "the-file"
    shutil.copyfile(source / entry.path, target)
    # verify just this file against its entry (copying 15 MB per example is too slow)
    single = Manifest.build("blake3", [Entry("the-file", entry.size, entry.digest)])
    position = min(entry.size - 1, int(where * entry.size))
    with target.open("r+b") as handle:
        if kind == "flip":
            handle.seek(position)
            byte = handle.read(1)[0]
            handle.seek(position)
            handle.write(bytes([byte ^ (1 << bit)]))
        elif kind == "truncate":
            handle.truncate(position)
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(extra)
    result = verify(root, single, large_file_threshold=1024 * 1024)
    assert paths_of(result) == only(modified=["the-file"])
    assert result.modified[0].actual_digest == digest_of(target.read_bytes())


# -- links, devices and files outside the root -----------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.txt"])
def test_symlink_escape_refused_and_reported(dataset: tuple[Path, Manifest], target: str) -> None:
    root, manifest = dataset
    (root.parent / "outside.txt").write_bytes(b"secret")
    link = root / "escape"
    link.symlink_to(target)
    with pytest.raises(UnsafeTreeError, match="symbolic link") as caught:
        fingerprint(root)
    assert caught.value.exit_code == 2
    assert [r.path for r in caught.value.refusals] == ["escape"]
    with pytest.raises(UnsafeTreeError, match="outside the directory"):
        fingerprint(root, allow_symlinks=True)
    for allow in (False, True):
        result = verify(root, manifest, allow_symlinks=allow)
        assert paths_of(result) == only(unsafe=["escape"])


def test_file_replaced_by_symlink_escape(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    victim = root / "shard-4" / "sub-1" / "item-0004.bin"
    victim.unlink()
    victim.symlink_to("/etc/passwd")
    result = verify(root, manifest, allow_symlinks=True)
    assert paths_of(result) == only(unsafe=["shard-4/sub-1/item-0004.bin"])
    assert result.unsafe[0].expected == manifest.by_path()["shard-4/sub-1/item-0004.bin"]
    assert "outside" in result.unsafe[0].reason


def test_directory_symlink_escape(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    (root / "etc").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(UnsafeTreeError):
        fingerprint(root, allow_symlinks=True)
    assert paths_of(verify(root, manifest)) == only(unsafe=["etc"])


def test_in_tree_symlinks_are_opt_in(dataset: tuple[Path, Manifest]) -> None:
    root, _ = dataset
    (root / "alias.bin").symlink_to("shard-0/sub-0/item-0000.bin")
    with pytest.raises(UnsafeTreeError, match=r"alias\.bin"):
        fingerprint(root)
    manifest = fingerprint(root, allow_symlinks=True)
    entries = manifest.by_path()
    assert entries["alias.bin"].digest == entries["shard-0/sub-0/item-0000.bin"].digest
    assert verify(root, manifest, allow_symlinks=True).ok
    assert paths_of(verify(root, manifest)) == only(unsafe=["alias.bin"])


def test_fifo_refused(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    os.mkfifo(root / "pipe")
    with pytest.raises(UnsafeTreeError, match="FIFO"):
        fingerprint(root)
    assert paths_of(verify(root, manifest)) == only(unsafe=["pipe"])


def test_device_file_refused(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("needs CAP_MKNOD to create a device node")
    with pytest.raises(UnsafeTreeError, match="character device"):
        fingerprint(root)
    assert paths_of(verify(root, manifest)) == only(unsafe=["null"])


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ManifestError, match="not a directory"):
        fingerprint(tmp_path / "file")
    with pytest.raises(ManifestError, match="not a directory"):
        fingerprint(tmp_path / "absent")


def test_progress_reaches_the_total(pristine: tuple[Path, Manifest]) -> None:
    root, manifest = pristine
    calls: list[tuple[int, int]] = []
    fingerprint(root, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, manifest.total_size)
    assert calls[-1] == (manifest.total_size, manifest.total_size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
