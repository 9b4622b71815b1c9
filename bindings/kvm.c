/* The KVM backend's C side; see kvm.h. */
#define _GNU_SOURCE
#include "kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdbool.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CPUID_ENTRIES 128
#define STOP_SIGNAL (SIGRTMIN + 4)

static int ret(int r)
{
        return r < 0 ? -errno : r;
}

int hostel_kvm_open(void)
{
        return ret(open("/dev/kvm", O_RDWR | O_CLOEXEC));
}

int hostel_kvm_api_version(int kvm_fd)
{
        return ret(ioctl(kvm_fd, KVM_GET_API_VERSION, 0));
}

int hostel_kvm_check(int kvm_fd, int capability)
{
        return ret(ioctl(kvm_fd, KVM_CHECK_EXTENSION, capability));
}

int hostel_kvm_create_vm(int kvm_fd)
{
        return ret(ioctl(kvm_fd, KVM_CREATE_VM, 0));
}

int hostel_kvm_set_memory(int vm_fd, uint32_t slot, uint64_t gpa, uint64_t size, void *host)
{
        struct kvm_userspace_memory_region r = {
                .slot = slot, .guest_phys_addr = gpa, .memory_size = size,
                .userspace_addr = (uint64_t)(uintptr_t)host,
        };
        return ret(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r));
}

int hostel_kvm_create_irqchip(int vm_fd, uint64_t tss_addr)
{
        if (ioctl(vm_fd, KVM_SET_TSS_ADDR, (unsigned long)tss_addr) < 0)
                return -errno;
        return ret(ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0));
}

int hostel_kvm_route_ioapic(int vm_fd, uint32_t pins)
{
        struct kvm_irq_routing *r = calloc(1, sizeof(*r) + pins * sizeof(struct kvm_irq_routing_entry));
        if (!r)
                return -ENOMEM;
        r->nr = pins;
        for (uint32_t gsi = 0; gsi < pins; gsi++) {
                r->entries[gsi].gsi = gsi;
                r->entries[gsi].type = KVM_IRQ_ROUTING_IRQCHIP;
                r->entries[gsi].u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
                r->entries[gsi].u.irqchip.pin = gsi;
        }
        int rc = ret(ioctl(vm_fd, KVM_SET_GSI_ROUTING, r));
        free(r);
        return rc;
}

int hostel_kvm_create_pit(int vm_fd)
{
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        return ret(ioctl(vm_fd, KVM_CREATE_PIT2, &pit));
}

int hostel_kvm_ioeventfd(int vm_fd, uint64_t addr, uint32_t len, int use_match, uint64_t match,
                         int fd, int deassign)
{
        struct kvm_ioeventfd e = { .datamatch = match, .addr = addr, .len = len, .fd = fd };
        if (use_match)
                e.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
        if (deassign)
                e.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
        return ret(ioctl(vm_fd, KVM_IOEVENTFD, &e));
}

int hostel_kvm_irqfd(int vm_fd, int fd, uint32_t gsi, int deassign)
{
        struct kvm_irqfd i = { .fd = (uint32_t)fd, .gsi = gsi,
                               .flags = deassign ? KVM_IRQFD_FLAG_DEASSIGN : 0 };
        return ret(ioctl(vm_fd, KVM_IRQFD, &i));
}

int hostel_vcpu_create(int kvm_fd, int vm_fd, int id, struct hostel_vcpu *vcpu)
{
        memset(vcpu, 0, sizeof(*vcpu));
        vcpu->fd = -1;
        int size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
        if (size < 0)
                return -errno;
        int fd = ioctl(vm_fd, KVM_CREATE_VCPU, id);
        if (fd < 0)
                return -errno;
        void *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (run == MAP_FAILED) {
                int e = errno;
                close(fd);
                return -e;
        }
        vcpu->fd = fd;
        vcpu->run = run;
        vcpu->run_size = (uint64_t)size;
        return 0;
}

void hostel_vcpu_destroy(struct hostel_vcpu *vcpu)
{
        if (vcpu->run)
                munmap(vcpu->run, vcpu->run_size);
        if (vcpu->fd >= 0)
                close(vcpu->fd);
        vcpu->run = NULL;
        vcpu->fd = -1;
}

