#!/bin/bash
# CRSLab's recommenders side by side on the imported ReDial and INSPIRED data, with the long-tail
# evaluator and best-epoch selection: writes benchmarks/results/baselines_{redial,inspired}.{md,csv}
# and their plots (*_recall_vs_tail_coverage.png, *_popularity_buckets.png).
#
# Usage: benchmarks/run_baselines.sh [redial|inspired ...]        (default: both, one after the other)
# Environment: LOTCRS_HOME (datasets, logs, results, the compare cache; default ~/.cache/lotcrs),
#   SHARED (default: ../shared next to the repository: data/redial, data/inspired, models/get-minilm.sh),
#   CRSLAB (the crslab command; default: crslab on PATH), RERUN=1 to run configs again instead of
#   reusing finished runs from the compare cache.
# Runs niced, one config at a time; about an hour per dataset on a 2-core CPU.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$repo/../shared}
crslab=${CRSLAB:-crslab}
python=$(dirname "$(command -v "$crslab")")/python
[[ -x $python ]] || python=python3
datasets=("$@")
[[ ${#datasets[@]} -gt 0 ]] || datasets=(redial inspired)
models=(popularity textcnn sasrec gru4rec bert kbrd kgsf redial tgredial)
cd "$repo"

# 1. pretrained encoders: all-MiniLM-L6-v2 (BERT architecture) and, for TG-ReDial's GPT-2 stage, a
#    tiny random GPT-2 with the real GPT-2 tokenizer (no pretrained GPT-2 is available offline).
PATH=$(dirname "$python"):$PATH "$shared/models/get-minilm.sh" >/dev/null
tiny_gpt2=$HOME/.cache/lotcrs/models/tiny-gpt2
if [[ ! -f $tiny_gpt2/config.json ]]; then
  "$python" - "$shared/models/gpt2-bpe" "$tiny_gpt2" <<'PY'
import sys
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
bpe, dest = sys.argv[1:]
tok = GPT2TokenizerFast(vocab=f"{bpe}/vocab.json", merges=f"{bpe}/merges.txt")
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=64, n_layer=2, n_head=2)).save_pretrained(dest)
tok.save_pretrained(dest)
PY
fi

# 2. the datasets (skipped when already imported under LOTCRS_HOME)
home=$("$python" -c "from lotcrs_plugin.paths import resolve_root; print(resolve_root())")
for d in "${datasets[@]}"; do
  case $d in
    redial)
      [[ -f $home/data/dataset/redial_partial/dataset.json ]] || \
      "$crslab" import-data --format redial --name redial_partial \
        --train "$shared/data/redial/train_partial.jsonl" \
        --movies "$shared/data/redial/movies_with_mentions.csv" \
        --attributes "$shared/data/redial/movie_attributes.json" ;;
    inspired)
      [[ -f $home/data/dataset/inspired_unicrs/dataset.json ]] || \
      "$crslab" import-data --format unicrs --name inspired_unicrs \
        --train "$shared/data/inspired/train_data_dbpedia.jsonl" \
        --valid "$shared/data/inspired/valid_data_dbpedia.jsonl" \
        --test "$shared/data/inspired/test_data_dbpedia.jsonl" ;;
    *) echo "unknown dataset '$d'; use redial or inspired" >&2; exit 2 ;;
  esac
done

# 3. the comparison, one dataset after the other
for d in "${datasets[@]}"; do
  case $d in
    redial) title="CRSLab recommenders on ReDial (redial_partial: 1,451/181/181 train/valid/test dialogs carved from train_partial.jsonl)"
            import="crslab import-data --format redial --name redial_partial --train \$SHARED/data/redial/train_partial.jsonl --movies \$SHARED/data/redial/movies_with_mentions.csv --attributes \$SHARED/data/redial/movie_attributes.json" ;;
    inspired) title="CRSLab recommenders on INSPIRED (inspired_unicrs: the standard 801/99/99 split)"
            import="crslab import-data --format unicrs --name inspired_unicrs --train \$SHARED/data/inspired/train_data_dbpedia.jsonl --valid \$SHARED/data/inspired/valid_data_dbpedia.jsonl --test \$SHARED/data/inspired/test_data_dbpedia.jsonl" ;;
  esac
  configs=()
  for m in "${models[@]}"; do configs+=("crslab_configs/baselines/${d}_$m.yaml"); done
  nice -n 10 "$crslab" compare "${configs[@]}" --out benchmarks/results --name "baselines_$d" \
    --title "$title" ${RERUN:+--rerun} \
    --note "Made by \`benchmarks/run_baselines.sh $d\` (niced, one run at a time, on a machine shared with other jobs: seconds are indicative)." \
    --note "Data: \`$import\`." \
    --note "Every run: \`evaluator: longtail\`, best epoch on validation (\`selection: {metric: hit@1+hit@50}\`), seed 42; conversation stages untrained (epoch 0). Configs: crslab_configs/baselines/${d}_*.yaml."
done
