#!/usr/bin/env bash
# Auto-fit against the GPU's real free memory (issue 12) and a cache that does not fit (issue 11), on the
# 18 GB benchmark model: a process holds GPU memory (torch) so that about FREE_GIB stay free, then
#   1. `run` with no placement flag: the plan auto-fit picks must run (exit 0, no out-of-memory);
#   2. the same with --cache-slots 10 % above the plan's: does it still fit? (how close the margin is);
#   3. --budget 100% (every expert cached): one line naming the flags, exit 2.
# Needs the CUDA build in /tmp/site (scripts/device_test.sh) and the model in /tmp/spac-bench-full.
set -uo pipefail
FREE_GIB=${FREE_GIB:-12}
M=/tmp/spac-bench-full
export PYTHONPATH=/tmp/site:$PWD
rm -f /tmp/blocker.ready
python3 - "$FREE_GIB" <<'PY' &
import sys, time, torch
free, total = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * 2**30)
x = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
print(f"blocker: holds {x.numel() / 2**30:.1f} GiB, {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB free", flush=True)
open("/tmp/blocker.ready", "w").close()
time.sleep(300)
PY
BLOCKER=$!
for _ in $(seq 60); do [ -f /tmp/blocker.ready ] && break; sleep 1; done
RUN="python3 -m spac_gguf.cli run $M/bench-target.gguf --draft $M/bench-draft.gguf -n 24 -p 'The sea'"
echo "== 1. auto-fit"; eval "$RUN" 2>&1 | grep -vE "^\s*$" | tail -8; echo "exit ${PIPESTATUS[0]}"
OUT1=$(eval "$RUN -n 1" 2>&1)   # the cache that ran: sized after loading, else the plan's
SLOTS=$(echo "$OUT1" | sed -n 's/.*free after loading: \([0-9]*\) slots per layer.*/\1/p' | head -1)
[ -n "$SLOTS" ] || SLOTS=$(echo "$OUT1" | sed -n 's/.*= \([0-9]*\) of [0-9]* per layer.*/\1/p' | head -1)
if [ -n "$SLOTS" ]; then
  MORE=$(( SLOTS + (SLOTS + 9) / 10 ))
  echo "== 2. --cache-slots $MORE (auto-fit chose $SLOTS)"; eval "$RUN --cache-slots $MORE" 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}"
fi
echo "== 3. --budget 100%"; eval "$RUN --budget 100%" 2>&1 | tail -3; echo "exit ${PIPESTATUS[0]}"
kill $BLOCKER 2>/dev/null; wait 2>/dev/null