#define CPUID_1_ECX_TSC_DEADLINE (1u << 24)
#define CPUID_1_ECX_HYPERVISOR (1u << 31)
#define CPUID_1_EDX_HTT (1u << 28)

/* What KVM supports is not yet what a guest should see: the hypervisor bit
 * (without it Linux never looks for KVM's leaves, so no kvmclock, and it
 * tries to calibrate the TSC against a PIT and HPET it is told are absent),
 * and each vCPU's own APIC id where CPUID carries one (Linux checks them
 * against the MADT's and numbers its CPUs by them). The TSC-deadline timer
 * mode of the LAPIC: KVM emulates it in its in-kernel LAPIC (which every
 * hostel VM has), but kernels before 6.14 leave it out of
 * KVM_GET_SUPPORTED_CPUID because it depends on that LAPIC, and say so by
 * KVM_CAP_TSC_DEADLINE_TIMER instead; without it Linux falls back to the
 * LAPIC's one-shot mode, calibrated against the PIT. */
static void adapt_cpuid(struct kvm_cpuid2 *c, uint32_t apic_id, uint32_t cpus,
                        bool tsc_deadline)
{
        for (uint32_t i = 0; i < c->nent; i++) {
                struct kvm_cpuid_entry2 *e = &c->entries[i];
                if (e->function == 1) {
                        e->ecx |= CPUID_1_ECX_HYPERVISOR;
                        if (tsc_deadline)
                                e->ecx |= CPUID_1_ECX_TSC_DEADLINE;
                        e->ebx = (e->ebx & 0x0000ffffu) | (apic_id << 24) | ((cpus & 0xff) << 16);
                        if (cpus > 1)
                                e->edx |= CPUID_1_EDX_HTT;  /* the count in ebx is valid */
                } else if (e->function == 0xb || e->function == 0x1f) {
                        e->edx = apic_id;
                }
        }
}

int hostel_vcpu_set_cpuid(int kvm_fd, struct hostel_vcpu *vcpu, uint32_t apic_id, uint32_t cpus)
{
        struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + CPUID_ENTRIES * sizeof(struct kvm_cpuid_entry2));
        if (!c)
                return -ENOMEM;
        c->nent = CPUID_ENTRIES;
        int r = ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c);
        if (r == 0) {
                bool tsc_deadline = ioctl(kvm_fd, KVM_CHECK_EXTENSION,
                                          KVM_CAP_TSC_DEADLINE_TIMER) > 0;
                adapt_cpuid(c, apic_id, cpus, tsc_deadline);
                r = ioctl(vcpu->fd, KVM_SET_CPUID2, c);
        }
        r = ret(r);
        free(c);
        return r;
}

#define CR0_PE 1u
#define CR0_MP 2u
#define CR0_ET 0x10u
#define CR0_NE 0x20u
#define CR0_WP 0x10000u
#define CR0_AM 0x40000u
#define CR0_PG 0x80000000u
#define CR4_PAE 0x20u
#define EFER_LME 0x100u
#define EFER_LMA 0x400u

int hostel_vcpu_enter_long_mode(struct hostel_vcpu *vcpu, uint64_t entry, uint64_t cr3,
                                uint64_t gdt_base, uint16_t gdt_limit, uint64_t rsp, uint64_t rsi)
{
        struct kvm_sregs s;
        if (ioctl(vcpu->fd, KVM_GET_SREGS, &s) < 0)
                return -errno;
        struct kvm_segment code = {
                .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 11,
                .present = 1, .s = 1, .l = 1, .g = 1,
        };
        struct kvm_segment data = code;
        data.selector = 0x18;
        data.type = 3;
        data.l = 0;
        data.db = 1;
        s.cs = code;
        s.ds = s.es = s.fs = s.gs = s.ss = data;
        s.gdt.base = gdt_base;
        s.gdt.limit = gdt_limit;
        s.cr3 = cr3;
        s.cr4 = CR4_PAE;
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
        s.efer = EFER_LME | EFER_LMA;
        if (ioctl(vcpu->fd, KVM_SET_SREGS, &s) < 0)
                return -errno;
        struct kvm_regs r;
        memset(&r, 0, sizeof(r));
        r.rip = entry;
        r.rsp = rsp;
        r.rsi = rsi;
        r.rflags = 2;
        return ret(ioctl(vcpu->fd, KVM_SET_REGS, &r));
}

