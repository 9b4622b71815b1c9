/* A 16550A UART for the guest's serial console (COM1): output only.
 *
 * Transmission is instant (the byte goes straight to out_fd), so the
 * transmitter is always empty; what matters is telling the guest so. Linux's
 * 8250 driver writes a FIFO's worth of bytes per "transmitter empty"
 * interrupt and, without that interrupt, falls back to a timer that sends
 * a few bytes a second. The interrupt is an eventfd wired to the UART's IRQ
 * line by a KVM irqfd (an edge, as on the ISA bus). One UART is shared by
 * every vCPU, hence the lock. Nothing here returns an error to the guest:
 * unknown registers read as 0 and ignore writes. */
#ifndef HOSTEL_UART_H
#define HOSTEL_UART_H

#include <pthread.h>
#include <stdint.h>

#define HOSTEL_UART_IRQ 4

struct hostel_uart {
        pthread_mutex_t lock;
        uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
        int thr_empty_pending;      /* the "transmitter empty" interrupt is due */
        int out_fd;                 /* where transmitted bytes go, or -1 */
        int irq_fd;                 /* eventfd raising the UART's IRQ, or -1 */
        uint64_t written;
};

int hostel_uart_init(struct hostel_uart *u, int out_fd, int irq_fd);
void hostel_uart_destroy(struct hostel_uart *u);
uint8_t hostel_uart_read(struct hostel_uart *u, unsigned offset);
void hostel_uart_write(struct hostel_uart *u, unsigned offset, uint8_t value);

#endif
