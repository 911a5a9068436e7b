#!/bin/bash
# Validation runs of docs/simulator.md: calibrate each deployment, then run every validation load 3 times (same seed: the same stream),
# each on a fresh server with a step log, to separate model error from run-to-run noise.
# CALIBRATE=0 skips the calibration and keeps the profiles in docs/profiles (to compare simulators on new runs).
cd "$(dirname "$0")/../.."
OUT=${1:-bench_results/serve-val3}
rm -rf $OUT; mkdir -p $OUT
wait_up() { for i in $(seq 300); do curl -sf http://127.0.0.1:$1/health >/dev/null && return 0; sleep 0.5; done; return 1; }
one() {  # label rep dir seed serve-extra -- bench args...
  local label=$1 rep=$2 dir=$3 seed=$4 extra=$5; shift 5
  local run=$OUT/$dir/$label-s$seed-rep$rep; mkdir -p $run
  kvflow serve --port 8300 --no-access-log --step-log $run/steps $extra > $run/server.log 2>&1 &
  local pid=$!
  wait_up 8300 || { echo "no server $run"; kill -TERM $pid; wait $pid; return; }
  kvflow bench serve --base-url http://127.0.0.1:8300 --model tiny --tokenizer kvflow/assets/tiny \
    --label $label --seed $seed --result-dir $run --disable-tqdm --no-plots "$@" > $run/bench.log 2>&1
  kill -TERM $pid; wait $pid
}
loads() {  # label rep extra
  for R in 1 2 3; do one $1 $2 prompt-1024-32 $((R + 300)) "$3" --dataset random --random-input-len 1024 --random-output-len 32 --num-prompts 60 --request-rate $R --goodput ttft:1000 tpot:50; done
  for R in 4 8; do one $1 $2 decode-64-256 $((R + 400)) "$3" --dataset random --random-input-len 64 --random-output-len 256 --num-prompts 80 --request-rate $R --goodput ttft:500 tpot:50; done
  one $1 $2 mix-256-64 516 "$3" --dataset random --random-input-len 256 --random-output-len 64 --num-prompts 100 --request-rate 16 --goodput ttft:500 tpot:50
  for R in 2 4; do one $1 $2 trace-code $((R + 100)) "$3" --dataset trace --trace-file ../shared/traces/azure_llm_2023_code.csv --num-prompts 60 --max-input-len 1536 --max-output-len 128 --request-rate $R --goodput ttft:2000 tpot:50; done
}
DIS="--disagg --prefill 1 --decode 1 --pin-cores"
if [ "${CALIBRATE:-1}" != 0 ]; then
  kvflow profile --serve --out $OUT/colocated-profile.json --quiet > $OUT/colocated-profile.txt 2>&1
  kvflow profile --serve --serve-args "$DIS" --out $OUT/1p1d-profile.json --quiet > $OUT/1p1d-profile.txt 2>&1
fi
for rep in 1 2 3; do
  loads colocated $rep ""
  loads 1p1d-layerwise $rep "$DIS"
done
echo DONE
