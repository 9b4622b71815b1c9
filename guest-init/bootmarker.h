/* The boot marker: on a benchmark's request (launch.json's "boot_marker"), the
   init writes Firecracker's boot-complete signal, 123 to I/O port 0x3f0, right
   before it executes the task. The VMM timestamps the write on the host's
   clock (hostel's launcher: bindings/kvm.c; QEMU: an isa-debugcon on that port,
   read by the benchmark), so boot time is measured from outside the guest. */
#ifndef HOSTEL_GUEST_BOOTMARKER_H
#define HOSTEL_GUEST_BOOTMARKER_H

#define BOOT_MARKER_PORT 0x3f0
#define BOOT_MARKER_VALUE 123

/* Access to the port, while still privileged (it survives setuid): 0, or -1 and errno. */
int boot_marker_allow(void);

/* The write, then the access dropped again: the task gets no port of its own. */
void boot_marker_write(void);

#endif
