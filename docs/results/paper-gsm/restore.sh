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
# Every committed evaluation: summaries/<method>/<split>.json, .samples.jsonl.gz and, where kept, -config.yaml.
# The trained methods' adapters are not committed, so compare trains them again before it would
# sample more (training is deterministic here: a retrained NLL matched its first run's loss at every step).
for summary in "$HERE"/summaries/*/*.json; do
  method=$(basename "$(dirname "$summary")")
  split=$(basename "$summary" .json)
  case "$split" in far|near|train|val) ;; *) continue ;; esac
  unpack "$HERE/summaries/$method/$split.samples.jsonl.gz" "$RUN/$method/eval/$split/samples.jsonl"
  cp "$summary" "$RUN/$method/eval/$split/summary.json"
  if [ -f "$HERE/summaries/$method/$split-config.yaml" ]; then
    cp "$HERE/summaries/$method/$split-config.yaml" "$RUN/$method/eval/$split/config.yaml"
  fi
done
# The synthetic sets (data/mixed, data/direct): their records with stats and config, so that
# compare trains on the trajectories it sampled instead of sampling them again.
for set in "$HERE"/data/*/; do
  mode=$(basename "$set")
  for f in "$set"*.jsonl.gz; do
    unpack "$f" "$RUN/data/$mode/$(basename "${f%.gz}")"
  done
  cp "$set/stats.json" "$set/config.yaml" "$RUN/data/$mode/"
done
cp "$HERE/timings.json" "$RUN/timings.json"
echo "restored $RUN from $HERE"
