#!/usr/bin/env bash
# collm against CoMLRL 1.3.6 on the same workload, mode by mode, one after the other in one
# command (2 cores: never two at once), so both sides see the same machine:
#   bash bench/vs_comlrl.sh [OUT_DIR]        # MODES="cc:1 dc:1 magrpo:1 cc:2" by default
# Needs the reference harness beside the repo (../shared/bench/reference, set up with its
# setup.sh) and a release build of collm. Writes OUT_DIR/{collm,comlrl}.jsonl and prints a table
# with the per-prompt times, update times, peak RSS and the ratios, and this machine's GEMM peak.
# The ceiling is the speed-up collm would have at its floor (bench train: the update's arithmetic
# at the best GEMM, generation at its arithmetic or weight reads, whichever takes longer).
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-../shared/bench/reference}
OUT=${1:-target/vs-comlrl/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
PY=${REF_PYTHON:-/tmp/refbench/venv/bin/python}
[ -x "$PY" ] || { echo "bench/vs_comlrl.sh: $PY not found: run bash $REF/setup.sh first (or set REF_PYTHON)" >&2; exit 1; }
COLLM=target/release/collm
[ -x "$COLLM" ] || cargo build --release -p collm-cli
"$COLLM" bench peak --json > "$OUT/peak.json"
for spec in ${MODES:-cc:1 dc:1 magrpo:1 cc:2}; do
  algo=${spec%%:*}; turns=${spec##*:}
  case $algo in cc) ref=maac ;; dc) ref=iac ;; *) ref=$algo ;; esac
  echo "[vs_comlrl] collm $algo, $turns turn(s)" >&2
  "$COLLM" bench train --workload ../shared/bench/tldr_like.json --algo "$algo" --turns "$turns" --json | tail -1 >> "$OUT/collm.jsonl"
  echo "[vs_comlrl] CoMLRL $ref, $turns turn(s)" >&2
  "$PY" "$REF/comlrl_bench.py" --algo "$ref" --turns "$turns" --out "$OUT/comlrl.jsonl" > /dev/null 2> "$OUT/comlrl-$ref-t$turns.stderr"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
peak = json.load(open(f"{out}/peak.json"))
collm = [json.loads(l) for l in open(f"{out}/collm.jsonl")]
ref = [d for d in map(json.loads, open(f"{out}/comlrl.jsonl")) if d.get("event") == "summary"]
print(f"CPU: {peak['cpu']}, {peak['threads']} threads; best GEMM {peak['best_gemm_gflops']:.1f} GFLOPS")
print("| mode | collm s/prompt | CoMLRL s/prompt | speed-up | ceiling (collm's floor s/prompt) | collm generation s | CoMLRL generation s | collm update s (by step) | CoMLRL update s | update at % of GEMM peak (after step 1) | step 1's new memory GiB | collm peak RSS MB | CoMLRL peak RSS MB | RSS ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for c, r in zip(collm, ref):
    mode = f"{c['algo']} {c['turns']} turn(s)"
    steps = ", ".join(f"{s['s']:.1f}" for s in c.get("update_steps", []))
    floor = c.get("floor_s_per_prompt", float("nan"))
    print(f"| {mode} | {c['s_per_prompt']:.2f} | {r['s_per_prompt']:.2f} | {r['s_per_prompt'] / c['s_per_prompt']:.2}x | "
          f"{r['s_per_prompt'] / floor:.2}x ({floor:.2}) | "
          f"{c['gen_s']:.1f} | {r['gen_s']:.1f} | {c['update_s']:.1f} ({steps}) | {r['update_s']:.1f} | "
          f"{100 * c['update_gflops'] / peak['best_gemm_gflops']:.0f}% ({100 * (c.get('update_peak_fraction_after_first_step') or float('nan')):.0f}%) | "
          f"{c.get('update_steps', [{}])[0].get('new_memory_mb', float('nan')) / 1024:.1f} | "
          f"{c['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {c['peak_rss_mb'] / r['peak_rss_mb']:.2f} |")
PY
