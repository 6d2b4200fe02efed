# kvm: build and test entry points. Everything lands in build/.
#   make            native shim, guest kit, and the three programs (build/bin/vmctl, kvm-vmm, kvmd)
#   make run        builds, then boots the guest kit in a VM with its console here (inside a nested
#                   KVM host under QEMU where this machine has no /dev/kvm)
#   make test       builds, then runs every test (unit and integration; the KVM ones in the nested
#                   KVM host where this machine has no /dev/kvm)
#   make bench      builds, then runs the benchmarks (they print ratios against QEMU and qemu-img)
#   make deb        builds the programs, then the Debian package build/kvm_VERSION_amd64.deb

BUILD    := $(CURDIR)/build
DOTNET   ?= dotnet
CC       ?= gcc
CONFIG   ?= Release

SHIM     := $(BUILD)/native/libkvmshim.so
GUEST    := $(BUILD)/guest/guestkit.elf
LIBDIR   := $(BUILD)/lib
PROGRAMS := vmctl kvm-vmm kvmd
LAUNCHERS := $(addprefix $(BUILD)/bin/,$(PROGRAMS))
PUBLISHED := $(BUILD)/lib/.published

CS_SOURCES := $(shell find src -name '*.cs' -o -name '*.csproj' 2>/dev/null) Directory.Build.props Directory.Packages.props VERSION
# The programs set PublishAot: each is published as one native executable (no .NET runtime needed).
PUBLISH_FLAGS := -c $(CONFIG) -r linux-x64 -o $(LIBDIR) --nologo -v quiet

RUN_CMDLINE ?= hello

.PHONY: all native guest programs run test unit-test integration-test bench clean linux deb
all: native guest programs

native: $(SHIM)
guest: $(GUEST)
programs: $(LAUNCHERS)
	@# A build/bin left from before the symlinks (shell-script launchers) is replaced too: a shell
	@# and its readlink and dirname cost a third of a short VM's run in the nested host.
	@for p in $(PROGRAMS); do [ -L $(BUILD)/bin/$$p ] || ln -sfn ../lib/$$p $(BUILD)/bin/$$p; done

$(SHIM): native/kvmshim/kvmshim.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -g -Wall -Wextra -Werror -std=gnu11 -fPIC -shared -fvisibility=hidden -D_FORTIFY_SOURCE=2 -Wl,-z,relro,-z,now -o $@ $<

$(GUEST): $(wildcard native/guest/*.c native/guest/*.h native/guest/*.S native/guest/*.ld native/guest/Makefile)
	$(MAKE) -C native/guest O=$(BUILD)/guest

$(PUBLISHED): $(CS_SOURCES) $(SHIM)
	@rm -rf $(LIBDIR) && mkdir -p $(LIBDIR)
	$(DOTNET) publish src/Kvm.Cli/Kvm.Cli.csproj $(PUBLISH_FLAGS)
	$(DOTNET) publish src/Kvm.VmmHost/Kvm.VmmHost.csproj $(PUBLISH_FLAGS)
	$(DOTNET) publish src/Kvm.Daemon/Kvm.Daemon.csproj $(PUBLISH_FLAGS)
	cp $(SHIM) $(LIBDIR)/
	@rm -f $(LIBDIR)/*.pdb
	@touch $@

# Launchers: relative symlinks, so build/bin can move with build/lib and starting a program costs
# no shell. A NativeAOT program resolves its own path (/proc/self/exe), so it finds libkvmshim.so
# beside it in build/lib. Order-only: the link follows build/lib/NAME and needs no remaking.
$(BUILD)/bin/%: | $(PUBLISHED)
	@mkdir -p $(dir $@)
	@ln -sfn ../lib/$* $@

# Debian's cloud kernel (bzImage and vmlinux) and a busybox initramfs, in build/linux (needs apt).
linux: $(BUILD)/linux/vmlinux
$(BUILD)/linux/vmlinux: native/linux/build.sh native/linux/init native/linux/kvm-exit.c native/linux/kvm-rr.c native/linux/kvm-hold.c native/linux/kvm-host-init
	CC='$(CC)' bash native/linux/build.sh $(BUILD)/linux

# Where /dev/kvm is missing or unusable, the VM runs inside the nested KVM host (tests/kvm-host),
# which boots Debian's cloud kernel from `make linux` under QEMU's TCG.
# A /dev/kvm served by kvm-pvm (a PVM guest kernel) counts as missing: Linux guests fail there.
KVM_USABLE = [ -c /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && { : <>/dev/kvm; } 2>/dev/null
RUN_VM = $(BUILD)/bin/vmctl run --kernel $(GUEST) --cmdline '$(RUN_CMDLINE)' --debug-exit

run: all
	@if $(KVM_USABLE); then \
		$(RUN_VM); \
	else \
		echo "no /dev/kvm here: running inside an emulated KVM host"; \
		$(MAKE) --no-print-directory linux >/dev/null && tests/kvm-host/kvm-host --quiet $(RUN_VM); \
	fi

# The Linux-boot tests need build/linux, and so does the nested KVM host.
test: all linux
	@bash tests/run-tests.sh

# The VM benchmarks (boot, blk, linux, kvmd, snapshot, net) run where /dev/kvm works, or else all inside one nested KVM
# host; each says where it measured. The disk benchmark needs no KVM and runs here. The *_ARGS
# reach the benchmarks through the environment (tests/Kvm.Benchmarks/vm-benchmarks.sh).
BENCH_DLL = tests/Kvm.Benchmarks/bin/Release/net10.0/Kvm.Benchmarks.dll
export BENCH_ARGS BLK_BENCH_ARGS LINUX_BENCH_ARGS KVMD_BENCH_ARGS SNAPSHOT_BENCH_ARGS CHECKPOINT_BENCH_ARGS NET_BENCH_ARGS DOTNET

bench: all linux
	$(DOTNET) build -c Release tests/Kvm.Benchmarks/Kvm.Benchmarks.csproj --nologo -v quiet
	@status=0; \
	if $(KVM_USABLE); then \
		tests/Kvm.Benchmarks/vm-benchmarks.sh $(BENCH_DLL) || status=1; \
	else \
		echo "no /dev/kvm here: running the VM benchmarks inside a nested KVM host (QEMU TCG; tests/kvm-host/kvm-host)"; \
		tests/kvm-host/kvm-host --quiet tests/Kvm.Benchmarks/vm-benchmarks.sh $(BENCH_DLL) || status=1; \
	fi; \
	$(DOTNET) $(BENCH_DLL) disk $(DISK_BENCH_ARGS) || status=1; \
	exit $$status

# The Debian package (packaging/build-deb.sh: the programs, kvmd.service, the kvm group): the version
# is the file VERSION, like the programs'. Needs dpkg-dev and help2man (.ci/run installs them).
deb: programs
	@bash packaging/build-deb.sh $(LIBDIR) $(BUILD)

clean:
	rm -rf $(BUILD)
	$(DOTNET) clean Kvm.sln --nologo -v quiet || true
