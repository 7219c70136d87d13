#!/bin/bash
# The CPU serving figures of benchmarks/RESULTS_CPU.md ("Serving"): llmc serve + llmc bench-serve
# on the trained tiny Llama (tools/train_tiny_llama.py).
#   benchmarks/serve_cpu.sh ART256 ART1280 OUTDIR [which...]
# ART256:  llmc compile <trained folder> -o ART256 --seq-len 256
# ART1280: llmc compile <trained folder> -o ART1280 --seq-len 1280 --max-step-tokens 512
# which: mlfq chunk prefix overload overload2 (default: the first four). The server runs with one kernel thread
# (LLMC_NUM_THREADS=1): on a 2-core host the client needs the other core.
set -euo pipefail
A256=$1; A1K=$2; OUT=$3; shift 3
WHICH=${*:-mlfq chunk prefix overload}
PY=${PY:-python}
PORT=${PORT:-8123}
mkdir -p "$OUT"

serve() {  # serve ART FLAGS...: start a server, wait for /health
  local art=$1; shift
  LLMC_NUM_THREADS=1 $PY -m llmc serve "$art" --port $PORT --log-level warning "$@" > "$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 150); do curl -sf http://127.0.0.1:$PORT/health > /dev/null && return 0; sleep 0.2; done
  cat "$OUT/server.log"; exit 1
}
stop() { kill -TERM $SERVER; wait $SERVER || true; }
bench() { $PY -m llmc bench-serve --base-url http://127.0.0.1:$PORT "$@"; }

for w in $WHICH; do
  case $w in
  mlfq)  # mean job completion time on a heavy-tailed output mix, 4 sequences per step, at
         # 25 req/s (below saturation), 40 req/s (above) and all 150 at once
    for rate in 25 40 40 inf; do
      for policy in fcfs mlfq; do
        serve "$A256" --policy $policy --max-num-seqs 4
        bench --dataset heavy-tail --num-prompts 150 --request-rate $rate --seed 1 \
          --json "$OUT/mlfq-$rate-$policy-$RANDOM.json"
        stop
      done
    done ;;
  chunk)  # p99 inter-token latency with chunked prefill (64-token chunks) and without
    for mode in chunked whole chunked whole; do
      if [ $mode = chunked ]; then flags="--max-num-batched-tokens 64"; else flags="--no-chunked-prefill"; fi
      serve "$A1K" $flags
      bench --dataset sharegpt --num-prompts 40 --request-rate 2 --seed 2 --json "$OUT/chunk-$mode-$RANDOM.json"
      stop
    done ;;
  prefix)  # TTFT of a second chat turn over a 1,000-token history, cold first turn vs warm second
    serve "$A1K"
    bench --dataset prefix --history-tokens 1000 --num-prompts 6 --seed 3 --json "$OUT/prefix-on.json"
    stop
    serve "$A1K" --no-prefix-cache
    bench --dataset prefix --history-tokens 1000 --num-prompts 6 --seed 3 --json "$OUT/prefix-off.json"
    stop ;;
  overload)  # 10x the saturating rate for 60 s against a bounded queue
    serve "$A256" --max-queue 16
    bench --dataset sharegpt --num-prompts 100 --seed 4 --json "$OUT/saturation.json"
    rate=$($PY -c "import json; print(10 * json.load(open('$OUT/saturation.json'))['request_throughput'])")
    n=$($PY -c "print(int($rate * 60))")
    bench --dataset sharegpt --num-prompts $n --request-rate $rate --seed 5 --json "$OUT/overload.json"
    curl -s http://127.0.0.1:$PORT/metrics | grep -E "kv_pages_used|requests_finished|rejected|resident" > "$OUT/overload-metrics.txt"
    stop ;;
  overload2)  # the same against a server of 2 sequences per step: a saturating rate low enough
              # that this host's one-core Python client can offer 10x of it
    serve "$A256" --max-queue 16 --max-num-seqs 2
    bench --dataset sharegpt --num-prompts 60 --seed 4 --json "$OUT/saturation2.json"
    rate=$($PY -c "import json; print(10 * json.load(open('$OUT/saturation2.json'))['request_throughput'])")
    n=$($PY -c "print(int($rate * 60))")
    (while kill -0 $SERVER 2>/dev/null; do curl -s http://127.0.0.1:$PORT/metrics | grep -E "resident_memory" || true; sleep 0.5; done) > "$OUT/overload2-rss.txt" &
    bench --dataset sharegpt --num-prompts $n --request-rate $rate --seed 5 --json "$OUT/overload2.json"
    curl -s http://127.0.0.1:$PORT/metrics | grep -E "kv_pages_used|requests_finished|rejected|resident" > "$OUT/overload2-metrics.txt"
    stop ;;
  esac
done
