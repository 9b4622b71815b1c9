/* PCI configuration mechanism 1 as a machine without PCI devices answers it:
 * a 32-bit write to CONFIG_ADDRESS (0xCF8) reads back (reserved bits 0), byte
 * writes in 0xCF8-0xCFB leave it alone, CONFIG_DATA (0xCFC-0xCFF) reads all
 * ones. The exit status has one bit per expectation that failed (0: all held). */
#include "guest.h"

#define CONFIG_ADDRESS 0xcf8
#define CONFIG_DATA 0xcfc

static inline void outl(uint16_t port, uint32_t v)
{
        __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint32_t inl(uint16_t port)
{
        uint32_t v;
        __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}

static inline uint16_t inw(uint16_t port)
{
        uint16_t v;
        __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}

static int probe(uint64_t zero_page)
{
        (void)zero_page;
        int failed = 0;
        outl(CONFIG_ADDRESS, 0x80000000u);      /* what Linux's pci_check_type1 writes */
        if (inl(CONFIG_ADDRESS) != 0x80000000u)
                failed |= 1;
        outl(CONFIG_ADDRESS, 0x80001803u);      /* bits 1:0 are reserved */
        if (inl(CONFIG_ADDRESS) != 0x80001800u)
                failed |= 2;
        outl(CONFIG_ADDRESS, 0xff000000u);      /* so are bits 30:24 */
        if (inl(CONFIG_ADDRESS) != 0x80000000u)
                failed |= 4;
        if (inl(CONFIG_DATA) != 0xffffffffu || inw(CONFIG_DATA + 2) != 0xffff ||
            inb(CONFIG_DATA + 1) != 0xff)
                failed |= 8;                    /* no device 00:00.0 */
        outb(CONFIG_ADDRESS + 3, 0x01);         /* a byte write is not CONFIG_ADDRESS */
        if (inl(CONFIG_ADDRESS) != 0x80000000u)
                failed |= 16;
        outl(CONFIG_ADDRESS, 0);                /* Linux puts back what it found */
        if (inl(CONFIG_ADDRESS) != 0)
                failed |= 32;
        return failed;
}

GUEST_MAIN(probe)
