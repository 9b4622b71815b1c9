/* The KVM backend's C side: VM and vCPU setup ioctls, and the vCPU loop.
 *
 * The loop runs KVM_RUN without the GIL and handles the exits that are hot or
 * trivial itself (the 16550 serial port, the debug-exit port, unclaimed ports);
 * it returns to the caller only for MMIO (virtio-mmio register access: the
 * control path) and for the end of the guest. Queue notifications never come
 * here: they are ioeventfds. Every function returns >= 0 or -errno. */
#ifndef HOSTEL_KVM_H
#define HOSTEL_KVM_H

#include <stdint.h>

#define HOSTEL_SERIAL_PORT 0x3f8
#define HOSTEL_DEBUG_EXIT_PORT 0x501

enum hostel_exit_kind {
        HOSTEL_EXIT_MMIO = 1,       /* addr/len/is_write/data: answer with hostel_vcpu_mmio_reply */
        HOSTEL_EXIT_DEBUG_EXIT,     /* the guest wrote `code` to the debug-exit port */
        HOSTEL_EXIT_SHUTDOWN,       /* triple fault or shutdown */
        HOSTEL_EXIT_HLT,            /* hlt without an in-kernel irqchip */
        HOSTEL_EXIT_INTERNAL_ERROR, /* detail: KVM's suberror */
        HOSTEL_EXIT_FAIL_ENTRY,     /* detail: hardware entry failure reason */
        HOSTEL_EXIT_STOPPED,        /* hostel_vcpu_stop was called */
        HOSTEL_EXIT_UNKNOWN,        /* detail: KVM exit reason */
};

struct hostel_serial {
        uint8_t regs[8];            /* IER, IIR, LCR, MCR, LSR, MSR, SCR as written */
        uint8_t dll, dlm;
        int out_fd;                 /* where transmitted bytes go */
        uint64_t written;
};

struct hostel_vcpu {
        int fd;
        void *run;                  /* struct kvm_run, mmapped */
        uint64_t run_size;
        int stop;                   /* set by hostel_vcpu_stop from another thread */
        unsigned long thread;       /* pthread running the loop, for the stop signal */
        int running;
        struct hostel_serial serial;
        uint64_t exits;             /* every KVM_RUN return, for diagnostics */
        uint64_t ignored_ports;
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
/* The i8254 timer in the kernel: Linux calibrates its clocks against it. */
int hostel_kvm_create_pit(int vm_fd);
int hostel_kvm_ioeventfd(int vm_fd, uint64_t addr, uint32_t len, int use_match, uint64_t match,
                         int fd, int deassign);
int hostel_kvm_irqfd(int vm_fd, int fd, uint32_t gsi, int deassign);

int hostel_vcpu_create(int kvm_fd, int vm_fd, int id, struct hostel_vcpu *vcpu);
void hostel_vcpu_destroy(struct hostel_vcpu *vcpu);
/* Give the vCPU the host's supported CPUID (long mode needs it). */
int hostel_vcpu_set_cpuid(int kvm_fd, struct hostel_vcpu *vcpu);
/* Enter 64-bit mode directly: paging on with cr3, flat segments from the GDT. */
int hostel_vcpu_enter_long_mode(struct hostel_vcpu *vcpu, uint64_t entry, uint64_t cr3,
                                uint64_t gdt_base, uint16_t gdt_limit, uint64_t rsp, uint64_t rsi);
int hostel_vcpu_run(struct hostel_vcpu *vcpu, struct hostel_exit *exit);
int hostel_vcpu_mmio_reply(struct hostel_vcpu *vcpu, const uint8_t *data, uint32_t len);
/* Make the vCPU loop return HOSTEL_EXIT_STOPPED, from any thread: a signal
 * (with a no-op handler) knocks the vCPU out of KVM_RUN or an in-kernel hlt. */
int hostel_vcpu_stop(struct hostel_vcpu *vcpu);

#endif
