#!/usr/bin/env bash
# Five SAEs on Gemma 3 270M layer 6 residual, sharing one activation cache (80k WikiText tokens).
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p runs/gemma-sae
for spec in "topk 5120" "relu 2560" "factor 2560" "featureforget 2560" "hiercontrastive 2560"; do
  set -- $spec
  t0=$(date +%s)
  .venv/bin/fastedit -v sae train --model gemma3-270m --layer 6 --arch $1 --width $2 --tokens 80000 --epochs 3 \
     --forget-topic languages --out runs/gemma-sae/$1 > runs/gemma-sae/$1.json 2> runs/gemma-sae/$1.log
  echo "$1 $2 rc=$? $(( $(date +%s) - t0 ))s" >> runs/gemma-sae/times.txt
done
