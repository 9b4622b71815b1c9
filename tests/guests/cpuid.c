/* Reports CPUID leaf 1's ECX on the 16550 ("cpuid1.ecx=XXXXXXXX") and powers
 * off with status 0: what the launcher's KVM_SET_CPUID2 told this vCPU. */
#include "guest.h"

static void put_hex32(uint32_t v)
{
        char text[9];
        for (int i = 7; i >= 0; i--) {
                text[i] = "0123456789abcdef"[v & 0xf];
                v >>= 4;
        }
        text[8] = '\0';
        puts_serial(text);
}

static int report_cpuid(uint64_t zero_page)
{
        (void)zero_page;
        uint32_t eax = 1, ebx, ecx = 0, edx;
        __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
        puts_serial("cpuid1.ecx=");
        put_hex32(ecx);
        puts_serial("\n");
        return 0;
}

GUEST_MAIN(report_cpuid)
