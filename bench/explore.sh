#!/usr/bin/env bash
# The schedule explorer of issue 18 as a bench: 1,000 seeded schedules (default) of three
# daemons, gc in a loop and a nemesis (stops, kills, S3 delays and dropped answers), half on
# file://, half on moto S3; prints schedules run and violations found, and the seed of every
# failing schedule (replay one: NARQ_EXPLORE_SEED=<seed> NARQ_EXPLORE_SCHEDULES=1).
#
#   bench/explore.sh [SCHEDULES] [-- other cargo test arguments]
#
# Environment as tests/it/explore.rs describes (NARQ_EXPLORE_SEED, _BACKEND, _SCALE,
# _BEYOND_BOUND, _VERBOSE); the bound on the whole run is 6 s a schedule unless
# NARQ_EXPLORE_MAX_SECS says otherwise. The log goes to target/explore-<date>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
[ $# -gt 0 ] && shift
mkdir -p target
log=target/explore-$(date +%Y%m%d-%H%M%S).log
echo "explore: $n schedules, log in $log" >&2
NARQ_EXPLORE_SCHEDULES=$n NARQ_EXPLORE_MAX_SECS=${NARQ_EXPLORE_MAX_SECS:-$((n * 6))} \
    nice cargo test --test it explore::schedules_never_break_a_closure "$@" -- --nocapture 2>&1 | tee "$log" \
    | grep -E '^(explorer|schedule seed|  violation|  did not settle|test result)' || true
grep -q '^test result: ok' "$log"
