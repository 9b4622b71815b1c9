/* A minimal virtio-mmio driver for freestanding test guests: find a device,
 * negotiate, set up split queues, submit chains, sleep until the device
 * interrupts. The legacy PIC delivers the interrupts (KVM's LAPIC starts in
 * virtual-wire mode); an IDT entry per line counts them. */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "guest.h"

#define MMIO_BASE 0xd0000000ul
#define MMIO_WINDOW 0x1000
#define MMIO_SLOTS 9
static const uint8_t slot_irq[MMIO_SLOTS] = { 5, 6, 7, 9, 10, 11, 12, 14, 15 };

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define D_NEXT 1
#define D_WRITE 2

#define QN 8

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vavail { uint16_t flags, idx, ring[QN], used_event; };
struct vused { uint16_t flags, idx; struct { uint32_t id, len; } ring[QN]; uint16_t avail_event; };

struct vqueue {
        struct vdesc desc[QN] __attribute__((aligned(16)));
        struct vavail avail __attribute__((aligned(4)));
        struct vused used __attribute__((aligned(8)));
        uint16_t last_used;
};

struct vdev {
        volatile uint32_t *regs;
        int irq;
};

static volatile uint32_t irq_count;

static inline uint32_t rd(struct vdev *d, unsigned off) { return d->regs[off / 4]; }
static inline void wr(struct vdev *d, unsigned off, uint32_t v) { d->regs[off / 4] = v; }

/* Interrupts ----------------------------------------------------------------- */

struct idt_gate { uint16_t off0, sel; uint8_t ist, type; uint16_t off1; uint32_t off2, zero; };
static struct idt_gate idt[48] __attribute__((aligned(16)));

struct frame;
__attribute__((interrupt)) static void on_irq_master(struct frame *f)
{
        (void)f;
        irq_count++;
        outb(0x20, 0x20);
}

__attribute__((interrupt)) static void on_irq_slave(struct frame *f)
{
        (void)f;
        irq_count++;
        outb(0xa0, 0x20);
        outb(0x20, 0x20);
}

static void set_gate(int vec, void (*fn)(struct frame *))
{
        uint64_t a = (uint64_t)fn;
        idt[vec] = (struct idt_gate){ (uint16_t)a, 0x10, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
}

/* PIC remapped to vectors 32-47, every line masked but the ones asked for. */
static void interrupts_init(uint16_t unmask)
{
        for (int v = 32; v < 48; v++)
                set_gate(v, v < 40 ? on_irq_master : on_irq_slave);
        struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };
        __asm__ volatile("lidt %0" : : "m"(idtr));
        outb(0x20, 0x11); outb(0x21, 32); outb(0x21, 4); outb(0x21, 1);
        outb(0xa0, 0x11); outb(0xa1, 40); outb(0xa1, 2); outb(0xa1, 1);
        uint16_t mask = (uint16_t)~(unmask | (unmask & 0xff00 ? 1u << 2 : 0));
        outb(0x21, (uint8_t)mask);
        outb(0xa1, (uint8_t)(mask >> 8));
}

/* Sleep in hlt until the device interrupts (after the kick that saw `seen`
 * interrupts), acknowledge it, and return the used chain's length; all ones
 * when the device reports that it needs a reset instead. */
static void wait_used_irq(uint32_t seen)
{
        __asm__ volatile("cli");
        while (irq_count == seen)
                __asm__ volatile("sti; hlt; cli");
        __asm__ volatile("sti");
}

static uint32_t wait_used(struct vdev *d, struct vqueue *q, uint32_t seen)
{
        wait_used_irq(seen);
        wr(d, R_INTERRUPT_ACK, rd(d, R_INTERRUPT_STATUS));
        if (*(volatile uint16_t *)&q->used.idx == q->last_used)
                return rd(d, R_STATUS) & S_NEEDS_RESET ? 0xffffffff : 0xfffffffe;
        uint32_t len = q->used.ring[q->last_used % QN].len;
        q->last_used++;
        return len;
}

/* Devices --------------------------------------------------------------------- */

