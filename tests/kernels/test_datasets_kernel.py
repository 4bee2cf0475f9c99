"""The kernel-side readers in a real kernel (the secure kernelspec via jupyter_client).

Each test copies a generated dataset (hundreds of small files, a few large ones, a Parquet
and a CSV table), signs its manifest into a local registry, tampers with the copy from the
test process and checks what ``ztlab.datasets`` does inside the kernel.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.dataset_fixtures import LARGE_SIZE, add_tables, make_dataset
from tests.kernel_session import Kernel, secure_kernel
from ztlab.common.attest import Envelope, public_key_pem, sign_manifest
from ztlab.common.manifest import Manifest, fingerprint

pytestmark = pytest.mark.slow

KEY = ec.generate_private_key(ec.SECP256R1())
_count = itertools.count(1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("pristine") / "data"
    root.mkdir()
    make_dataset(root, small=200, large=2)
    add_tables(root)
    return root, fingerprint(root)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    tmp = tmp_path_factory.mktemp("kernel")
    with secure_kernel(tmp, {"ZTLAB_LOCAL_REGISTRY": str(tmp / "none")}) as k:
        k.ok("import os, json, ztlab.datasets as zd, pandas")
        yield k


class Published:
    """A signed copy of the pristine dataset, opened in the kernel as ``ds``."""

    def __init__(self, kernel: Kernel, root: Path, ref: str, registry: Path) -> None:
        self.kernel, self.root, self.ref, self.registry = kernel, root, ref, registry

    def reports(self) -> list[dict[str, str]]:
        out = self.kernel.ok("print(json.dumps([p for _, p in ds._registry.reports]))")
        return list(json.loads(out))

    def refused(self, code: str) -> str:
        """Run ``code``; it must raise DatasetIntegrityError; its message."""
        outcome = self.kernel.run(code)
        assert outcome.status == "error", f"not refused: {code}"
        assert outcome.ename == "DatasetIntegrityError", f"{outcome.ename}: {outcome.evalue}"
        return outcome.evalue or ""


def publish(
    kernel: Kernel,
    pristine: tuple[Path, Manifest],
    tmp_path: Path,
    *,
    key: ec.EllipticCurvePrivateKey = KEY,
    trusted: ec.EllipticCurvePrivateKey = KEY,
    open_it: bool = True,
) -> Published:
    source, manifest = pristine
    root = tmp_path / "data"
    shutil.copytree(source, root)
    ref = f"demo@{next(_count)}"
    registry = tmp_path / "registry"
    registry.mkdir()
    envelope = sign_manifest(manifest, ref, key, registered_by="carol", source=str(root))
    (registry / f"{ref}.dsse.json").write_text(envelope.to_json())
    (registry / "trusted-keys.pem").write_text(public_key_pem(trusted.public_key()))
    kernel.ok(f"os.environ['ZTLAB_LOCAL_REGISTRY'] = {str(registry)!r}")
    if open_it:
        kernel.ok(f"ds = zd.open({ref!r}); print(ds)")
    return Published(kernel, root, ref, registry)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


# -- the untouched dataset ------------------------------------------------------------------


def test_readers_return_the_data_and_verify_passes(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    out = kernel.ok(
        "frame = ds.read_parquet('tables/train.parquet')\n"
        f"plain = pandas.read_parquet({str(pub.root / 'tables' / 'train.parquet')!r})\n"
        "print(frame.equals(plain), frame.shape)\n"
        "print(ds.read_csv('tables/labels.csv').shape)\n"
        "print(ds.read_bytes('name with spaces é.txt'))\n"
        "print(len(ds.read_parquet(None)))\n"
        "ds.verify(); print('verified', len(ds.files))"
    )
    assert "True (5000, 4)" in out
    assert "(500, 4)" in out
    assert "b'unicode name'" in out
    assert f"verified {len(pristine[1].entries)}" in out
    assert pub.reports() == []


def test_a_file_outside_the_manifest_cannot_be_read(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    publish(kernel, pristine, tmp_path)
    outcome = kernel.run("ds.read_bytes('../../etc/passwd')")
    assert outcome.ename == "DatasetError"
    assert "is not a file of dataset" in (outcome.evalue or "")


# -- tampering is caught by the readers and by verify -----------------------------------------


def test_single_byte_flip_in_a_small_file(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    name = "shard-3/sub-1/item-0010.bin"
    entry = pristine[1].by_path()[name]
    kernel.ok(f"ds.read_bytes({name!r})")  # verified once, then changed on disk
    flip(pub.root / name, entry.size // 2)
    message = pub.refused(f"ds.read_bytes({name!r})")
    assert pub.ref in message
    assert name in message
    assert entry.digest in message
    report = pub.reports()[-1]
    assert report["kind"] == "modified"
    assert report["file"] == name
    assert report["expected"] == entry.digest
    assert report["actual"] != entry.digest
    assert name in pub.refused("ds.verify()")


def test_flip_truncate_append_in_the_parquet_table(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    table = pub.root / "tables" / "train.parquet"
    original = table.read_bytes()
    for change in ("flip-data", "flip-footer", "truncate", "append"):
        data = bytearray(original)
        if change == "flip-data":
            data[len(data) // 3] ^= 0x10
        elif change == "flip-footer":
            data[-12] ^= 0x01
        elif change == "truncate":
            del data[-1]
        else:
            data += b"\0"
        table.write_bytes(bytes(data))
        # the error is about integrity, never a confusing Parquet parse error
        message = pub.refused("ds.read_parquet('tables/train.parquet')")
        assert "tables/train.parquet" in message, change
        table.write_bytes(original)
        kernel.ok("ds.read_parquet('tables/train.parquet')")


def test_large_file_flip_truncation_and_append(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    large = pub.root / "large-1.bin"
    flip(large, LARGE_SIZE - 17, 7)
    assert "large-1.bin" in pub.refused("ds.read_bytes('large-1.bin')")
    flip(large, LARGE_SIZE - 17, 7)
    kernel.ok("ds.read_bytes('large-1.bin')")
    with large.open("r+b") as handle:
        handle.truncate(LARGE_SIZE - 1)
    assert f"read {LARGE_SIZE - 1} bytes" in pub.refused("ds.read_bytes('large-1.bin')")
    with (pub.root / "large-0.bin").open("ab") as handle:
        handle.write(b"x")
    message = pub.refused("ds.verify()")
    assert "large-0.bin" in message
    assert "large-1.bin" in message


def test_every_byte_flip_of_a_file_is_caught(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """Flip each byte of one small file in turn (and 64 spread over the CSV table)."""
    pub = publish(kernel, pristine, tmp_path)
    name = "shard-0/sub-0/item-0000.bin"
    csv = "tables/labels.csv"
    size = pristine[1].by_path()[name].size
    csv_size = pristine[1].by_path()[csv].size
    out = kernel.ok(
        "import random\n"
        "def flip(path, offset):\n"
        "    with open(path, 'r+b') as h:\n"
        "        h.seek(offset); b = h.read(1)[0]; h.seek(offset); h.write(bytes([b ^ 1]))\n"
        "def caught(rel, offset, read):\n"
        "    path = os.path.join(ds.directory, rel)\n"
        "    flip(path, offset)\n"
        "    try:\n"
        "        read(rel)\n"
        "        return False\n"
        "    except zd.DatasetIntegrityError:\n"
        "        return True\n"
        "    finally:\n"
        "        flip(path, offset)\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        f"small = [caught({name!r}, i, ds.read_bytes) for i in range({size})]\n"
        f"table = [caught({csv!r}, i, ds.read_csv) for i in "
        f"random.Random(5).sample(range({csv_size}), 64)]\n"
        "print(sum(small), len(small), sum(table), len(table))\n"
        "ds.verify(); print('clean again')"
    )
    assert out.split("\n")[0] == f"{size} {size} 64 64"
    assert "clean again" in out
    reports = pub.reports()
    assert len(reports) == size + 64
    assert {r["kind"] for r in reports} == {"modified"}


def test_renamed_added_removed_and_swapped_files(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    a, b = "shard-1/sub-1/item-0001.bin", "shard-2/sub-2/item-0002.bin"
    (pub.root / "shard-5/sub-2/item-0005.bin").rename(pub.root / "shard-5/sub-2/renamed.bin")
    (pub.root / "added.bin").write_bytes(b"new")
    (pub.root / "shard-6/sub-0/item-0006.bin").unlink()
    data_a, data_b = (pub.root / a).read_bytes(), (pub.root / b).read_bytes()
    (pub.root / a).write_bytes(data_b)
    (pub.root / b).write_bytes(data_a)

    message = pub.refused("ds.verify()")
    assert "missing: shard-5/sub-2/item-0005.bin" in message
    assert "extra: shard-5/sub-2/renamed.bin" in message
    assert "extra: added.bin" in message
    assert "missing: shard-6/sub-0/item-0006.bin" in message
    assert f"modified: {a}" in message
    assert f"modified: {b}" in message
    assert "missing" in pub.refused("ds.read_bytes('shard-5/sub-2/item-0005.bin')")
    assert b in pub.refused(f"ds.read_bytes({b!r})")
    outcome = kernel.run("ds.read_bytes('added.bin')")
    assert outcome.ename == "DatasetError"


def test_symlink_escapes_are_refused(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    victim = pub.root / "shard-4/sub-1/item-0004.bin"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(victim.read_bytes())  # same bytes: only the link gives it away
    victim.unlink()
    victim.symlink_to(outside)
    assert "item-0004.bin" in pub.refused("ds.read_bytes('shard-4/sub-1/item-0004.bin')")
    assert "symbolic link" in pub.refused("ds.verify()")

    # a directory swapped for a link to an identical copy outside the dataset
    shutil.copytree(pub.root / "shard-2", tmp_path / "shard-2-copy")
    shutil.rmtree(pub.root / "shard-2")
    (pub.root / "shard-2").symlink_to(tmp_path / "shard-2-copy")
    message = pub.refused("ds.read_bytes('shard-2/sub-2/item-0002.bin')")
    assert "outside the dataset directory" in message
    assert pub.reports()[-1]["kind"] == "unsafe"


def test_content_change_with_restored_mtime_is_caught(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """The re-read shortcut keys on ctime and inode too, which a writer cannot restore."""
    pub = publish(kernel, pristine, tmp_path)
    name = "tables/labels.csv"
    kernel.ok(f"ds.read_csv({name!r})")
    path = pub.root / name
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[100] = ord("9") if data[100] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert name in pub.refused(f"ds.read_csv({name!r})")


def test_unchanged_files_are_not_hashed_again(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    publish(kernel, pristine, tmp_path)
    out = kernel.ok(
        "from ztlab.extensions.datasets import verified as v\n"
        "calls = []\n"
        "real = v._digest\n"
        "v._digest = lambda a, d: calls.append(len(d)) or real(a, d)\n"
        "try:\n"
        "    ds.read_parquet('tables/train.parquet'); first = len(calls)\n"
        "    ds.read_parquet('tables/train.parquet'); second = len(calls)\n"
        "finally:\n"
        "    v._digest = real\n"
        "print(first, second)"
    )
    assert out.strip() == "1 1"


# -- the signed manifest itself ---------------------------------------------------------------


def test_manifest_signed_by_another_key_is_refused(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    pub = publish(kernel, pristine, tmp_path, key=attacker, open_it=False)
    outcome = kernel.run(f"zd.open({pub.ref!r})")
    assert outcome.ename == "DatasetIntegrityError"
    assert "not trustworthy" in (outcome.evalue or "")


def test_altered_or_relabelled_manifest_is_refused(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path, open_it=False)
    path = pub.registry / f"{pub.ref}.dsse.json"
    envelope = Envelope.from_json(path.read_text())
    # a changed digest inside the signed payload (same signature)
    statement = json.loads(envelope.payload)
    statement["predicate"]["manifest"]["entries"][0]["size"] += 1
    forged = Envelope(
        envelope.payload_type,
        json.dumps(statement, sort_keys=True, separators=(",", ":")).encode(),
        envelope.signatures,
    )
    path.write_text(forged.to_json())
    assert kernel.run(f"zd.open({pub.ref!r})").ename == "DatasetIntegrityError"
    # the genuine envelope of this version, presented as another version
    other = pub.registry / "demo@999.dsse.json"
    other.write_text(envelope.to_json())
    outcome = kernel.run("zd.open('demo@999')")
    assert outcome.ename == "DatasetIntegrityError"
    assert "not demo@999" in (outcome.evalue or "")


# -- unverified reads are flagged ------------------------------------------------------------


def test_plain_open_of_a_dataset_file_is_flagged(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    outcome = kernel.run(
        "import warnings; warnings.simplefilter('always')\n"
        f"open({str(pub.root / 'empty.txt')!r}).close()\n"
        f"pandas.read_csv({str(pub.root / 'tables' / 'labels.csv')!r})\n"
        "ds.read_csv('tables/labels.csv')\n"
        "import time; time.sleep(0.2)"
    )
    assert outcome.status == "ok"
    assert outcome.stderr.count("UnverifiedReadWarning") == 2
    assert "empty.txt" in outcome.stderr
    assert "labels.csv" in outcome.stderr
    kinds = [r["kind"] for r in pub.reports()]
    assert kinds == []  # a local registry keeps reports per Dataset; the hook has its own
    flagged = kernel.ok(
        "from ztlab.extensions.datasets import hooks; print(sorted(hooks._flagged))"
    )
    assert "empty.txt" in flagged
    assert "labels.csv" in flagged


# -- lineage --------------------------------------------------------------------------------


def test_reads_inside_an_mlflow_run_record_the_dataset_input(
    kernel: Kernel, pristine: tuple[Path, Manifest], tmp_path: Path
) -> None:
    pub = publish(kernel, pristine, tmp_path)
    db = tmp_path / "mlflow.db"
    out = kernel.ok(
        "import mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{db}')\n"
        "with mlflow.start_run() as run:\n"
        "    ds.read_parquet('tables/train.parquet')\n"
        "    ds.read_csv('tables/labels.csv')\n"
        "inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs\n"
        "for i in inputs:\n"
        "    tags = {t.key: t.value for t in i.tags}\n"
        "    print(i.dataset.name, i.dataset.digest, tags['ztlab.root'],\n"
        "          tags['mlflow.data.context'])",
        timeout=180,
    )
    root = pristine[1].root
    assert out.strip() == f"{pub.ref} {root[:32]} {root} training"


# -- the parallel copy of large files (in this process) ----------------------------------------


@pytest.mark.parametrize("change", ["none", "flip-first", "flip-last", "truncate", "append"])
def test_large_reads_in_parallel_keep_every_byte(tmp_path: Path, change: str) -> None:
    from ztlab.common.attest import key_id, verify_signed_manifest
    from ztlab.extensions.datasets import DatasetIntegrityError
    from ztlab.extensions.datasets.verified import Dataset

    root = tmp_path / "big"
    root.mkdir()
    data = os.urandom(24 * 1024 * 1024 + 3)  # over the parallel-read threshold, odd size
    (root / "blob.bin").write_bytes(data)
    envelope = sign_manifest(fingerprint(root), "big@1", KEY, registered_by="t", source=str(root))
    signed = verify_signed_manifest(envelope, {key_id(KEY.public_key()): KEY.public_key()})
    dataset = Dataset(signed, str(root))
    if change == "none":
        assert dataset.read_bytes("blob.bin") == data
        return
    blob = root / "blob.bin"
    if change == "flip-first":
        flip(blob, 0)
    elif change == "flip-last":
        flip(blob, len(data) - 1)
    elif change == "truncate":
        with blob.open("r+b") as handle:
            handle.truncate(len(data) // 2)
    else:
        with blob.open("ab") as handle:
            handle.write(b"!")
    with pytest.raises(DatasetIntegrityError) as caught:
        dataset.read_bytes("blob.bin")
    assert caught.value.file == "blob.bin"
    assert caught.value.actual == blake3.blake3(blob.read_bytes()).hexdigest()