/* A write that ends the guest: the kind of end, or 0 for none. */
static int ending_write(uint16_t port, uint8_t v)
{
        if (port == HOSTEL_I8042_COMMAND_PORT && v == HOSTEL_I8042_RESET)
                return HOSTEL_EXIT_RESET;
        if (port == HOSTEL_ACPI_RESET_PORT && v == HOSTEL_ACPI_RESET_VALUE)
                return HOSTEL_EXIT_RESET;
        if (port == HOSTEL_ACPI_SLEEP_CONTROL_PORT && (v & HOSTEL_ACPI_SLEEP_ENABLE) &&
            ((v >> 2) & 7) == HOSTEL_ACPI_S5_TYPE)
                return HOSTEL_EXIT_POWEROFF;
        if (port == HOSTEL_PVPANIC_PORT && (v & HOSTEL_PVPANIC_PANICKED))
                return HOSTEL_EXIT_PANIC;
        return 0;
}

/* What reading a port gives: the i8042's status and data and the ACPI sleep
 * registers read 0 (idle), pvpanic its events; a port with no device floats high,
 * PCI's CONFIG_DATA (0xCFC-0xCFF) too: there is no PCI device to answer. */
static uint8_t port_in(uint16_t port)
{
        switch (port) {
        case HOSTEL_I8042_DATA_PORT:
        case HOSTEL_I8042_COMMAND_PORT:
        case HOSTEL_ACPI_SLEEP_CONTROL_PORT:
        case HOSTEL_ACPI_SLEEP_STATUS_PORT:
                return 0;
        case HOSTEL_PVPANIC_PORT:
                return HOSTEL_PVPANIC_PANICKED;
        default:
                return 0xff;
        }
}

static void note_boot_marker(struct hostel_vcpu *vcpu, uint8_t value)
{
        struct timespec now;
        if (value != HOSTEL_BOOT_MARKER_VALUE || vcpu->boot_marker_ns ||
            clock_gettime(CLOCK_MONOTONIC, &now) < 0)
                return;
        vcpu->boot_marker_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* CONFIG_ADDRESS of PCI configuration mechanism 1, reached by 32-bit accesses
 * only (byte accesses to 0xCF8-0xCFB would be other registers on a PC; there
 * are none here, so they float): it keeps what is written, reserved bits 0. */
static void pci_config_address(struct hostel_pci_host *pci, int out, uint8_t *data)
{
        uint32_t v;
        if (out) {
                memcpy(&v, data, sizeof(v));
                __atomic_store_n(&pci->config_address, v & HOSTEL_PCI_CONFIG_ADDRESS_MASK,
                                 __ATOMIC_RELAXED);
        } else {
                v = __atomic_load_n(&pci->config_address, __ATOMIC_RELAXED);
                memcpy(data, &v, sizeof(v));
        }
}

/* Port I/O: serial, debug-exit, power and PCI's CONFIG_ADDRESS handled here;
 * 1 means "return to the caller". */
static int handle_io(struct hostel_vcpu *vcpu, struct kvm_run *run, struct hostel_exit *exit)
{
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        uint16_t port = run->io.port;
        int out = run->io.direction == KVM_EXIT_IO_OUT;
        for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
                if (port >= HOSTEL_SERIAL_PORT && port < HOSTEL_SERIAL_PORT + 8 && vcpu->uart) {
                        unsigned off = port - HOSTEL_SERIAL_PORT;
                        if (out)
                                hostel_uart_write(vcpu->uart, off, data[0]);
                        else
                                data[0] = hostel_uart_read(vcpu->uart, off);
                } else if (port == HOSTEL_PCI_CONFIG_ADDRESS_PORT && run->io.size == 4 &&
                           vcpu->pci) {
                        pci_config_address(vcpu->pci, out, data);
                } else if (port == HOSTEL_DEBUG_EXIT_PORT && out) {
                        exit->kind = HOSTEL_EXIT_DEBUG_EXIT;
                        exit->code = data[0];
                        return 1;
                } else if (port == HOSTEL_BOOT_MARKER_PORT && out) {
                        note_boot_marker(vcpu, data[0]);
                } else if (out) {
                        int kind = ending_write(port, data[0]);
                        if (kind) {
                                exit->kind = kind;
                                exit->detail = port;
                                return 1;
                        }
                        vcpu->ignored_ports++;  /* no device: writes vanish */
                } else {
                        memset(data, port_in(port), run->io.size);
                }
        }
        return 0;
}

