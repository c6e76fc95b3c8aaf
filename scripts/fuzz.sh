#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets: what a guest, an image or a
# socket client controls) with libFuzzer through cargo-fuzz, each until
# it has made RUNS executions (default 1000000) or spent SECONDS (default
# 600), from seeds of valid inputs (fuzz/src/bin/make-seeds.rs). Prints a
# table: target, executions, seconds, peak memory, result. Not run by CI.
# A crash, a hang (10 s per input) or more than 2 GiB of memory fails the
# target, and libFuzzer leaves the input under fuzz/artifacts/<target>/.
#
# usage: scripts/fuzz.sh [--runs N] [--seconds S] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

runs=1000000
seconds=600
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
# cargo-fuzz needs nightly's -Z flags: the nightly toolchain where it is
# installed, else the stable one told to accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
# Every target (fuzz/fuzz_targets/*.rs), the seed maker aside.
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')

# Seeds: valid inputs of each kind.
(cd fuzz && cargo run --quiet --release --bin make-seeds -- corpus)

printf '| target | executions | seconds | peak RSS (MiB) | result |\n|---|---|---|---|---|\n' > fuzz/last-run.md
status=0
for t in "${targets[@]}"; do
  log=$(mktemp)
  set +e
  (cd fuzz && "${fuzz[@]}" run --release "$t" "corpus/$t" -- \
      -runs="$runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -max_len=65536 -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  if [ "$rc" -eq 0 ]; then result="no crash, no hang"; else result="FAILED (exit $rc): see fuzz/artifacts/$t"; status=1; tail -30 "$log"; fi
  printf '| %s | %s | %s | %s | %s |\n' "$t" "${execs:-?}" "${secs:-$seconds}" "${rss:-?}" "$result" | tee -a fuzz/last-run.md
  rm -f "$log"
done
cat fuzz/last-run.md
exit "$status"
