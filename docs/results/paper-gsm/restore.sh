#!/usr/bin/env bash
# Put this folder's committed stages back into runs/paper-gsm, so that
#   dail compare --config configs/paper-gsm.yaml ...
# resumes from them on a fresh checkout instead of sampling them again (run folders are not
# committed; what is here is every stage's output but weights). Refuses to overwrite a run folder.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=docs/results/paper-gsm
RUN=${1:-runs/paper-gsm}
if [ -e "$RUN" ]; then
  echo "restore.sh: $RUN exists; move it away first (nothing was changed)" >&2
  exit 1
fi
unpack() {  # unpack FROM.gz TO
  mkdir -p "$(dirname "$2")"
  gzip -dc "$1" > "$2"
}
unpack "$HERE/select/samples.jsonl.gz" "$RUN/select/eval/samples.jsonl"
cp "$HERE/select/summary.json" "$RUN/select/eval/summary.json"
cp "$HERE/select/eval-config.yaml" "$RUN/select/eval/config.yaml"
# select/experts.jsonl is not restored: compare writes it again from the samples (dail select).
unpack "$HERE/ceiling/samples.jsonl.gz" "$RUN/ceiling/eval/train/samples.jsonl"
cp "$HERE/ceiling/summary.json" "$RUN/ceiling/eval/train/summary.json"
unpack "$HERE/summaries/base/val.samples.jsonl.gz" "$RUN/base/eval/val/samples.jsonl"
cp "$HERE/summaries/base/val.json" "$RUN/base/eval/val/summary.json"
if [ -d "$HERE/data/mixed" ]; then
  for f in "$HERE"/data/mixed/*.jsonl.gz; do
    unpack "$f" "$RUN/data/mixed/$(basename "${f%.gz}")"
  done
  cp "$HERE/data/mixed/stats.json" "$HERE/data/mixed/config.yaml" "$RUN/data/mixed/"
fi
cp "$HERE/timings.json" "$RUN/timings.json"
echo "restored $RUN from $HERE"
