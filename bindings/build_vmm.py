"""cffi API-mode build of hostel._vmm: the guest launcher's C side.

Separate from hostel._native so that the launcher's C (virtqueues, device
workers, the KVM vCPU loop) builds and evolves on its own. Calls through cffi
release the GIL, which is what lets one thread per virtqueue and per vCPU run
their C loops side by side."""
from cffi import FFI

SOURCES = ["vring.c", "kvm.c", "uart.c", "guestram.c"]

CDEF = """
/* vring.h */
#define HOSTEL_VQ_MAX_SIZE ...
#define HOSTEL_RNG_MAX_REQUEST ...
#define HOSTEL_WORKER_STOPPED ...
enum hostel_vq_error {
    HOSTEL_VQ_OK, HOSTEL_VQ_BAD_LAYOUT, HOSTEL_VQ_BAD_AVAIL_IDX, HOSTEL_VQ_BAD_HEAD,
    HOSTEL_VQ_BAD_NEXT, HOSTEL_VQ_CHAIN_TOO_LONG, HOSTEL_VQ_BAD_ADDRESS, HOSTEL_VQ_INDIRECT,
    HOSTEL_VQ_READ_AFTER_WRITE, HOSTEL_VQ_READONLY_WRITE, HOSTEL_VQ_BAD_REQUEST,
    HOSTEL_VQ_IO_ERROR, HOSTEL_VQ_CHAIN_TOO_BIG, ...
};
struct iovec { void *iov_base; size_t iov_len; };
#define HOSTEL_VQ_MAX_REGIONS ...
struct hostel_mem_region { uint64_t gpa; uint64_t size; };
struct hostel_vring {
    uint8_t *mem; struct hostel_mem_region region[...]; uint32_t n_regions;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint32_t num; int event_idx;
    uint16_t last_avail; uint16_t used_idx; uint16_t signalled_used; int signalled_valid;
    int error; int last_errno;
};
struct hostel_chain {
    uint16_t head; uint32_t n_out, n_in; uint64_t out_len, in_len;
    uint32_t cap; struct iovec *iov;
};
int hostel_vring_init(struct hostel_vring *vq, uint8_t *mem,
                      const struct hostel_mem_region *regions, uint32_t n_regions,
                      uint32_t num, uint64_t desc, uint64_t avail, uint64_t used, int event_idx);
void hostel_vring_legacy_layout(uint32_t num, uint64_t base, uint32_t align,
                                uint64_t *desc, uint64_t *avail, uint64_t *used);
int hostel_vring_pop(struct hostel_vring *vq, struct hostel_chain *chain);
int hostel_vring_push(struct hostel_vring *vq, uint16_t head, uint32_t len);
int hostel_vring_should_notify(struct hostel_vring *vq);
void hostel_vring_enable_kicks(struct hostel_vring *vq);
void hostel_vring_fail(struct hostel_vring *vq, int error);
int hostel_vring_error(const struct hostel_vring *vq);
void hostel_isr_set(uint32_t *isr, uint32_t bits);
uint32_t hostel_isr_ack(uint32_t *isr, uint32_t bits);
enum hostel_worker_kind {
    HOSTEL_WORK_BLK, HOSTEL_WORK_RNG, HOSTEL_WORK_CONSOLE_TX, HOSTEL_WORK_CONSOLE_RX,
    HOSTEL_WORK_NET_TX, HOSTEL_WORK_NET_RX, ...
};
struct hostel_worker {
    struct hostel_vring *vq; int kind; int kick_fd; int call_fd; int stop_fd; int io_fd;
    int readonly; uint64_t capacity; char serial[20]; uint64_t served; uint32_t *isr;
    struct hostel_chain chain;
};
int hostel_worker_process(struct hostel_worker *w);
int hostel_worker_run(struct hostel_worker *w);

/* guestram.h */
#define HOSTEL_GUEST_RAM_ALIGN ...
int hostel_guest_ram_map(uint64_t span, void **base);
int hostel_guest_ram_unmap(void *base, uint64_t span);

/* kvm.h */
#define HOSTEL_SERIAL_PORT ...
#define HOSTEL_DEBUG_EXIT_PORT ...
#define HOSTEL_BOOT_MARKER_PORT ...
#define HOSTEL_BOOT_MARKER_VALUE ...
#define HOSTEL_I8042_COMMAND_PORT ...
#define HOSTEL_PVPANIC_PORT ...
#define HOSTEL_ACPI_SLEEP_CONTROL_PORT ...
#define HOSTEL_ACPI_SLEEP_STATUS_PORT ...
#define HOSTEL_ACPI_RESET_PORT ...
#define HOSTEL_ACPI_RESET_VALUE ...
#define HOSTEL_ACPI_S5_TYPE ...
enum hostel_exit_kind {
    HOSTEL_EXIT_MMIO, HOSTEL_EXIT_DEBUG_EXIT, HOSTEL_EXIT_SHUTDOWN, HOSTEL_EXIT_HLT,
    HOSTEL_EXIT_INTERNAL_ERROR, HOSTEL_EXIT_FAIL_ENTRY, HOSTEL_EXIT_STOPPED, HOSTEL_EXIT_UNKNOWN,
    HOSTEL_EXIT_POWEROFF, HOSTEL_EXIT_RESET, HOSTEL_EXIT_PANIC, ...
};
#define HOSTEL_UART_IRQ ...
struct hostel_uart { int out_fd; int irq_fd; uint64_t written; ...; };
int hostel_uart_init(struct hostel_uart *u, int out_fd, int irq_fd);
void hostel_uart_destroy(struct hostel_uart *u);
uint8_t hostel_uart_read(struct hostel_uart *u, unsigned offset);
void hostel_uart_write(struct hostel_uart *u, unsigned offset, uint8_t value);
struct hostel_pci_host { uint32_t config_address; };
struct hostel_vcpu {
    int fd; void *run; uint64_t run_size; int stop; unsigned long thread; int running;
    struct hostel_uart *uart; struct hostel_pci_host *pci; uint64_t exits; uint64_t ignored_ports;
    uint64_t boot_marker_ns;
};
struct hostel_exit {
    int kind; uint64_t addr; uint32_t len; int is_write; uint8_t data[8];
    uint64_t detail; uint64_t code;
};
int hostel_kvm_open(void);
int hostel_kvm_api_version(int kvm_fd);
int hostel_kvm_check(int kvm_fd, int capability);
int hostel_kvm_create_vm(int kvm_fd);
int hostel_kvm_set_memory(int vm_fd, uint32_t slot, uint64_t gpa, uint64_t size, void *host);
int hostel_kvm_create_irqchip(int vm_fd, uint64_t tss_addr);
int hostel_kvm_route_ioapic(int vm_fd, uint32_t pins);
int hostel_kvm_create_pit(int vm_fd);
int hostel_kvm_ioeventfd(int vm_fd, uint64_t addr, uint32_t len, int use_match, uint64_t match,
                         int fd, int deassign);
int hostel_kvm_irqfd(int vm_fd, int fd, uint32_t gsi, int deassign);
int hostel_vcpu_create(int kvm_fd, int vm_fd, int id, struct hostel_vcpu *vcpu);
void hostel_vcpu_destroy(struct hostel_vcpu *vcpu);
int hostel_vcpu_set_cpuid(int kvm_fd, struct hostel_vcpu *vcpu, uint32_t apic_id, uint32_t cpus);
int hostel_vcpu_enter_long_mode(struct hostel_vcpu *vcpu, uint64_t entry, uint64_t cr3,
                                uint64_t gdt_base, uint16_t gdt_limit, uint64_t rsp, uint64_t rsi);
int hostel_vcpu_run(struct hostel_vcpu *vcpu, struct hostel_exit *exit);
int hostel_vcpu_mmio_reply(struct hostel_vcpu *vcpu, const uint8_t *data, uint32_t len);
int hostel_vcpu_stop(struct hostel_vcpu *vcpu);

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hostel._vmm",
    '#include <linux/kvm.h>\n#include "vring.h"\n#include "uart.h"\n#include "kvm.h"\n'
    '#include "guestram.h"\n',
    sources=[f"bindings/{name}" for name in SOURCES],
    include_dirs=["bindings"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
