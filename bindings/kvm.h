/* The KVM backend's C side: VM and vCPU setup ioctls, and the vCPU loop.
 *
 * The loop runs KVM_RUN without the GIL and handles the exits that are hot or
 * trivial itself (the 16550 serial port, the debug-exit port, the power
 * registers, PCI's CONFIG_ADDRESS, unclaimed ports);
 * it returns to the caller only for MMIO (virtio-mmio register access: the
 * control path) and for the end of the guest. Queue notifications never come
 * here: they are ioeventfds. Every function returns >= 0 or -errno. */
#ifndef HOSTEL_KVM_H
#define HOSTEL_KVM_H

#include <stdint.h>

#include "uart.h"

#define HOSTEL_SERIAL_PORT 0x3f8
#define HOSTEL_DEBUG_EXIT_PORT 0x501
/* The boot marker (Firecracker's: value 123 to port 0x3f0): a guest init writes
 * it right before it executes its task, and the loop notes when the first one
 * came (CLOCK_MONOTONIC, the host's clock), for a benchmark to read. */
#define HOSTEL_BOOT_MARKER_PORT 0x3f0
#define HOSTEL_BOOT_MARKER_VALUE 123
/* The i8042 keyboard controller, only as far as resetting the machine goes:
 * its status port reads 0 (buffers empty, so Linux's kb_wait ends at once)
 * and command 0xfe pulses the reset line. */
#define HOSTEL_I8042_DATA_PORT 0x60
#define HOSTEL_I8042_COMMAND_PORT 0x64
#define HOSTEL_I8042_RESET 0xfe
/* pvpanic (ACPI QEMU0001): reads say which events it takes, a write reports one. */
#define HOSTEL_PVPANIC_PORT 0x505
#define HOSTEL_PVPANIC_PANICKED 0x1
/* The ACPI power registers the FADT names (daemon/hostel/guest/acpi.py). */
#define HOSTEL_ACPI_SLEEP_CONTROL_PORT 0x600
#define HOSTEL_ACPI_SLEEP_STATUS_PORT 0x601
#define HOSTEL_ACPI_RESET_PORT 0x602
#define HOSTEL_ACPI_RESET_VALUE 0x1
#define HOSTEL_ACPI_SLEEP_ENABLE 0x20
#define HOSTEL_ACPI_S5_TYPE 5

/* PCI configuration mechanism 1 on a machine with no PCI device: the address
 * written to CONFIG_ADDRESS (0xCF8) reads back, CONFIG_DATA (0xCFC) reads all
 * ones. Linux probes conf1 this way; without an answer it finds no config
 * space access at all ("PCI: Fatal: No config space access function found"). */
#define HOSTEL_PCI_CONFIG_ADDRESS_PORT 0xcf8
#define HOSTEL_PCI_CONFIG_ADDRESS_MASK 0x80fffffcu  /* enable, bus, device, function, register */

struct hostel_pci_host {
        uint32_t config_address;    /* shared by every vCPU, as the chipset's register is */
};

enum hostel_exit_kind {
        HOSTEL_EXIT_MMIO = 1,       /* addr/len/is_write/data: answer with hostel_vcpu_mmio_reply */
        HOSTEL_EXIT_DEBUG_EXIT,     /* the guest wrote `code` to the debug-exit port */
        HOSTEL_EXIT_SHUTDOWN,       /* triple fault or shutdown */
        HOSTEL_EXIT_HLT,            /* hlt without an in-kernel irqchip */
        HOSTEL_EXIT_INTERNAL_ERROR, /* detail: KVM's suberror */
        HOSTEL_EXIT_FAIL_ENTRY,     /* detail: hardware entry failure reason */
        HOSTEL_EXIT_STOPPED,        /* hostel_vcpu_stop was called */
        HOSTEL_EXIT_UNKNOWN,        /* detail: KVM exit reason */
        HOSTEL_EXIT_POWEROFF,       /* ACPI S5 through the sleep control register */
        HOSTEL_EXIT_RESET,          /* detail: the port written (i8042 or ACPI reset register) */
        HOSTEL_EXIT_PANIC,          /* the guest reported a panic through pvpanic */
};

