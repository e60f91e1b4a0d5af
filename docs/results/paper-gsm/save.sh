#!/usr/bin/env bash
# The inverse of restore.sh: copy every finished stage of runs/paper-gsm into this folder
# (evaluations with their samples compressed, training logs, timings), never weights.
# Safe to run at any time, also while compare runs: an evaluation is copied only once its
# summary.json exists, and one already here is copied again only if its summary changed.
# Prints the files it wrote, one per line.
#   save.sh [RUN [DEST]]   RUN defaults to runs/paper-gsm and DEST to this folder. A recipe arm
#   run in its own folder (runs/paper-gsm-armB) saves into its own DEST (armB/) only what is its
#   own: its evaluations and training, not the base evaluations or synthetic sets it copied from
#   the main run, which are here already.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=docs/results/paper-gsm
RUN=${1:-runs/paper-gsm}
DEST=${2:-$HERE}
[ -d "$RUN" ] || { echo "save.sh: no run folder $RUN" >&2; exit 1; }
pack() {  # pack FROM TO.gz, through a temporary file so that TO.gz is never half written
  gzip -n -c "$1" > "$2.tmp"
  mv "$2.tmp" "$2"
}
for summary in "$RUN"/*/eval/*/summary.json; do
  [ -f "$summary" ] || continue
  dir=$(dirname "$summary")
  split=$(basename "$dir")
  method=$(basename "$(dirname "$(dirname "$dir")")")
  case "$method" in select|ceiling) continue ;; esac   # their own folders, saved by hand
  if [ "$DEST" != "$HERE" ] && cmp -s "$summary" "$HERE/summaries/$method/$split.json"; then continue; fi
  dest="$DEST/summaries/$method"
  if cmp -s "$summary" "$dest/$split.json"; then continue; fi
  mkdir -p "$dest"
  pack "$dir/samples.jsonl" "$dest/$split.samples.jsonl.gz"
  [ -f "$dir/config.yaml" ] && cp "$dir/config.yaml" "$dest/$split-config.yaml"
  cp "$summary" "$dest/$split.json"
  echo "$dest/$split.json"
done
# Training logs of every trained method, in summaries/<method>/training/ (the adapter itself stays
# in the run folder; the evaluation of the train split has the names train.json, train-config.yaml).
for info in "$RUN"/*/train/train_info.json; do
  [ -f "$info" ] || continue
  dir=$(dirname "$info")
  method=$(basename "$(dirname "$dir")")
  dest="$DEST/summaries/$method/training"
  if cmp -s "$info" "$dest/train_info.json"; then continue; fi
  mkdir -p "$dest"
  for f in config.yaml metrics.jsonl train_info.json; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$dest/$f"
  done
  echo "$dest/train_info.json"
done
# The synthetic sets, once their synthesis has finished (stats.json is written last). A set is
# sampled once, so one already here is kept: a resumed synthesis that had nothing left to decode
# rewrites its stats.json with this run's (zero) decoding time.
for stats in "$RUN"/data/*/stats.json; do
  [ -f "$stats" ] && [ "$DEST" = "$HERE" ] || continue
  set=$(dirname "$stats")
  dest="$HERE/data/$(basename "$set")"
  [ -f "$dest/stats.json" ] && continue
  mkdir -p "$dest"
  for f in "$set"/*.jsonl; do
    pack "$f" "$dest/$(basename "$f").gz"
  done
  for f in config.yaml student_fraction.png; do
    [ -f "$set/$f" ] && cp "$set/$f" "$dest/$f"
  done
  cp "$stats" "$dest/stats.json"
  echo "$dest/stats.json"
done
if [ -f "$RUN/timings.json" ] && ! cmp -s "$RUN/timings.json" "$DEST/timings.json"; then
  mkdir -p "$DEST"
  cp "$RUN/timings.json" "$DEST/timings.json"
  echo "$DEST/timings.json"
fi
