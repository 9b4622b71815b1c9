"""The KVM backend: a VM with an in-kernel irqchip, one thread per vCPU looping in C.

Queue kicks are ioeventfds and completions irqfds, so the data path never
reaches this module; a vCPU loop returns here only for virtio-mmio register
access (the control path, serialized by one lock) and for the end of the
guest. vCPU 0 is the boot CPU and starts in 64-bit mode at the kernel's
entry; the others wait in KVM's in-kernel local APIC for the INIT/SIPI the
guest sends them, as on a PC. The first vCPU to end the guest stops the rest."""
from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

from hostel._vmm import ffi, lib

from hostel.guest import boot
from hostel.guest.acpi import IOAPIC_PINS, MAX_CPUS
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
    lib.HOSTEL_EXIT_SHUTDOWN: ("shutdown", "the guest shut down (a triple fault)"),
    lib.HOSTEL_EXIT_HLT: ("shutdown", "the guest halted with no interrupt controller"),
    lib.HOSTEL_EXIT_INTERNAL_ERROR: ("internal-error", "KVM reported an internal error"),
    lib.HOSTEL_EXIT_FAIL_ENTRY: ("failed-entry", "the CPU refused to enter the guest"),
    lib.HOSTEL_EXIT_STOPPED: ("stopped", "the guest was stopped by the launcher"),
    lib.HOSTEL_EXIT_UNKNOWN: ("error", "KVM returned an exit the launcher does not know"),
    lib.HOSTEL_EXIT_POWEROFF: ("poweroff", "the guest powered off (ACPI S5)"),
    lib.HOSTEL_EXIT_PANIC: ("shutdown", "the guest kernel panicked (pvpanic)"),
}
_RESET_SOURCES = {lib.HOSTEL_I8042_COMMAND_PORT: "through the i8042 controller",
                  lib.HOSTEL_ACPI_RESET_PORT: "through the ACPI reset register"}


def _check(result: int, what: str) -> int:
    if result < 0:
        raise GuestError(f"KVM: {what}: {os.strerror(-result)}")
    return result