static void ignore_signal(int sig)
{
        (void)sig;
}

static int run_loop(struct hostel_vcpu *vcpu, struct hostel_exit *exit);

int hostel_vcpu_run(struct hostel_vcpu *vcpu, struct hostel_exit *exit)
{
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = ignore_signal;  /* no SA_RESTART: KVM_RUN returns EINTR */
        if (sigaction(STOP_SIGNAL, &sa, NULL) < 0)
                return -errno;
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, STOP_SIGNAL);
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
        vcpu->thread = (unsigned long)pthread_self();
        __atomic_store_n(&vcpu->running, 1, __ATOMIC_RELEASE);
        int r = run_loop(vcpu, exit);
        __atomic_store_n(&vcpu->running, 0, __ATOMIC_RELEASE);
        return r;
}

static int run_loop(struct hostel_vcpu *vcpu, struct hostel_exit *exit)
{
        struct kvm_run *run = vcpu->run;
        memset(exit, 0, sizeof(*exit));
        for (;;) {
                if (__atomic_load_n(&vcpu->stop, __ATOMIC_ACQUIRE)) {
                        exit->kind = HOSTEL_EXIT_STOPPED;
                        return 0;
                }
                int r = ioctl(vcpu->fd, KVM_RUN, 0);
                vcpu->exits++;
                if (r < 0) {
                        if (errno == EINTR || errno == EAGAIN)
                                continue;
                        return -errno;
                }
                switch (run->exit_reason) {
                case KVM_EXIT_IO:
                        if (handle_io(vcpu, run, exit))
                                return 0;
                        continue;
                case KVM_EXIT_MMIO:
                        exit->kind = HOSTEL_EXIT_MMIO;
                        exit->addr = run->mmio.phys_addr;
                        exit->len = run->mmio.len <= 8 ? run->mmio.len : 8;
                        exit->is_write = run->mmio.is_write;
                        memcpy(exit->data, run->mmio.data, exit->len);
                        return 0;
                case KVM_EXIT_HLT:
                        exit->kind = HOSTEL_EXIT_HLT;
                        return 0;
                case KVM_EXIT_SHUTDOWN:
                        exit->kind = HOSTEL_EXIT_SHUTDOWN;
                        return 0;
                case KVM_EXIT_SYSTEM_EVENT:
                        exit->kind = run->system_event.type == KVM_SYSTEM_EVENT_RESET ?
                                HOSTEL_EXIT_RESET : HOSTEL_EXIT_SHUTDOWN;
                        exit->detail = run->system_event.type;
                        return 0;
                case KVM_EXIT_INTERNAL_ERROR:
                        exit->kind = HOSTEL_EXIT_INTERNAL_ERROR;
                        exit->detail = run->internal.suberror;
                        return 0;
                case KVM_EXIT_FAIL_ENTRY:
                        exit->kind = HOSTEL_EXIT_FAIL_ENTRY;
                        exit->detail = run->fail_entry.hardware_entry_failure_reason;
                        return 0;
                case KVM_EXIT_INTR:
                        continue;
                default:
                        exit->kind = HOSTEL_EXIT_UNKNOWN;
                        exit->detail = run->exit_reason;
                        return 0;
                }
        }
}

int hostel_vcpu_mmio_reply(struct hostel_vcpu *vcpu, const uint8_t *data, uint32_t len)
{
        struct kvm_run *run = vcpu->run;
        if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write || len > 8)
                return -EINVAL;
        memcpy(run->mmio.data, data, len);
        return 0;
}

int hostel_vcpu_stop(struct hostel_vcpu *vcpu)
{
        __atomic_store_n(&vcpu->stop, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&((struct kvm_run *)vcpu->run)->immediate_exit, 1, __ATOMIC_RELEASE);
        if (__atomic_load_n(&vcpu->running, __ATOMIC_ACQUIRE))
                return -pthread_kill((pthread_t)vcpu->thread, STOP_SIGNAL);
        return 0;
}