static int find_device(struct vdev *d, uint32_t id)
{
        for (int s = 0; s < MMIO_SLOTS; s++) {
                volatile uint32_t *r = (volatile uint32_t *)(MMIO_BASE + (uint64_t)s * MMIO_WINDOW);
                if (r[R_MAGIC / 4] == 0x74726976 && r[R_VERSION / 4] == 2 && r[R_DEVICE_ID / 4] == id) {
                        d->regs = r;
                        d->irq = slot_irq[s];
                        return 0;
                }
        }
        return -1;
}

/* Reset, accept VERSION_1 plus the low feature bits asked for (never event
 * idx), FEATURES_OK. */
static int device_init_features(struct vdev *d, uint32_t low)
{
        wr(d, R_STATUS, 0);
        wr(d, R_STATUS, S_ACK | S_DRIVER);
        wr(d, R_DEVICE_FEATURES_SEL, 1);
        if (!(rd(d, R_DEVICE_FEATURES) & 1))
                return -1;
        wr(d, R_DEVICE_FEATURES_SEL, 0);
        if ((rd(d, R_DEVICE_FEATURES) & low) != low)
                return -1;
        wr(d, R_DRIVER_FEATURES_SEL, 0);
        wr(d, R_DRIVER_FEATURES, low);
        wr(d, R_DRIVER_FEATURES_SEL, 1);
        wr(d, R_DRIVER_FEATURES, 1);
        wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        return rd(d, R_STATUS) & S_FEATURES_OK ? 0 : -1;
}

static int device_init(struct vdev *d)
{
        return device_init_features(d, 0);
}

static void queue_init(struct vdev *d, int index, struct vqueue *q)
{
        wr(d, R_QUEUE_SEL, (uint32_t)index);
        wr(d, R_QUEUE_NUM, QN);
        wr(d, R_QUEUE_DESC, (uint32_t)(uint64_t)q->desc);
        wr(d, R_QUEUE_DESC + 4, 0);
        wr(d, R_QUEUE_DRIVER, (uint32_t)(uint64_t)&q->avail);
        wr(d, R_QUEUE_DRIVER + 4, 0);
        wr(d, R_QUEUE_DEVICE, (uint32_t)(uint64_t)&q->used);
        wr(d, R_QUEUE_DEVICE + 4, 0);
        wr(d, R_QUEUE_READY, 1);
}

static void device_ready(struct vdev *d)
{
        wr(d, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

static void set_desc(struct vqueue *q, int i, const void *addr, uint32_t len, uint16_t flags, uint16_t next)
{
        q->desc[i] = (struct vdesc){ (uint64_t)addr, len, flags, next };
}

/* Offer the chain starting at head and kick the device; returns the interrupt
 * count before the kick, for wait_used. */
static uint32_t submit(struct vdev *d, int index, struct vqueue *q, uint16_t head)
{
        uint32_t seen = irq_count;
        q->avail.ring[q->avail.idx % QN] = head;
        __asm__ volatile("" ::: "memory");
        q->avail.idx++;
        __asm__ volatile("mfence" ::: "memory");
        wr(d, R_QUEUE_NOTIFY, (uint32_t)index);
        return seen;
}

/* Output --------------------------------------------------------------------- */

static void put_hex(const uint8_t *p, int n)
{
        static const char digits[] = "0123456789abcdef";
        for (int i = 0; i < n; i++) {
                outb(SERIAL, (uint8_t)digits[p[i] >> 4]);
                outb(SERIAL, (uint8_t)digits[p[i] & 15]);
        }
}

static void put_u32(uint32_t v)
{
        uint8_t b[4] = { (uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v };
        put_hex(b, 4);
}

/* The kernel command line, from the zero page the launcher passes in %rsi. */
static const char *cmdline(uint64_t zero_page)
{
        return (const char *)(uint64_t)*(const uint32_t *)(zero_page + 0x228);
}

static int starts_with(const char *s, const char *prefix)
{
        while (*prefix)
                if (*s++ != *prefix++)
                        return 0;
        return 1;
}

#endif
