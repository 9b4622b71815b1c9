/* A virtio driver test guest. The kernel command line picks the test:
 *   console  write a line on the virtio-console transmit queue
 *   echo     print what arrives on the virtio-console receive queue
 *   blk      read sector 0, write sector 1, get the id, flush (statuses on serial)
 *   rng      read 16 random bytes
 *   net      send one frame (ethertype 0x88b5) and print the first such frame received
 *   multiport  negotiate a multiport console, answer its control messages,
 *            print port 1's name and write a line on port 1
 *   evil     send a looping descriptor chain to virtio-blk, then show that
 *            rng still works and that blk works again after a reset
 * Results go to the serial port; the exit status is 0 when the test ran. */
#include "virtio.h"

#define ID_NET 1
#define ID_BLK 2
#define ID_CONSOLE 3
#define ID_RNG 4

static struct vqueue q0, q1;
static uint8_t buf[1024] __attribute__((aligned(16)));

struct blk_req { uint32_t type, reserved; uint64_t sector; };
static struct blk_req req;
static uint8_t status;

static int setup(struct vdev *d, uint32_t id, int queues)
{
        if (find_device(d, id) < 0 || device_init(d) < 0) {
                puts_serial("no device\n");
                return -1;
        }
        queue_init(d, 0, &q0);
        if (queues > 1)
                queue_init(d, 1, &q1);
        device_ready(d);
        interrupts_init((uint16_t)(1u << d->irq));
        return 0;
}

static int console_test(void)
{
        static const char line[] = "virtio console says hi\n";
        struct vdev d;
        if (setup(&d, ID_CONSOLE, 2) < 0)
                return 1;
        set_desc(&q1, 0, line, sizeof(line) - 1, 0, 0);
        wait_used(&d, &q1, submit(&d, 1, &q1, 0));
        puts_serial("console sent\n");
        return 0;
}

static int echo_test(void)
{
        struct vdev d;
        if (setup(&d, ID_CONSOLE, 2) < 0)
                return 1;
        set_desc(&q0, 0, buf, 64, D_WRITE, 0);
        uint32_t len = wait_used(&d, &q0, submit(&d, 0, &q0, 0));
        if (len > 63)
                return 1;
        buf[len] = 0;
        puts_serial("echo ");
        puts_serial((const char *)buf);
        return 0;
}

static uint32_t blk_do(struct vdev *d, uint32_t type, uint64_t sector, uint32_t len, int data_writable)
{
        req = (struct blk_req){ type, 0, sector };
        status = 0xff;
        set_desc(&q0, 0, &req, sizeof(req), D_NEXT, 1);
        if (len) {
                set_desc(&q0, 1, buf, len, (uint16_t)(D_NEXT | (data_writable ? D_WRITE : 0)), 2);
                set_desc(&q0, 2, &status, 1, D_WRITE, 0);
        } else {
                set_desc(&q0, 1, &status, 1, D_WRITE, 0);
        }
        return wait_used(d, &q0, submit(d, 0, &q0, 0));
}

static void report(const char *what, uint32_t used)
{
        puts_serial(what);
        puts_serial(" status ");
        put_hex(&status, 1);
        puts_serial(" used ");
        put_u32(used);
        puts_serial("\n");
}

static int blk_test(void)
{
        struct vdev d;
        if (setup(&d, ID_BLK, 1) < 0)
                return 1;
        puts_serial("capacity ");
        put_u32(d.regs[R_CONFIG / 4]);
        puts_serial("\n");
        uint32_t used = blk_do(&d, 0, 0, 512, 1);
        report("read", used);
        puts_serial("data ");
        put_hex(buf, 16);
        puts_serial("\n");
        static const char msg[] = "written by the guest";
        for (unsigned i = 0; i < 512; i++)
                buf[i] = i < sizeof(msg) ? (uint8_t)msg[i] : 0;
        report("write", blk_do(&d, 1, 1, 512, 0));
        report("flush", blk_do(&d, 4, 0, 0, 0));
        report("getid", blk_do(&d, 8, 0, 20, 1));
        puts_serial("id ");
        puts_serial((const char *)buf);
        puts_serial("\n");
        report("beyond", blk_do(&d, 0, 1u << 30, 512, 1));
        return 0;
}

