#!/bin/bash
# Runs every test project and prints one closing line: "tests: N passed, N failed, N skipped".
# Test projects find build/ (guest kit, launchers) by walking up to Kvm.sln.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

dotnet test Kvm.sln -c "${CONFIG:-Release}" --nologo --logger "console;verbosity=normal" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# Each project ends with a line like "Passed!  - Failed: 0, Passed: 12, Skipped: 1, Total: 13, ...".
read -r passed failed skipped < <(awk '
  /(Passed|Failed)! +- +Failed: +[0-9]+, Passed: +[0-9]+, Skipped: +[0-9]+/ {
    for (i = 1; i <= NF; i++) {
      if ($i == "Failed:") f += $(i+1) + 0
      if ($i == "Passed:") p += $(i+1) + 0
      if ($i == "Skipped:") s += $(i+1) + 0
    }
  }
  END { printf "%d %d %d\n", p, f, s }' "$log")

echo
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "dotnet test exited with status $status (a build or runner failure)"
fi
if [ "$passed" -eq 0 ] && [ "$status" -eq 0 ]; then
  echo "no test ran"
  exit 1
fi
exit "$status"
