/* exit-code STATUS: end a Linux guest of hostel's launcher with STATUS as its exit
 * status. The launcher turns a byte written to the debug-exit port (0x501) into
 * the guest's exit status, as QEMU's isa-debug-exit does; a guest kernel has no
 * other way to hand a number to the host. Built static, for an initramfs. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/io.h>

#define DEBUG_EXIT_PORT 0x501

int main(int argc, char **argv)
{
	char *end;
	long status;

	if (argc != 2) {
		fprintf(stderr, "usage: exit-code STATUS (0-255)\n");
		return 2;
	}
	status = strtol(argv[1], &end, 10);
	if (*end != '\0' || status < 0 || status > 255) {
		fprintf(stderr, "exit-code: %s is not a status from 0 to 255\n", argv[1]);
		return 2;
	}
	if (ioperm(DEBUG_EXIT_PORT, 1, 1) != 0) {
		perror("exit-code: ioperm on port 0x501");
		return 1;
	}
	outb((unsigned char)status, DEBUG_EXIT_PORT);
	fprintf(stderr, "exit-code: the launcher did not end the guest\n");
	return 1;
}
