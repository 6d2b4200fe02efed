// kvm-hold: keeps one idle KVM VM open for the life of the nested KVM host (tests/kvm-host), so
// that VMs coming and going do not make the nested kernel rewrite its own code.
//
//   kvm-hold      (runs until killed; started in the background by native/linux/kvm-host-init)
//
// Why: KVM flips static keys (jump labels) when the first VM or vCPU appears and when the last
// one goes: preempt_notifier_key, which patches a branch in __schedule, and the LAPIC keys
// apic_hw_disabled and apic_sw_disabled. The kernel patches such a site live, with int3
// breakpoints and cross-CPU synchronisation (text_poke_bp). Under QEMU 7.2's multi-threaded TCG
// the nested host's vCPUs then kept trapping on int3 at the patched site in __schedule long after
// the patch was done, and the nested host froze (both vCPUs busy in exc_int3, nothing on the
// console). A VM that never goes away keeps those counts above zero: each site is patched once,
// when this program starts, and never again while the tests create and destroy their VMs.
//
// The VM has an in-kernel irqchip and one vCPU (with its LAPIC, which stays disabled) and never
// runs. Built static by native/linux/build.sh (the initramfs has no libc).
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int fail(const char *what)
{
    fprintf(stderr, "kvm-hold: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return fail("KVM_CREATE_VM");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        return fail("KVM_CREATE_IRQCHIP");
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0)
        return fail("KVM_CREATE_VCPU");
    printf("kvm-hold: holding an idle VM with one vCPU\n");
    fflush(stdout);
    for (;;)
        pause();
}
