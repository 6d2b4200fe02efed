/*
 * guestkit boot code: PVH entry, long mode, drop to CPL3.
 *
 * Under PVM (software virtualization) every instruction executed at CPL0 is
 * emulated one at a time (~4 us each), so everything that can be computed by
 * the assembler or linker is static data here: page tables, GDT, TSS, IDT and
 * the iretq frames that enter CPL3.  The CPL0 path from the PVH entry to the
 * first CPL3 instruction is 18 instructions long and has no loops.
 *
 * Everything CPL0 touches lives in the one section .boot, which the linker
 * script places at exactly BOOT_BASE.  That lets the assembler compute the
 * absolute address of any .boot symbol (BOOT_BASE + (sym - boot_base)) and
 * split it into the bit fields of IDT gates and the TSS descriptor, which no
 * ELF relocation can express.
 */

#define BOOT_BASE       0x100000
#define KADDR(sym)      (BOOT_BASE + ((sym) - boot_base))

#define SEL_KCODE       0x08    /* 64-bit code, DPL0 */
#define SEL_KDATA       0x10    /* data, DPL0 */
#define SEL_UDATA       0x1b    /* data, DPL3 (0x18 | RPL3) */
#define SEL_UCODE       0x23    /* 64-bit code, DPL3 (0x20 | RPL3) */
#define SEL_TSS         0x28

#define USER_RFLAGS     0x3002  /* IOPL=3, IF=0, reserved bit 1 */

#define GATE_PARK               0
#define GATE_TRIPLE_FAULT       1
#define GATE_IRQ_ENABLE         2
#define GATE_IRQ_DISABLE        3

#define RFLAGS_IF       0x200

#define IRQ_INTX_SLOT   16      /* guest.h: gk_irq_count index of the INTx vector 0x50 */

/*
 * The xAPIC EOI register (0xfee000b0) as a sign-extended 32-bit absolute
 * address: 0xfffffffffee000b0.  pml4[511]/pdpt_hi[511] map the top 1 GiB of
 * the address space onto physical 3-4 GiB, so an interrupt handler can write
 * EOI in one instruction without a scratch register.
 */
#define APIC_EOI_ALIAS  (0xfee000b0 - 0x100000000)

#define PTE_P   0x001
#define PTE_RW  0x002
#define PTE_US  0x004
#define PTE_PS  0x080

/* interrupt gate: 16 bytes, handler must be in .boot */
.macro IDT_GATE handler, attr
        .word   KADDR(\handler) & 0xffff
        .word   SEL_KCODE
        .byte   0                       /* IST */
        .byte   \attr
        .word   (KADDR(\handler) >> 16) & 0xffff
        .long   0                       /* offset 63:32 (image is below 4 GiB) */
        .long   0
.endm

/* CPL0 exception stub: push a dummy error code where the CPU pushes none */
.macro EXC_STUB n
exc_\n:
        .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        .else
        pushq   $0
        .endif
        pushq   $\n
        jmp     exc_common
.endm

        .section .boot, "awx", @progbits

        .globl  boot_base
boot_base:

/* ------------------------------------------------------------------ */
/* PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info */
        .code32
        .globl  _start32
_start32:
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0x20, %eax             /* CR4.PAE */
        movl    %eax, %cr4
        movl    $0xc0000080, %ecx       /* IA32_EFER */
        movl    $0x100, %eax            /* EFER.LME */
        xorl    %edx, %edx
        wrmsr
        movl    $0x80010033, %eax       /* PG | WP | NE | ET | MP | PE */
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $SEL_KCODE, $start64

        .code64
start64:
        movl    $SEL_TSS, %eax
        ltr     %ax
        lidt    idt_ptr(%rip)
        movl    %ebx, %edi              /* arg 0: hvm_start_info (zero-extended) */
        movl    $boot_iret_frame, %esp
        iretq                           /* -> user_entry at CPL3, IOPL=3, IF=0 */

/* ------------------------------------------------------------------ */
/*
 * The gate: `int $0x80` from CPL3 (IDT vector 0x80 is an interrupt gate with
 * DPL3; under PVM the same instruction arrives through #UD, see exc_6).
 * Function in %eax, all other registers are preserved:
 *   0 (GATE_PARK)          cli; hlt forever (vCPU sleeps in the host kernel)
 *   1 (GATE_TRIPLE_FAULT)  load an IDT with limit 0, iretq to a CPL3 ud2:
 *                          #UD -> #GP -> #DF -> triple fault (shutdown)
 *   2 (GATE_IRQ_ENABLE)    return to CPL3 with RFLAGS.IF = 1
 *   3 (GATE_IRQ_DISABLE)   return to CPL3 with RFLAGS.IF = 0
 * Anything else returns %eax = -1.  (sti/cli/popf cannot change IF at CPL3
 * without IOPL=3, which PVM does not keep, so IF is set in the iret frame.)
 */
        .balign 16