static int rng_test(void)
{
        struct vdev d;
        if (setup(&d, ID_RNG, 1) < 0)
                return 1;
        set_desc(&q0, 0, buf, 16, D_WRITE, 0);
        uint32_t used = wait_used(&d, &q0, submit(&d, 0, &q0, 0));
        puts_serial("rng ");
        put_u32(used);
        puts_serial(" ");
        put_hex(buf, 16);
        puts_serial(" irqs ");
        put_u32(irq_count);
        puts_serial("\n");
        return 0;
}

static int evil_test(void)
{
        struct vdev blk, rng;
        static struct vqueue rq;
        if (setup(&blk, ID_BLK, 1) < 0)
                return 1;
        if (find_device(&rng, ID_RNG) < 0 || device_init(&rng) < 0)
                return 1;
        queue_init(&rng, 0, &rq);
        device_ready(&rng);
        interrupts_init((uint16_t)((1u << blk.irq) | (1u << rng.irq)));
        req = (struct blk_req){ 0, 0, 0 };
        set_desc(&q0, 0, &req, sizeof(req), D_NEXT, 1);
        set_desc(&q0, 1, buf, 512, D_NEXT | D_WRITE, 0);   /* back to 0: a loop */
        if (wait_used(&blk, &q0, submit(&blk, 0, &q0, 0)) == 0xffffffff)
                puts_serial("blk needs reset\n");
        set_desc(&rq, 0, buf, 8, D_WRITE, 0);
        puts_serial(wait_used(&rng, &rq, submit(&rng, 0, &rq, 0)) == 8 ? "rng still works\n" : "rng broken too\n");
        /* reset and start over: the device serves again */
        q0 = (struct vqueue){ 0 };
        if (setup(&blk, ID_BLK, 1) < 0)
                return 1;
        report("after reset read", blk_do(&blk, 0, 0, 512, 1));
        return 0;
}

#define NET_HDR 12
#define ETHERTYPE_TEST 0x88b5

static uint8_t rxbuf[QN][1536] __attribute__((aligned(16)));

static void post_rx(int i)
{
        set_desc(&q0, i, rxbuf[i], sizeof(rxbuf[i]), D_WRITE, 0);
        q0.avail.ring[q0.avail.idx % QN] = (uint16_t)i;
        __asm__ volatile("" ::: "memory");
        q0.avail.idx++;
}

static int net_test(void)
{
        static const char payload[] = "hello from the guest";
        struct vdev d;
        if (setup(&d, ID_NET, 2) < 0)
                return 1;
        for (int i = 0; i < QN; i++)
                post_rx(i);
        wr(&d, R_QUEUE_NOTIFY, 0);
        /* header, then broadcast destination, our MAC (config space), ethertype, payload */
        for (unsigned i = 0; i < sizeof(buf); i++)
                buf[i] = 0;
        for (int i = 0; i < 6; i++) {
                buf[NET_HDR + i] = 0xff;
                buf[NET_HDR + 6 + i] = ((volatile uint8_t *)d.regs)[R_CONFIG + i];
        }
        buf[NET_HDR + 12] = ETHERTYPE_TEST >> 8;
        buf[NET_HDR + 13] = ETHERTYPE_TEST & 0xff;
        for (unsigned i = 0; i < sizeof(payload); i++)
                buf[NET_HDR + 14 + i] = (uint8_t)payload[i];
        uint32_t len = NET_HDR + 14 + 46;   /* the minimum Ethernet payload */
        set_desc(&q1, 0, buf, len, 0, 0);
        wait_used(&d, &q1, submit(&d, 1, &q1, 0));
        puts_serial("net sent\n");
        for (int tries = 0; tries < 32; tries++) {
                uint32_t seen = irq_count;
                if (*(volatile uint16_t *)&q0.used.idx == q0.last_used)
                        wait_used_irq(seen);
                while (*(volatile uint16_t *)&q0.used.idx != q0.last_used) {
                        uint16_t id = (uint16_t)q0.used.ring[q0.last_used % QN].id;
                        uint32_t got = q0.used.ring[q0.last_used % QN].len;
                        q0.last_used++;
                        uint8_t *f = rxbuf[id % QN];
                        if (got > NET_HDR + 14 && f[NET_HDR + 12] == (ETHERTYPE_TEST >> 8)
                            && f[NET_HDR + 13] == (ETHERTYPE_TEST & 0xff)) {
                                puts_serial("net received ");
                                puts_serial((const char *)f + NET_HDR + 14);
                                puts_serial("\n");
                                return 0;
                        }
                        post_rx(id % QN);
                        wr(&d, R_QUEUE_NOTIFY, 0);
                }
        }
        puts_serial("net nothing received\n");
        return 1;
}