class KvmBackend:
    name = "kvm"

    def __init__(self, serial_fd: int, cpus: int = 1, legacy_pic: bool = True) -> None:
        """legacy_pic keeps KVM's default routing (GSIs below 16 reach the PIC too,
        for guests that program it); without it interrupts reach the IOAPIC only."""
        self._serial_fd = serial_fd
        self._cpus = cpus
        self._legacy_pic = legacy_pic
        self._kvm = lib.hostel_kvm_open()
        if self._kvm < 0:
            raise BackendUnavailable(self._open_failure(-self._kvm))
        self._vm = -1
        self._vcpus: list[Any] = []
        self._uart = ffi.new("struct hostel_uart *")
        # PCI's CONFIG_ADDRESS (kvm.h), shared by the vCPUs as the chipset's register is
        self._pci = ffi.new("struct hostel_pci_host *")
        self._uart_irq = -1
        self._notifies: set[tuple[int, int, int]] = set()
        self._interrupts: list[tuple[int, int]] = []
        self._mmio_lock = threading.Lock()
        self._ended = threading.Event()
        # CLOCK_MONOTONIC (ns) just before the vCPUs start: the first KVM_RUN follows
        # at once. With boot_marker_ns, how long the guest took to reach its task.
        self.first_run_ns: int | None = None
        try:
            self._check_api()
            self._check_cpus()
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

    def _check_cpus(self) -> None:
        limit = min(MAX_CPUS, max(lib.hostel_kvm_check(self._kvm, lib.KVM_CAP_MAX_VCPUS),
                                  lib.hostel_kvm_check(self._kvm, lib.KVM_CAP_NR_VCPUS), 1))
        if not 1 <= self._cpus <= limit:
            raise GuestError(f"{self._cpus} vCPUs asked for; this host's KVM (and the MADT) "
                             f"take 1..{limit}")

    def setup(self, mem: GuestMemory) -> None:
        self._vm = _check(lib.hostel_kvm_create_vm(self._kvm), "creating the VM")
        for slot, region in enumerate(mem.regions):
            _check(lib.hostel_kvm_set_memory(self._vm, slot, region.gpa, region.size,
                                             mem.host + region.gpa),
                   f"adding {region.size >> 20} MiB of guest memory at {region.gpa:#x}")
        _check(lib.hostel_kvm_create_irqchip(self._vm, TSS_GPA), "creating the in-kernel irqchip")
        if not self._legacy_pic:
            _check(lib.hostel_kvm_route_ioapic(self._vm, IOAPIC_PINS),
                   "routing interrupts to the IOAPIC")
        self._uart_irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        _check(lib.hostel_kvm_irqfd(self._vm, self._uart_irq, lib.HOSTEL_UART_IRQ, 0),
               "irqfd for COM1")
        _check(lib.hostel_uart_init(self._uart, self._serial_fd, self._uart_irq), "creating COM1")
        if lib.hostel_kvm_check(self._kvm, lib.KVM_CAP_PIT2) > 0:
            _check(lib.hostel_kvm_create_pit(self._vm), "creating the in-kernel PIT")
        self._pci.config_address = 0   # a reset clears it, as a PC's does
        for index in range(self._cpus):
            vcpu = ffi.new("struct hostel_vcpu *")
            vcpu.fd = -1
            _check(lib.hostel_vcpu_create(self._kvm, self._vm, index, vcpu), f"creating vCPU {index}")
            self._vcpus.append(vcpu)
            _check(lib.hostel_vcpu_set_cpuid(self._kvm, vcpu, index, self._cpus),
                   f"setting vCPU {index}'s CPUID")
            vcpu.uart = self._uart
            vcpu.pci = self._pci

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
        self._interrupts.append((irq, fd))

    def reset(self, mem: GuestMemory) -> None:
        """A fresh VM for a reboot: new vCPUs (the boot CPU back at the kernel's entry,
        the others waiting for SIPI), irqchip and COM1 on the same memory and /dev/kvm;
        the devices' interrupts wired again. Queue kicks are gone with the devices'
        reset, which must come first."""
        interrupts = list(self._interrupts)
        self._release_vm()
        self.setup(mem)
        for irq, fd in interrupts:
            self.add_interrupt(irq, fd)

    def run(self, entry: int, zero_page: int, tables: boot.LongModeEntry,
            mmio: MmioHandler) -> GuestExit:
        """Run every vCPU until one ends the guest; that one's exit is the guest's."""
        boot_cpu = self._vcpus[0]
        _check(lib.hostel_vcpu_enter_long_mode(boot_cpu, entry, tables.cr3, tables.gdt_base,
                                               tables.gdt_limit, boot.STACK_TOP_GPA, zero_page),
               "entering 64-bit mode")
        self._ended.clear()
        results: list[GuestExit | GuestError] = []
        threads = [threading.Thread(target=self._run_one, args=(index, mmio, results),
                                    name=f"vcpu-{index}", daemon=True)
                   for index in range(1, self._cpus)]
        self.first_run_ns = time.monotonic_ns()
        for thread in threads:
            thread.start()
        self._run_one(0, mmio, results)
        for thread in threads:
            thread.join()
        first = results[0]
        if isinstance(first, GuestError):
            raise first
        return first

    @property
    def boot_marker_ns(self) -> int | None:
        """When the guest first wrote the boot marker (kvm.h), on the clock of
        first_run_ns; None if it has not (a guest init writes it only when asked)."""
        seen = [v.boot_marker_ns for v in self._vcpus if v.boot_marker_ns]
        return min(seen) if seen else None

    def _run_one(self, index: int, mmio: MmioHandler,
                 results: list["GuestExit | GuestError"]) -> None:
        """One vCPU's loop; the first to end the guest records why and stops the others."""
        try:
            result: GuestExit | GuestError = self._loop(self._vcpus[index], index, mmio)
        except GuestError as e:
            result = e
        with self._mmio_lock:
            if not self._ended.is_set():
                self._ended.set()
                results.insert(0, result)
                self._stop_all()

    def _loop(self, vcpu: Any, index: int, mmio: MmioHandler) -> GuestExit:
        exit_ = ffi.new("struct hostel_exit *")
        reply = ffi.new("uint8_t[8]")
        while True:
            _check(lib.hostel_vcpu_run(vcpu, exit_), f"running vCPU {index}")
            if exit_.kind != lib.HOSTEL_EXIT_MMIO:
                return self._exit(exit_)
            data = bytes(exit_.data[0:exit_.len]) if exit_.is_write else None
            with self._mmio_lock:
                if self._ended.is_set():
                    return GuestExit("stopped", 0, "the guest was stopped by the launcher")
                answer = mmio(exit_.addr, exit_.len, data)
            if data is None:
                reply[0:exit_.len] = answer[:exit_.len].ljust(exit_.len, b"\0")
                _check(lib.hostel_vcpu_mmio_reply(vcpu, reply, exit_.len),
                       "answering an MMIO read")

    def _exit(self, exit_: Any) -> GuestExit:
        if exit_.kind == lib.HOSTEL_EXIT_DEBUG_EXIT:
            return GuestExit("poweroff", exit_.code,
                             f"the guest powered off with code {exit_.code}")
        if exit_.kind == lib.HOSTEL_EXIT_RESET:
            how = _RESET_SOURCES.get(exit_.detail, "(KVM system event)")
            return GuestExit("reboot", 0, f"the guest asked to reboot {how}")
        reason, text = _EXIT_REASONS[exit_.kind]
        if exit_.kind in (lib.HOSTEL_EXIT_POWEROFF, lib.HOSTEL_EXIT_PANIC):
            return GuestExit(reason, 0, text)
        if exit_.detail:
            text += f" (detail {exit_.detail:#x})"
        return GuestExit(reason, exit_.detail, text)

    def _stop_all(self) -> None:
        for vcpu in self._vcpus:
            if vcpu.run != ffi.NULL:
                lib.hostel_vcpu_stop(vcpu)

    def stop(self) -> None:
        self._stop_all()

    def close(self) -> None:
        self._release_vm()
        if self._kvm >= 0:
            os.close(self._kvm)
        self._kvm = -1

    def _release_vm(self) -> None:
        for addr, value, fd in self._notifies:
            lib.hostel_kvm_ioeventfd(self._vm, addr, 4, 1, value, fd, 1)
        self._notifies.clear()
        self._interrupts.clear()
        for vcpu in self._vcpus:
            lib.hostel_vcpu_destroy(vcpu)
        self._vcpus.clear()
        if self._uart_irq >= 0:
            lib.hostel_uart_destroy(self._uart)
            os.close(self._uart_irq)
            self._uart_irq = -1
        if self._vm >= 0:
            os.close(self._vm)
        self._vm = -1
