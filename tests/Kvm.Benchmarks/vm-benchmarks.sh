#!/bin/bash
# Runs the benchmarks that need KVM (boot, blk, linux, kvmd, snapshot, net) one after another, each to its end even when
# an earlier one failed, and exits 1 if any failed. `make bench` runs this directly where /dev/kvm
# works, and inside one nested KVM host (tests/kvm-host/kvm-host) where it does not.
#
#   tests/Kvm.Benchmarks/vm-benchmarks.sh BENCHMARKS_DLL
#
# Each benchmark's arguments come from the environment, as make passes them: BENCH_ARGS (boot),
# BLK_BENCH_ARGS (blk), LINUX_BENCH_ARGS (linux), KVMD_BENCH_ARGS (kvmd), SNAPSHOT_BENCH_ARGS (snapshot), CHECKPOINT_BENCH_ARGS (checkpoint),
# NET_BENCH_ARGS (net); shell quoting in them is honoured
# (LINUX_BENCH_ARGS="--marker 'Run /init'").
set -u
dll=${1:?usage: vm-benchmarks.sh BENCHMARKS_DLL}
dotnet=${DOTNET:-dotnet}
status=0
bench() {
    local name=$1 args=$2
    eval "set -- $args"
    "$dotnet" "$dll" "$name" "$@" || { echo "benchmark: $name failed (status $?)" >&2; status=1; }
}
bench boot "${BENCH_ARGS:-}"
bench blk "${BLK_BENCH_ARGS:-}"
bench linux "${LINUX_BENCH_ARGS:-}"
bench kvmd "${KVMD_BENCH_ARGS:-}"
bench snapshot "${SNAPSHOT_BENCH_ARGS:-}"
bench net "${NET_BENCH_ARGS:-}"
bench checkpoint "${CHECKPOINT_BENCH_ARGS:-}"
exit $status
