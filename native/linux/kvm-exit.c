// kvm-exit: ends the VM with a status, from Linux userspace, through the debug-exit port.
//
//   kvm-exit STATUS      (STATUS 0 to 255)
//
// Writes STATUS to I/O port 0xf4, where `vmctl run --debug-exit` (VmSpec.DebugExit) and QEMU's
// isa-debug-exit (iobase=0xf4) have a port whose write ends the VM: vmctl then exits with STATUS
// itself, QEMU with STATUS * 2 + 1. The port is opened to this process with ioperm(2), which
// needs CAP_SYS_RAWIO (init runs as root); /dev/port is no option, Debian's cloud kernel is built
// without CONFIG_DEVPORT.
//
// When nothing at 0xf4 ends the VM (no debug-exit device), the write is dropped and kvm-exit
// returns 1 after saying so, so the caller can end the VM another way. Status 2: bad usage, or
// ioperm refused.
//
// native/linux/build.sh builds it static (gcc -static -Os) into the test guest's initramfs as
// /bin/kvm-exit; native/linux/init calls it to end a test run with its verdict.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <unistd.h>

#define DEBUG_EXIT_PORT 0xf4

int main(int argc, char **argv)
{
    char *end;
    unsigned long status;

    if (argc != 2 || argv[1][0] == '\0') {
        fprintf(stderr, "usage: kvm-exit STATUS   (0 to 255; ends the VM through the debug-exit port 0x%x)\n",
                DEBUG_EXIT_PORT);
        return 2;
    }
    errno = 0;
    status = strtoul(argv[1], &end, 10);
    if (errno != 0 || *end != '\0' || status > 255 || argv[1][0] == '-') {
        fprintf(stderr, "kvm-exit: status must be a number from 0 to 255, not '%s'\n", argv[1]);
        return 2;
    }
    if (ioperm(DEBUG_EXIT_PORT, 1, 1) != 0) {
        fprintf(stderr, "kvm-exit: ioperm(0x%x): %s (needs root: CAP_SYS_RAWIO)\n", DEBUG_EXIT_PORT, strerror(errno));
        return 2;
    }
    // Whatever was printed before must reach the console before the VM ends.
    fflush(NULL);
    outb((unsigned char)status, DEBUG_EXIT_PORT);

    // Still running: the VMM may take a moment to stop this vCPU, so wait before concluding that
    // no device took the write.
    sleep(2);
    fprintf(stderr, "kvm-exit: writing %lu to port 0x%x did not end the VM (no debug-exit device there)\n",
            status, DEBUG_EXIT_PORT);
    return 1;
}