#define F_MULTIPORT 2
#define C_DEVICE_READY 0
#define C_DEVICE_ADD 1
#define C_PORT_READY 3
#define C_PORT_OPEN 6
#define C_PORT_NAME 7

struct ctrl { uint32_t id; uint16_t event, value; };
static struct vqueue crx, ctx, p1rx, p1tx;
static uint8_t cbuf[QN][64] __attribute__((aligned(16)));
static struct ctrl out_msg;

static void control_send(struct vdev *d, uint32_t id, uint16_t event, uint16_t value)
{
        out_msg = (struct ctrl){ id, event, value };
        set_desc(&ctx, 0, &out_msg, sizeof(out_msg), 0, 0);
        wait_used(d, &ctx, submit(d, 3, &ctx, 0));
}

static int multiport_test(void)
{
        static const char line[] = "hello on port 1\n";
        struct vdev d;
        if (find_device(&d, ID_CONSOLE) < 0 || device_init_features(&d, F_MULTIPORT) < 0) {
                puts_serial("no multiport console\n");
                return 1;
        }
        queue_init(&d, 0, &q0);
        queue_init(&d, 1, &q1);
        queue_init(&d, 2, &crx);
        queue_init(&d, 3, &ctx);
        queue_init(&d, 4, &p1rx);
        queue_init(&d, 5, &p1tx);
        device_ready(&d);
        interrupts_init((uint16_t)(1u << d.irq));
        for (int i = 0; i < QN; i++) {
                set_desc(&crx, i, cbuf[i], sizeof(cbuf[i]), D_WRITE, 0);
                crx.avail.ring[i] = (uint16_t)i;
        }
        crx.avail.idx = QN;
        wr(&d, R_QUEUE_NOTIFY, 2);
        control_send(&d, 0, C_DEVICE_READY, 1);
        int port1_open = 0;
        for (int tries = 0; tries < 64 && !port1_open; tries++) {
                uint32_t seen = irq_count;
                if (*(volatile uint16_t *)&crx.used.idx == crx.last_used)
                        wait_used_irq(seen);
                while (*(volatile uint16_t *)&crx.used.idx != crx.last_used) {
                        uint16_t id = (uint16_t)crx.used.ring[crx.last_used % QN].id;
                        uint32_t len = crx.used.ring[crx.last_used % QN].len;
                        crx.last_used++;
                        struct ctrl *m = (struct ctrl *)cbuf[id % QN];
                        if (m->event == C_DEVICE_ADD) {
                                control_send(&d, m->id, C_PORT_READY, 1);
                        } else if (m->event == C_PORT_NAME) {
                                cbuf[id % QN][len < 63 ? len : 63] = 0;
                                puts_serial("port name ");
                                puts_serial((const char *)cbuf[id % QN] + sizeof(struct ctrl));
                                puts_serial("\n");
                        } else if (m->event == C_PORT_OPEN && m->id == 1 && m->value == 1) {
                                port1_open = 1;
                        }
                        crx.avail.ring[crx.avail.idx % QN] = id;
                        crx.avail.idx++;
                }
        }
        if (!port1_open) {
                puts_serial("port 1 never opened\n");
                return 1;
        }
        control_send(&d, 1, C_PORT_OPEN, 1);
        set_desc(&p1tx, 0, line, sizeof(line) - 1, 0, 0);
        wait_used(&d, &p1tx, submit(&d, 5, &p1tx, 0));
        puts_serial("port 1 written\n");
        return 0;
}

static int run(uint64_t zero_page)
{
        const char *cmd = cmdline(zero_page);
        if (starts_with(cmd, "console"))
                return console_test();
        if (starts_with(cmd, "echo"))
                return echo_test();
        if (starts_with(cmd, "blk"))
                return blk_test();
        if (starts_with(cmd, "rng"))
                return rng_test();
        if (starts_with(cmd, "multiport"))
                return multiport_test();
        if (starts_with(cmd, "net"))
                return net_test();
        if (starts_with(cmd, "evil"))
                return evil_test();
        puts_serial("unknown test\n");
        return 2;
}

GUEST_MAIN(run)
