"""A cgroup v2 device allow-list as a hand-written eBPF program, loaded with bpf(2) via ctypes.

cgroup v2 has no ``devices.allow``/``devices.deny`` files: the kernel asks every
``BPF_PROG_TYPE_CGROUP_DEVICE`` program attached to the task's cgroup (and its ancestors)
whether an ``open()`` or ``mknod()`` of a device node may go ahead. The program sees

.. code-block:: c

    struct bpf_cgroup_dev_ctx {
        __u32 access_type;  /* (access << 16) | type */
        __u32 major;
        __u32 minor;
    };

where ``type`` is ``BPF_DEVCG_DEV_BLOCK`` (1) or ``BPF_DEVCG_DEV_CHAR`` (2) and ``access`` a
mask of ``BPF_DEVCG_ACC_MKNOD`` (1), ``_READ`` (2) and ``_WRITE`` (4); it returns 1 to
allow and 0 to deny. The program built here is the same shape as runc's device filter:
load the four fields into registers, then one block per rule that jumps to the next rule
on any mismatch and returns 1 at its end; after the last rule it returns 0.

This module is the syscall layer only (no policy, no paths): :class:`ztlab.hub.sandbox.
cgroups.DeviceFence` is the public face. Rules come in as :class:`Rule` tuples so that this
module depends on nothing else in the project.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from collections.abc import Callable, Sequence
from functools import cache
from typing import NamedTuple

# --- constants from include/uapi/linux/bpf.h ------------------------------------------
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # enum bpf_attach_type
BPF_F_ALLOW_MULTI = 1 << 1

BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2
BPF_DEVCG_ACC_MKNOD = 1
BPF_DEVCG_ACC_READ = 2
BPF_DEVCG_ACC_WRITE = 4
ACCESS_ALL = BPF_DEVCG_ACC_MKNOD | BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE

# instruction classes, operations and sources (include/uapi/linux/bpf_common.h, bpf.h)
_LDX, _ALU64, _JMP = 0x01, 0x07, 0x05
_W, _MEM = 0x00, 0x60
_K, _X = 0x00, 0x08
_AND, _RSH, _MOV = 0x50, 0x70, 0xB0
_JNE, _EXIT = 0x50, 0x90

#: bpf(2) syscall numbers by machine
_NR_BPF = {
    "x86_64": 321,
    "amd64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}

#: size of the ``union bpf_attr`` we pass; the kernel accepts any size as long as bytes
#: past what it knows are zero, and checks per command that unused fields are zero
_ATTR_SIZE = 128
_LOG_SIZE = 1 << 16


class Rule(NamedTuple):
    """One allowed device: ``dev_type`` is 1 (block) or 2 (char); ``minor`` None = all."""

    dev_type: int
    major: int
    minor: int | None
    access: int  # mask of BPF_DEVCG_ACC_*


class BpfError(Exception):
    """A bpf(2) call failed; ``op`` names the command, ``log`` holds the verifier's output."""

    def __init__(self, op: str, err: int, *, log: str = "") -> None:
        detail = os.strerror(err)
        super().__init__(f"bpf({op}) failed: {detail} (errno {err})")
        self.op = op
        self.errno = err
        self.log = log


# --- program -----------------------------------------------------------------------------


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """Encode one ``struct bpf_insn`` (8 bytes) in the host's byte order."""
    if sys.byteorder == "little":
        return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
    return struct.pack(">BBhi", code, (dst << 4) | src, off, imm)


class _NextRule(NamedTuple):
    """A conditional jump to the next rule's block: ``if dst != (src or imm) goto next``."""

    dst: int
    src: int | None = None
    imm: int = 0


