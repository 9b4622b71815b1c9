/* What every freestanding test guest needs: port I/O, the serial port, and
 * the launcher's debug-exit port (the guest's exit status). No libc. */
#ifndef GUEST_H
#define GUEST_H

#include <stdint.h>

#define SERIAL 0x3f8
#define DEBUG_EXIT 0x501

static inline void outb(uint16_t port, uint8_t v)
{
        __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
        uint8_t v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}

static inline void puts_serial(const char *s)
{
        while (*s)
                outb(SERIAL, (uint8_t)*s++);
}

static inline __attribute__((noreturn)) void poweroff(uint8_t code)
{
        outb(DEBUG_EXIT, code);
        for (;;)
                __asm__ volatile("cli; hlt");
}

/* The entry point: fn gets the zero page's address (%rsi at entry, as Linux's
 * 64-bit boot protocol passes it) and its result becomes the exit status. */
#define GUEST_MAIN(fn) \
        void __attribute__((section(".text.start"), noreturn)) _start(void) \
        { \
                uint64_t zero_page; \
                __asm__ volatile("" : "=S"(zero_page)); \
                poweroff(fn(zero_page)); \
        }

#endif