gate_entry:
        cmpl    $GATE_IRQ_ENABLE, %eax
        je      gate_irq_enable
        cmpl    $GATE_IRQ_DISABLE, %eax
        je      gate_irq_disable
        cmpl    $GATE_TRIPLE_FAULT, %eax
        je      gate_triple_fault
        testl   %eax, %eax
        jne     gate_unknown
gate_park:
        cli
        hlt
        jmp     gate_park
gate_triple_fault:
        lidt    idt_null_ptr(%rip)
        movl    $triple_iret_frame, %esp
        iretq
gate_unknown:
        movl    $-1, %eax
        iretq
gate_irq_enable:                        /* frame: rip, cs, rflags, rsp, ss */
        orl     $RFLAGS_IF, 16(%rsp)
        iretq
gate_irq_disable:
        andl    $~RFLAGS_IF, 16(%rsp)
        iretq

/* ------------------------------------------------------------------ */
/*
 * External interrupts, vectors 0x40-0x4f (MSI-X of virtio queues): count
 * the interrupt in gk_irq_count[vector - 0x40], EOI the xAPIC, return.
 * Three CPL0 instructions each.  Vector 0xff is the APIC spurious vector,
 * which takes no EOI.
 */
        .balign 16
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
irq_\n:
        incq    gk_irq_count + 8 * \n(%rip)
        movl    $0, APIC_EOI_ALIAS
        iretq
        .endr
irq_spurious:
        iretq

/*
 * Vector 0x50: legacy INTx through the IOAPIC, level-triggered.  An EOI
 * while the line is still asserted makes the IOAPIC deliver again at once,
 * so the handler first reads the device's ISR byte (reading clears it and
 * deasserts the line), then counts and EOIs.  The ISR address is in
 * gk_intx_isr, set by CPL3 before the pin is unmasked; %rax is swapped in
 * and out of that variable, which saves the push and pop of a scratch
 * register (only this handler touches the variable once it is set, and it
 * runs with IF=0 on the one CPU the pin is routed to).  Six instructions.
 */
irq_intx:
        xchgq   %rax, gk_intx_isr(%rip)         /* %rax = ISR address */
        cmpb    $0, (%rax)                      /* read ISR: clears it, deasserts INTx */
        xchgq   %rax, gk_intx_isr(%rip)         /* restore %rax and the variable */
        incq    gk_irq_count + 8 * IRQ_INTX_SLOT(%rip)
        movl    $0, APIC_EOI_ALIAS
        iretq

/* ------------------------------------------------------------------ */
/*
 * Exceptions 0-31: report them from CPL3.  The CPL0 part only collects the
 * registers and iretqs to user_exc_entry on the exception stack, which calls
 * guest_exception(vector, error, rip, cr2, cs, rsp).  A second exception
 * after that (the reporter itself faulted) ends in a triple fault.
 */
        .balign 16
        .irp n, 0,1,2,3,4,5,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC_STUB \n
        .endr

/*
 * #UD.  Under PVM, `int n` at CPL3 is not delivered through the IDT: it
 * raises #UD at the int instruction (KVM's emulator has no protected-mode
 * software interrupts).  So a #UD on the bytes `cd 80` is the gate call
 * too: skip the instruction, as the CPU would have, and enter the gate.
 */
exc_6:
        pushq   %rcx
        movq    8(%rsp), %rcx           /* faulting RIP */
        cmpw    $0x80cd, (%rcx)         /* int $0x80 */
        popq    %rcx
        jne     exc_6_real
        addq    $2, (%rsp)
        jmp     gate_entry
exc_6_real:
        pushq   $0
        pushq   $6
        jmp     exc_common

exc_common:                             /* vector, error, rip, cs, rflags, rsp, ss */
        incl    exc_depth(%rip)
        cmpl    $1, exc_depth(%rip)
        ja      gate_triple_fault
        popq    %rdi                    /* vector */
        popq    %rsi                    /* error code */
        popq    %rdx                    /* rip */
        movq    %cr2, %rcx
        popq    %r8                     /* cs */
        popq    %r9                     /* rflags (dropped) */
        popq    %r9                     /* rsp */
        movl    $exc_iret_frame, %esp
        iretq

/* ------------------------------------------------------------------ */
/* CPL3 code (all pages are user pages, so it may live here too) */

user_entry:                             /* %rdi = hvm_start_info */
        movq    %rdi, %r12
        movl    $__bss_start, %edi      /* clear .bss at native speed */
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        xorl    %eax, %eax
        rep stosb
        movq    %r12, %rdi
        call    guest_main
        movl    %eax, %edi
        call    gk_exit
        ud2

user_exc_entry:
        call    guest_exception
        ud2

triple_fault_ud2:                       /* reached with the limit-0 IDT loaded */
        ud2
        jmp     triple_fault_ud2

/* ------------------------------------------------------------------ */
/* Static data */

        .balign 16
gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data */
        .quad   0x00cff2000000ffff      /* 0x18 user data */
        .quad   0x00affa000000ffff      /* 0x20 user code, 64-bit */
        .word   tss_end - tss - 1       /* 0x28 64-bit TSS (16 bytes); limit < 64 KiB */
        .word   KADDR(tss) & 0xffff
        .byte   (KADDR(tss) >> 16) & 0xff
        .byte   0x89                    /* present, available 64-bit TSS */
        .byte   0
        .byte   (KADDR(tss) >> 24) & 0xff
        .long   0
        .long   0