struct hostel_vcpu {
        int fd;
        void *run;                  /* struct kvm_run, mmapped */
        uint64_t run_size;
        int stop;                   /* set by hostel_vcpu_stop from another thread */
        unsigned long thread;       /* pthread running the loop, for the stop signal */
        int running;
        struct hostel_uart *uart;   /* COM1, shared by every vCPU; NULL: none */
        struct hostel_pci_host *pci; /* the VM's CONFIG_ADDRESS; NULL: 0xCF8 floats */
        uint64_t exits;             /* every KVM_RUN return, for diagnostics */
        uint64_t ignored_ports;
        uint64_t boot_marker_ns;    /* the first boot marker's CLOCK_MONOTONIC; 0: none yet */
};

struct hostel_exit {
        int kind;
        uint64_t addr;
        uint32_t len;
        int is_write;
        uint8_t data[8];
        uint64_t detail;
        uint64_t code;
};

int hostel_kvm_open(void);
int hostel_kvm_api_version(int kvm_fd);
int hostel_kvm_check(int kvm_fd, int capability);
int hostel_kvm_create_vm(int kvm_fd);
int hostel_kvm_set_memory(int vm_fd, uint32_t slot, uint64_t gpa, uint64_t size, void *host);
/* PIC + IOAPIC + LAPIC in the kernel, and the TSS/identity pages it needs. */
int hostel_kvm_create_irqchip(int vm_fd, uint64_t tss_addr);
/* GSI n raises IOAPIC pin n only, for n < pins: KVM's default routing also
 * raises the PIC for GSIs below 16, and the boot CPU's LINT0 takes the PIC's
 * output (ExtINT) unless the guest masks it, which a hardware-reduced Linux
 * never does: every device interrupt would arrive twice. */
int hostel_kvm_route_ioapic(int vm_fd, uint32_t pins);
/* The i8254 timer in the kernel: Linux calibrates its clocks against it. */
int hostel_kvm_create_pit(int vm_fd);
int hostel_kvm_ioeventfd(int vm_fd, uint64_t addr, uint32_t len, int use_match, uint64_t match,
                         int fd, int deassign);
int hostel_kvm_irqfd(int vm_fd, int fd, uint32_t gsi, int deassign);

int hostel_vcpu_create(int kvm_fd, int vm_fd, int id, struct hostel_vcpu *vcpu);
void hostel_vcpu_destroy(struct hostel_vcpu *vcpu);
/* Give the vCPU the host's supported CPUID (long mode needs it), with its own
 * APIC id in the leaves that report one (1, 0xb, 0x1f) and the vCPU count. */
int hostel_vcpu_set_cpuid(int kvm_fd, struct hostel_vcpu *vcpu, uint32_t apic_id, uint32_t cpus);
/* Enter 64-bit mode directly: paging on with cr3, flat segments from the GDT. */
int hostel_vcpu_enter_long_mode(struct hostel_vcpu *vcpu, uint64_t entry, uint64_t cr3,
                                uint64_t gdt_base, uint16_t gdt_limit, uint64_t rsp, uint64_t rsi);
int hostel_vcpu_run(struct hostel_vcpu *vcpu, struct hostel_exit *exit);
int hostel_vcpu_mmio_reply(struct hostel_vcpu *vcpu, const uint8_t *data, uint32_t len);
/* Make the vCPU loop return HOSTEL_EXIT_STOPPED, from any thread: a signal
 * (with a no-op handler) knocks the vCPU out of KVM_RUN or an in-kernel hlt. */
int hostel_vcpu_stop(struct hostel_vcpu *vcpu);

#endif
