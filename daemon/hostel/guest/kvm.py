"""The KVM backend: a VM with an in-kernel irqchip, one vCPU looping in C.

Queue kicks are ioeventfds and completions irqfds, so the data path never
reaches this module; the vCPU loop returns here only for virtio-mmio register
access (the control path) and for the end of the guest."""
from __future__ import annotations

import errno
import os

from hostel._vmm import ffi, lib

from hostel.guest import boot
from hostel.guest.backend import GuestExit, MmioHandler
from hostel.guest.errors import BackendUnavailable, GuestError
from hostel.guest.memory import GuestMemory

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12
TSS_GPA = 0xFFFBD000   # three pages below the BIOS area; KVM needs them with an irqchip
REQUIRED_CAPS = {"KVM_CAP_USER_MEMORY": lib.KVM_CAP_USER_MEMORY,
                 "KVM_CAP_IRQCHIP": lib.KVM_CAP_IRQCHIP,
                 "KVM_CAP_IOEVENTFD": lib.KVM_CAP_IOEVENTFD,
                 "KVM_CAP_IRQFD": lib.KVM_CAP_IRQFD}
_EXIT_REASONS = {
    lib.HOSTEL_EXIT_SHUTDOWN: ("shutdown", "the guest shut down (triple fault or reset)"),
    lib.HOSTEL_EXIT_HLT: ("shutdown", "the guest halted with no interrupt controller"),
    lib.HOSTEL_EXIT_INTERNAL_ERROR: ("internal-error", "KVM reported an internal error"),
    lib.HOSTEL_EXIT_FAIL_ENTRY: ("failed-entry", "the CPU refused to enter the guest"),
    lib.HOSTEL_EXIT_STOPPED: ("stopped", "the guest was stopped by the launcher"),
    lib.HOSTEL_EXIT_UNKNOWN: ("error", "KVM returned an exit the launcher does not know"),
}


def _check(result: int, what: str) -> int:
    if result < 0:
        raise GuestError(f"KVM: {what}: {os.strerror(-result)}")
    return result


class KvmBackend:
    name = "kvm"

    def __init__(self, serial_fd: int) -> None:
        self._serial_fd = serial_fd
        self._kvm = lib.hostel_kvm_open()
        if self._kvm < 0:
            raise BackendUnavailable(self._open_failure(-self._kvm))
        self._vm = -1
        self._vcpu = ffi.new("struct hostel_vcpu *")
        self._vcpu.fd = -1
        self._notifies: set[tuple[int, int, int]] = set()
        try:
            self._check_api()
        except GuestError:
            os.close(self._kvm)
            raise

    @staticmethod
    def _open_failure(err: int) -> str:
        if err == errno.ENOENT:
            return (f"{KVM_DEVICE} does not exist: load kvm_intel or kvm_amd (or kvm_pvm), or "
                    "use a host with hardware virtualization")
        return f"cannot open {KVM_DEVICE}: {os.strerror(err)} (hosteld must run as root)"

    def _check_api(self) -> None:
        version = lib.hostel_kvm_api_version(self._kvm)
        if version != KVM_API_VERSION:
            raise BackendUnavailable(f"{KVM_DEVICE} speaks KVM API {version}, not {KVM_API_VERSION}")
        missing = [name for name, cap in REQUIRED_CAPS.items()
                   if lib.hostel_kvm_check(self._kvm, cap) <= 0]
        if missing:
            raise BackendUnavailable(f"{KVM_DEVICE} lacks {', '.join(missing)}, which the "
                                     "launcher needs")

    def setup(self, mem: GuestMemory) -> None:
        self._vm = _check(lib.hostel_kvm_create_vm(self._kvm), "creating the VM")
        _check(lib.hostel_kvm_set_memory(self._vm, 0, 0, mem.size, mem.host),
               f"adding {mem.size >> 20} MiB of guest memory")
        _check(lib.hostel_kvm_create_irqchip(self._vm, TSS_GPA), "creating the in-kernel irqchip")
        if lib.hostel_kvm_check(self._kvm, lib.KVM_CAP_PIT2) > 0:
            _check(lib.hostel_kvm_create_pit(self._vm), "creating the in-kernel PIT")
        _check(lib.hostel_vcpu_create(self._kvm, self._vm, 0, self._vcpu), "creating vCPU 0")
        _check(lib.hostel_vcpu_set_cpuid(self._kvm, self._vcpu), "setting vCPU 0's CPUID")
        self._vcpu.serial.out_fd = self._serial_fd

    def add_notify(self, addr: int, value: int, fd: int) -> None:
        _check(lib.hostel_kvm_ioeventfd(self._vm, addr, 4, 1, value, fd, 0),
               f"ioeventfd for MMIO {addr:#x} value {value}")
        self._notifies.add((addr, value, fd))

    def remove_notify(self, addr: int, value: int, fd: int) -> None:
        _check(lib.hostel_kvm_ioeventfd(self._vm, addr, 4, 1, value, fd, 1),
               f"removing the ioeventfd for MMIO {addr:#x} value {value}")
        self._notifies.discard((addr, value, fd))

    def add_interrupt(self, irq: int, fd: int) -> None:
        _check(lib.hostel_kvm_irqfd(self._vm, fd, irq, 0), f"irqfd for IRQ {irq}")

    def run(self, entry: int, zero_page: int, tables: boot.LongModeEntry,
            mmio: MmioHandler) -> GuestExit:
        _check(lib.hostel_vcpu_enter_long_mode(self._vcpu, entry, tables.cr3, tables.gdt_base,
                                               tables.gdt_limit, boot.STACK_TOP_GPA, zero_page),
               "entering 64-bit mode")
        exit_ = ffi.new("struct hostel_exit *")
        reply = ffi.new("uint8_t[8]")
        while True:
            _check(lib.hostel_vcpu_run(self._vcpu, exit_), "running vCPU 0")
            if exit_.kind == lib.HOSTEL_EXIT_MMIO:
                data = bytes(exit_.data[0:exit_.len]) if exit_.is_write else None
                answer = mmio(exit_.addr, exit_.len, data)
                if data is None:
                    reply[0:exit_.len] = answer[:exit_.len].ljust(exit_.len, b"\0")
                    _check(lib.hostel_vcpu_mmio_reply(self._vcpu, reply, exit_.len),
                           "answering an MMIO read")
                continue
            return self._exit(exit_)

    def _exit(self, exit_: object) -> GuestExit:
        if exit_.kind == lib.HOSTEL_EXIT_DEBUG_EXIT:
            return GuestExit("poweroff", exit_.code,
                             f"the guest powered off with code {exit_.code}")
        reason, text = _EXIT_REASONS[exit_.kind]
        if exit_.detail:
            text += f" (detail {exit_.detail:#x})"
        return GuestExit(reason, exit_.detail, text)

    def stop(self) -> None:
        if self._vcpu.run != ffi.NULL:
            lib.hostel_vcpu_stop(self._vcpu)

    def close(self) -> None:
        for addr, value, fd in self._notifies:
            lib.hostel_kvm_ioeventfd(self._vm, addr, 4, 1, value, fd, 1)
        self._notifies.clear()
        lib.hostel_vcpu_destroy(self._vcpu)
        for fd in (self._vm, self._kvm):
            if fd >= 0:
                os.close(fd)
        self._vm = self._kvm = -1
