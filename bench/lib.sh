# Shell helpers shared by the benchmark scripts (sourced, not run).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; exit 1
}

# proc_ticks FIELDS PID...: the ticks in /proc/PID/stat's FIELDS (after the command
# name: 12 user, 13 system; "12 13" both) of one or more processes, summed.
proc_ticks() {
  local fields=$1 pid files=()
  shift
  for pid in "$@"; do files+=("/proc/$pid/stat"); done
  awk -v fields="$fields" 'BEGIN { n = split(fields, want, " ") }
    { s = $0; sub(/.*\) /, "", s); split(s, f, " "); for (i = 1; i <= n; i++) t += f[want[i]] }
    END { print t }' "${files[@]}"
}
# CPU ticks (user + system) of one or more processes, summed.
cpu_ticks() { proc_ticks "12 13" "$@"; }
# System (kernel) ticks alone.
sys_ticks() { proc_ticks 13 "$@"; }

# us_per_request BEFORE AFTER REQUESTS: CPU microseconds per request between two
# cpu_ticks readings.
us_per_request() {
  awk -v b="$1" -v a="$2" -v r="$3" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (a - b) / hz * 1e6 / (r > 0 ? r : 1) }'
}

# build_release: the release binaries the benchmarks run. The proxy on its own, last:
# built in one `cargo build` with `tandem` (which links kube), it would get the features
# kube-client switches on in shared crates (tracing's `log`: ~5% more instructions per
# HTTP/2 request), which the shipped proxy (deploy/Dockerfile) has not.
# BENCH_NO_BUILD=1: the release binaries as they are (built beforehand, for a run on a
# machine that must stay quiet).
build_release() {
  [ -z "${BENCH_NO_BUILD:-}" ] || return 0
  cargo build --release -p tandem >&2
  cargo build --release -p tandem-proxy >&2
}

# Ticks of one CPU from /proc/stat: "busy total" (busy: user, nice, system, irq,
# softirq, steal; total adds idle and iowait).
core_ticks() { awk -v c="cpu$1" '$1 == c { b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6 }' /proc/stat; }

# busy_pct "BEFORE" "AFTER": the busy share, in percent, between two core_ticks readings.
busy_pct() { awk -v b="$1" -v a="$2" 'BEGIN { split(b, x, " "); split(a, y, " "); t = y[2] - x[2]; printf "%.0f", (t > 0 ? (y[1] - x[1]) * 100 / t : 0) }'; }

# A /proc/PID/status value in KiB: VmRSS (now) or VmHWM (peak).
rss_kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }

CLK_TCK=$(getconf CLK_TCK)

# bench_workdir NAME: a scratch directory in $WORK, and a trap that stops every PID
# appended to PIDS and removes the directory when the script exits.
bench_workdir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -z "${CPU_CAP_DIR:-}" ] || rmdir "$CPU_CAP_DIR" 2>/dev/null || true
  rm -rf "$WORK"
}

# A CPU cap: one cgroup whose CFS quota gives its processes a fraction of one core, so
# a proxy can be measured where it, not the load on the other core, sets the rate.
# cgroup v2 (cpu.max) where the cpu controller is there, else v1 (cpu.cfs_quota_us).
CPU_CAP_ROOT=""
CPU_CAP_DIR=""

# cpu_cap_init PERCENT: creates the cap (PERCENT% of one core, in 10 ms periods); it is
# removed when the script exits.
cpu_cap_init() {
  if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    CPU_CAP_ROOT=/sys/fs/cgroup
    grep -qw cpu "$CPU_CAP_ROOT/cgroup.subtree_control" || echo +cpu > "$CPU_CAP_ROOT/cgroup.subtree_control"
  elif [ -w /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    CPU_CAP_ROOT=/sys/fs/cgroup/cpu
  else
    echo "capped loads need the cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us), writable (root); leave the -capped loads out of MODES" >&2
    exit 1
  fi
  CPU_CAP_DIR="$CPU_CAP_ROOT/tandem-bench-cap.$$"
  mkdir -p "$CPU_CAP_DIR"
  local quota=$(($1 * 100))
  if [ -e "$CPU_CAP_DIR/cpu.max" ]; then
    echo "$quota 10000" > "$CPU_CAP_DIR/cpu.max"
  else
    echo 10000 > "$CPU_CAP_DIR/cpu.cfs_period_us"; echo "$quota" > "$CPU_CAP_DIR/cpu.cfs_quota_us"
  fi
}

# cpu_cap PID / cpu_uncap PID: moves a process (every thread of it) under the cap, or
# back to the top cgroup.
cpu_cap() { echo "$1" > "$CPU_CAP_DIR/cgroup.procs"; }
cpu_uncap() { echo "$1" > "$CPU_CAP_ROOT/cgroup.procs"; }