def build_program(rules: Sequence[Rule]) -> bytes:
    """The instructions of a device program that allows exactly ``rules``, denies the rest.

    Registers: r2 = type, r3 = requested access, r4 = major, r5 = minor (r1 is the context
    pointer until the loads are done, then scratch).
    """
    out = [
        _insn(_LDX | _MEM | _W, dst=2, src=1, off=0),  # r2 = ctx->access_type
        _insn(_ALU64 | _AND | _K, dst=2, imm=0xFFFF),  # r2 &= 0xffff      (type)
        _insn(_LDX | _MEM | _W, dst=3, src=1, off=0),  # r3 = ctx->access_type
        _insn(_ALU64 | _RSH | _K, dst=3, imm=16),  # r3 >>= 16        (access)
        _insn(_LDX | _MEM | _W, dst=4, src=1, off=4),  # r4 = ctx->major
        _insn(_LDX | _MEM | _W, dst=5, src=1, off=8),  # r5 = ctx->minor
    ]
    for rule in rules:
        if rule.dev_type not in (BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR):
            raise ValueError(f"device type must be 1 or 2, got {rule.dev_type}")
        if not 0 < rule.access <= ACCESS_ALL:
            raise ValueError(f"access mask must be within {ACCESS_ALL:#x}, got {rule.access:#x}")
        block: list[bytes | _NextRule] = [_NextRule(dst=2, imm=rule.dev_type)]
        if rule.access != ACCESS_ALL:
            # the requested access must be a subset of the allowed: (r3 & allowed) == r3
            block.append(_insn(_ALU64 | _MOV | _X, dst=1, src=3))  # r1 = r3
            block.append(_insn(_ALU64 | _AND | _K, dst=1, imm=rule.access))  # r1 &= allowed
            block.append(_NextRule(dst=1, src=3))
        block.append(_NextRule(dst=4, imm=rule.major))
        if rule.minor is not None:
            block.append(_NextRule(dst=5, imm=rule.minor))
        block.append(_insn(_ALU64 | _MOV | _K, dst=0, imm=1))  # r0 = 1
        block.append(_insn(_JMP | _EXIT))  # return 1 (allow)
        for pos, item in enumerate(block):
            if isinstance(item, _NextRule):
                off = len(block) - pos - 1  # relative to the instruction after the jump
                if item.src is None:
                    item = _insn(_JMP | _JNE | _K, dst=item.dst, off=off, imm=item.imm)
                else:
                    item = _insn(_JMP | _JNE | _X, dst=item.dst, src=item.src, off=off)
            out.append(item)
    out.append(_insn(_ALU64 | _MOV | _K, dst=0, imm=0))  # r0 = 0
    out.append(_insn(_JMP | _EXIT))  # return 0 (deny)
    return b"".join(out)


# --- syscalls ----------------------------------------------------------------------------


@cache
def _syscall() -> Callable[[int, int, int], int]:
    """libc's ``syscall()`` bound to the bpf(2) number of this machine."""
    machine = platform.machine().lower()
    number = _NR_BPF.get(machine)
    if number is None:
        raise BpfError("init", errno.ENOSYS, log=f"no bpf(2) syscall number for {machine}")
    func = ctypes.CDLL(None, use_errno=True).syscall
    func.restype = ctypes.c_long
    func.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

    def bpf(cmd: int, attr: int, size: int) -> int:
        return int(func(number, cmd, attr, size))

    return bpf


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], op: str) -> int:
    result = _syscall()(cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if result < 0:
        raise BpfError(op, ctypes.get_errno())
    return result


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def load_program(rules: Sequence[Rule], *, name: str = "ztlab_devices") -> int:
    """Load the device program for ``rules``; return its file descriptor (caller closes)."""
    code = build_program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"BSD")
    prog_name = name.encode()[:15]

    def attempt(log_buf: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _attr()
        struct.pack_into("=II", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8)
        struct.pack_into("=QQ", attr, 8, ctypes.addressof(insns), ctypes.addressof(license_))
        if log_buf is not None:
            struct.pack_into("=IIQ", attr, 24, 1, len(log_buf), ctypes.addressof(log_buf))
        struct.pack_into("=16s", attr, 48, prog_name)
        try:
            return _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
        except BpfError as exc:
            if log_buf is not None:
                exc.log = log_buf.value.decode(errors="replace")
            raise

    try:
        return attempt(None)
    except BpfError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise
    # Load again with the verifier log on, so that the error says why.
    return attempt(ctypes.create_string_buffer(_LOG_SIZE))


def attach(cgroup_fd: int, prog_fd: int) -> None:
    """Attach ``prog_fd`` to the cgroup2 directory ``cgroup_fd`` (BPF_F_ALLOW_MULTI)."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
    _bpf(BPF_PROG_ATTACH, attr, "BPF_PROG_ATTACH")


def detach(cgroup_fd: int, prog_fd: int) -> None:
    """Detach ``prog_fd`` from the cgroup2 directory ``cgroup_fd``."""
    attr = _attr()
    struct.pack_into("=III", attr, 0, cgroup_fd, prog_fd, BPF_CGROUP_DEVICE)
    _bpf(BPF_PROG_DETACH, attr, "BPF_PROG_DETACH")


def query(cgroup_fd: int) -> list[int]:
    """The ids of the device programs attached directly to ``cgroup_fd`` (not inherited)."""
    capacity = 16
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = _attr()
        struct.pack_into("=IIII", attr, 0, cgroup_fd, BPF_CGROUP_DEVICE, 0, 0)
        struct.pack_into("=QI", attr, 16, ctypes.addressof(ids), capacity)
        try:
            _bpf(BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
        except BpfError as exc:
            if exc.errno == errno.ENOSPC and capacity < 1 << 16:
                capacity *= 4
                continue
            raise
        (count,) = struct.unpack_from("=I", attr, 24)
        return [int(ids[i]) for i in range(min(count, capacity))]


def prog_fd_by_id(prog_id: int) -> int:
    """A file descriptor for the loaded program ``prog_id`` (caller closes)."""
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, "BPF_PROG_GET_FD_BY_ID")
