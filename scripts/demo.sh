#!/usr/bin/env bash
# Install everything into .venv and run the main job on real SVHN: colour clusters, one tiny score model per
# cluster trained on the CPU, labelled synthetic shards, and pictures of them.
#
#   SVHN root: $AUGSVHN_SVHN_ROOT, by default ../shared/data/svhn beside the repository
#   outputs:   $AUGSVHN_DEMO_DIR, by default runs/demo
#   budget:    $AUGSVHN_DEMO_POOLED_MINUTES minutes of training of one model on all digits (default 15), then
#              $AUGSVHN_DEMO_MINUTES minutes of fine-tuning of each cluster's model from it (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

svhn_root=${AUGSVHN_SVHN_ROOT:-../shared/data/svhn}
workdir=${AUGSVHN_DEMO_DIR:-runs/demo}
pooled_minutes=${AUGSVHN_DEMO_POOLED_MINUTES:-15}
minutes=${AUGSVHN_DEMO_MINUTES:-3}
augsvhn=.venv/bin/augsvhn

$augsvhn cluster --svhn-root "$svhn_root" --workdir "$workdir"
# Digit shapes are learnt once from all digits; each cluster's model then learns its colours from that start.
$augsvhn train --workdir "$workdir" --cluster pooled --model-size tiny --max-minutes "$pooled_minutes"
$augsvhn train --workdir "$workdir" --cluster all --model-size tiny --init-from pooled --max-minutes "$minutes"
$augsvhn generate --workdir "$workdir" --per-cluster 200 --guidance 2 --out "$workdir/shards"
$augsvhn verify "$workdir/shards"
$augsvhn show "$workdir/shards" --out "$workdir/samples.png"

echo "clusters:        $workdir/clusters.png"
echo "loss curves:     $workdir/models/cluster-*/loss.png"
echo "synthetic shards: $workdir/shards (manifest.json, cluster-<k>/shard-<n>.h5)"
echo "sample grid:     $workdir/samples.png"
