/* The guest's 16550A UART; see uart.h. */
#include "uart.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define RBR_THR 0
#define IER 1
#define IIR_FCR 2
#define LCR 3
#define MCR 4
#define LSR 5
#define MSR 6
#define SCR 7

#define LCR_DLAB 0x80
#define IER_THRI 0x02
#define IER_MASK 0x0f
#define IIR_NO_INT 0x01
#define IIR_THRI 0x02
#define IIR_FIFOS 0xc0
#define FCR_ENABLE 0x01
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define MCR_LOOP 0x10
#define MSR_CABLE 0xb0              /* DCD, DSR, CTS: a terminal is attached */

int hostel_uart_init(struct hostel_uart *u, int out_fd, int irq_fd)
{
        memset(u, 0, sizeof(*u));
        u->out_fd = out_fd;
        u->irq_fd = irq_fd;
        return -pthread_mutex_init(&u->lock, NULL);
}

void hostel_uart_destroy(struct hostel_uart *u)
{
        pthread_mutex_destroy(&u->lock);
}

static void raise_irq(struct hostel_uart *u)
{
        uint64_t one = 1;
        if (u->irq_fd >= 0 && write(u->irq_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                u->irq_fd = -1;  /* the line is gone: stop trying, output still works */
}

/* The transmitter has just become empty (it always is): interrupt if enabled. */
static void thr_emptied(struct hostel_uart *u)
{
        u->thr_empty_pending = 1;
        if (u->ier & IER_THRI)
                raise_irq(u);
}

/* In loopback mode the modem outputs come back as inputs (Linux's probe checks). */
static uint8_t modem_status(const struct hostel_uart *u)
{
        if (!(u->mcr & MCR_LOOP))
                return MSR_CABLE;
        return (uint8_t)(((u->mcr & 0x02) << 3) | ((u->mcr & 0x01) << 5) |
                         ((u->mcr & 0x04) << 4) | ((u->mcr & 0x08) << 4));
}

static uint8_t interrupt_id(struct hostel_uart *u)
{
        uint8_t fifos = (u->fcr & FCR_ENABLE) ? IIR_FIFOS : 0;
        if ((u->ier & IER_THRI) && u->thr_empty_pending) {
                u->thr_empty_pending = 0;  /* reading IIR acknowledges it */
                return fifos | IIR_THRI;
        }
        return fifos | IIR_NO_INT;
}

static uint8_t read_locked(struct hostel_uart *u, unsigned offset)
{
        int dlab = u->lcr & LCR_DLAB;
        switch (offset) {
        case RBR_THR: return dlab ? u->dll : 0;   /* no input on this port */
        case IER: return dlab ? u->dlm : u->ier;
        case IIR_FCR: return interrupt_id(u);
        case LCR: return u->lcr;
        case MCR: return u->mcr;
        case LSR: return LSR_THRE | LSR_TEMT;
        case MSR: return modem_status(u);
        case SCR: return u->scr;
        default: return 0;
        }
}

static void write_locked(struct hostel_uart *u, unsigned offset, uint8_t v)
{
        int dlab = u->lcr & LCR_DLAB;
        if (offset == RBR_THR && dlab) {
                u->dll = v;
        } else if (offset == RBR_THR) {
                if (u->out_fd >= 0 && write(u->out_fd, &v, 1) == 1)
                        u->written++;
                thr_emptied(u);
        } else if (offset == IER && dlab) {
                u->dlm = v;
        } else if (offset == IER) {
                uint8_t was = u->ier;
                u->ier = v & IER_MASK;
                if ((u->ier & IER_THRI) && !(was & IER_THRI))
                        thr_emptied(u);  /* enabling it with the THR empty interrupts at once */
        } else if (offset == IIR_FCR) {
                u->fcr = v;
        } else if (offset == LCR) {
                u->lcr = v;
        } else if (offset == MCR) {
                u->mcr = v;
        } else if (offset == SCR) {
                u->scr = v;
        }
}

uint8_t hostel_uart_read(struct hostel_uart *u, unsigned offset)
{
        pthread_mutex_lock(&u->lock);
        uint8_t v = read_locked(u, offset);
        pthread_mutex_unlock(&u->lock);
        return v;
}

void hostel_uart_write(struct hostel_uart *u, unsigned offset, uint8_t value)
{
        pthread_mutex_lock(&u->lock);
        write_locked(u, offset, value);
        pthread_mutex_unlock(&u->lock);
}
