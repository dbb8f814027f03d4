#!/usr/bin/env bash
# One device call (< 10 minutes): the CUDA build (scripts/device_test.sh; TESTS=1 also runs the GPU
# tests, as in device_matrix.sh), then spac's per-pass CPU/GPU split at fixed shares, plain decoding (spac_ar) and K = 5
# (spac), replayed random and qwen3-calibrated routing, with llama_ar_cpu in the first run as the anchor
# and again at the end while time is left (ANCHOR_END=0: not).
# FIT=1 also runs scripts/device_fit.sh. A share written `S:NAME` runs with the environment variable
# NAME=1, `S:NAME=VALUE` with that value (an A/B switch); `S+dN` adds --spac-direct N (passes of <= N
# rows read their misses from pinned host memory on the GPU); both: `S+dN:NAME=VALUE`; several
# variables: `S:A=1,B=0` (tag S-A-B0); `S@tN` runs with N CPU threads (-t N; before any `:`).
#   SHARES="0.7 1 auto auto+d1" OUT=... bash scripts/device_split.sh        -> $OUT/split-<share>.json
# ROUTINGS (default random,qwen3-calibrated) and SYSTEMS (default spac_ar,spac) narrow the runs;
# BENCH_ARGS adds bench_gpu.py flags to every run (e.g. "--pass-slots 0").
# Carry: .whl, .dev/llama-src.tar.xz, .dev/vocab (see scripts/device_test.sh).
set -uo pipefail
set -f   # entries are words, never globs
OUT=${OUT:-/tmp/split}
SHARES=${SHARES:-0.7 0.5 0.35}
mkdir -p "$OUT"
T0=$(date +%s)
source scripts/device_setup.sh          # the CUDA build, the bench pair in $M
[ "${FIT:-0}" = 1 ] && { bash scripts/device_fit.sh 2>&1 | tee "$OUT/fit.txt"; }
B="python3 scripts/bench_gpu.py --target $M/bench-target.gguf --draft $M/bench-draft.gguf --routing ${ROUTINGS:-random,qwen3-calibrated} --budgets 0.17 --acceptances 0.7 --repeats 2 --no-bw --no-anchor-end ${BENCH_ARGS:-}"
first=1
for entry in $SHARES; do
  sh=${entry%%:*}; mode=${entry#*:}; [ "$mode" = "$entry" ] && mode=""
  thr=""; case $sh in *@t*) thr=${sh#*@t}; sh=${sh%%@t*};; esac     # S@tN: -t N (the CPU threads)
  case $thr in *[!0-9]*) echo "entry $entry: write S@tN with N a number"; continue;; esac
  direct=0; case $sh in *+d*) direct=${sh#*+d}; sh=${sh%%+d*};; esac
  case $direct in ''|*[!0-9]*) echo "entry $entry: write S+dN with N a number (S+dN:ENV=VALUE)"; continue;; esac
  mode=$(for kv in ${mode//,/ }; do case $kv in *=*) echo -n "$kv ";; *) echo -n "$kv=1 ";; esac; done)   # S:A=1,B or S:A
  LEFT=$(( ${BUDGET_S:-570} - ($(date +%s) - T0) ))
  [ "$LEFT" -gt 60 ] || { echo "no time left for share $entry"; break; }
  tag=$sh$(for kv in $mode; do v=${kv#*=}; echo -n "-${kv%%=*}$([ "$v" != 1 ] && echo "$v")"; done)$([ "$direct" != 0 ] && echo "-d$direct")$([ -n "$thr" ] && echo "-t$thr")
  base=$tag; r=2; while [ -e "$OUT/split-$tag.json" ]; do tag=$base-r$r; r=$((r + 1)); done   # an entry again (an A/B interleaved)
  timeout $(( LEFT - 10 )) env $mode $B --out "$OUT/split-$tag.json" --spac-direct $direct ${thr:+-t $thr} \
      --systems ${SYSTEMS:-spac_ar,spac}$([ $first = 1 ] && echo ,llama_ar_cpu) --spac-share $sh --time-limit $(( LEFT - 40 )) 2>&1 \
      | grep -E "tps=" | sed "s/^/[$tag] /" || echo "bench share $entry exit $?"
  first=0
done
# the anchor again at the end (the CPU baseline drifts within a call): ratios against both ends
LEFT=$(( ${BUDGET_S:-570} - ($(date +%s) - T0) ))
if [ "${ANCHOR_END:-1}" = 1 ] && [ "$LEFT" -gt 60 ]; then
  timeout $(( LEFT - 10 )) $B --out "$OUT/split-anchor-end.json" --systems llama_ar_cpu --time-limit $(( LEFT - 40 )) 2>&1 \
      | grep -E "tps=" | sed "s/^/[anchor-end] /" || echo "bench anchor-end exit $?"
fi
echo "done in $(( $(date +%s) - T0 )) s"
