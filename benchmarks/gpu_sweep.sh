#!/usr/bin/env bash
# One device call, many benchmarks: each runs under its own time limit, its log and the files it
# writes to $OUT land in one archive ($OUT/sweep.tar.gz), and the last lines of every log are
# printed at the end (the reply carries the end of the output).
#   bash benchmarks/gpu_sweep.sh "name:seconds:command" ...
set -u
source benchmarks/device_env.sh
final="${OUT:-/tmp/sweep_out}"
mkdir -p "$final/sweep"
for spec in "$@"; do
  name="${spec%%:*}"; rest="${spec#*:}"; secs="${rest%%:*}"; cmd="${rest#*:}"
  echo "=== $name (limit ${secs}s): $cmd"
  start=$(date +%s)
  OUT="$final/sweep" timeout "$secs" bash -c "$cmd" > "$final/sweep/$name.log" 2>&1
  echo "=== $name: exit $? after $(( $(date +%s) - start ))s"
done
tar -czf "$final/sweep.tar.gz" -C "$final" sweep && rm -rf "$final/sweep.keep"
for f in "$final"/sweep/*.log; do
  echo "----- $(basename "$f")"; grep -v -i -E "warning|^\s*warnings\.warn" "$f" | tail -25
done