gdt_end:

        .balign 8
        .word   0, 0, 0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .word   0, 0, 0
idt_ptr:
        .word   idt_end - idt - 1
        .quad   idt
        .word   0, 0, 0
idt_null_ptr:                           /* limit 0: every vector is out of range */
        .word   0
        .quad   0

        .balign 16
tss:
        .long   0
        .quad   cpl0_stack_top          /* RSP0 */
        .quad   0, 0                    /* RSP1, RSP2 */
        .quad   0
        .quad   0, 0, 0, 0, 0, 0, 0     /* IST1-7 */
        .quad   0
        .word   0
        .word   tss_iomap - tss         /* I/O permission bitmap offset */
        /*
         * All ports allowed.  IOPL=3 already allows CPL3 port I/O on real
         * hardware, but PVM does not keep IOPL for CPL3 (RFLAGS reads back
         * with IOPL=0 there) and checks this bitmap instead.
         */
tss_iomap:
        .fill   8192, 1, 0
        .byte   0xff                    /* required terminator */
tss_end:

exc_depth:
        .long   0

        /* interrupts seen per vector 0x40 + n (n = 16: INTx); read by CPL3 (guest.h) */
        .balign 8
        .globl  gk_irq_count
gk_irq_count:
        .fill   IRQ_INTX_SLOT + 1, 8, 0

        /* address of the ISR byte irq_intx reads; written by CPL3 (guest.h) */
        .globl  gk_intx_isr
gk_intx_isr:
        .quad   0

        /*
         * iretq frames (RIP, CS, RFLAGS, RSP, SS).  CPL0 code points RSP at
         * one and executes iretq.  The padding keeps a push below a frame
         * from landing on other data.
         */
        .balign 16
        .fill   64, 1, 0
boot_iret_frame:
        .quad   user_entry, SEL_UCODE, USER_RFLAGS, user_stack_top, SEL_UDATA
        .fill   64, 1, 0
exc_iret_frame:
        .quad   user_exc_entry, SEL_UCODE, USER_RFLAGS, exc_stack_top, SEL_UDATA
        .fill   64, 1, 0
triple_iret_frame:
        .quad   triple_fault_ud2, SEL_UCODE, USER_RFLAGS, exc_stack_top, SEL_UDATA

        .balign 16
idt:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        IDT_GATE exc_\n, 0x8e           /* present, DPL0, 64-bit interrupt gate */
        .endr
        .fill   (0x40 - 32) * 16, 1, 0
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        IDT_GATE irq_\n, 0x8e           /* 0x40-0x4f: device interrupts */
        .endr
        IDT_GATE irq_intx, 0x8e         /* 0x50: INTx through the IOAPIC */
        .fill   (0x80 - 0x51) * 16, 1, 0
        IDT_GATE gate_entry, 0xee       /* vector 0x80: present, DPL3 */
        .fill   (0xff - 0x81) * 16, 1, 0
        IDT_GATE irq_spurious, 0x8e     /* 0xff: APIC spurious vector */
idt_end:

        /*
         * Identity map of 0-4 GiB with 2 MiB pages, all Present|RW|User,
         * and the same 3-4 GiB again at 0xffffffffc0000000 (APIC_EOI_ALIAS)
         */
        .balign 4096
pml4:
        .quad   pdpt + (PTE_P | PTE_RW | PTE_US)
        .fill   510, 8, 0
        .quad   pdpt_hi + (PTE_P | PTE_RW | PTE_US)
pdpt_hi:                                /* 0xffffffffc0000000 -> phys 3-4 GiB */
        .fill   511, 8, 0
        .quad   pd + 0x3000 + (PTE_P | PTE_RW | PTE_US)
pdpt:
        .quad   pd + 0x0000 + (PTE_P | PTE_RW | PTE_US)
        .quad   pd + 0x1000 + (PTE_P | PTE_RW | PTE_US)
        .quad   pd + 0x2000 + (PTE_P | PTE_RW | PTE_US)
        .quad   pd + 0x3000 + (PTE_P | PTE_RW | PTE_US)
        .fill   508, 8, 0
pd:
        .set    page, 0
        .rept   2048
        .quad   page + (PTE_P | PTE_RW | PTE_US | PTE_PS)
        .set    page, page + 0x200000
        .endr

/* ------------------------------------------------------------------ */
/* PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18) */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz, including the NUL */
        .long   4                       /* descsz */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .long   _start32
        .balign 4

/* ------------------------------------------------------------------ */
/* Stacks: not loaded, not cleared */
        .section .stack, "aw", @nobits
        .balign 4096
        .globl  cpl0_stack_top, exc_stack_top, user_stack_top
cpl0_stack:
        .skip   4096
cpl0_stack_top:
exc_stack:
        .skip   16384
exc_stack_top:
user_stack:
        .skip   65536
user_stack_top:

        .section .note.GNU-stack, "", @progbits
