#!/bin/bash
# Runs every test project and prints one closing line: "tests: N passed, N failed, N skipped".
# Test projects find build/ (guest kit, launchers) by walking up to Kvm.sln.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

dotnet test Kvm.sln -c "${CONFIG:-Release}" --nologo --logger "console;verbosity=normal" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# Each test run ends with a summary block: "Total tests: N", "Passed: N", "Failed: N", "Skipped: N"
# (Failed and Skipped only when non-zero). Sum them over all projects.
read -r passed failed skipped < <(awk '
  /^ +Passed: +[0-9]+ *$/  { p += $2 }
  /^ +Failed: +[0-9]+ *$/  { f += $2 }
  /^ +Skipped: +[0-9]+ *$/ { s += $2 }
  END { printf "%d %d %d\n", p, f, s }' "$log")

# Repeat each failure (name, message, first stack lines) at the end, where a truncated CI log
# still shows it.
if [ "$failed" -gt 0 ]; then
  echo
  echo "failed tests:"
  awk '/^ +Failed [A-Za-z_]/ { n = 25 } n > 0 { print; n-- }' "$log"
fi

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
