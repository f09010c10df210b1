#!/usr/bin/env bash
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1
S=runs/gemma-sae
/usr/bin/time -v .venv/bin/fastedit -v unlearn --model gemma3-270m --sae $S/relu --sae $S/topk --sae $S/factor \
  --sae $S/featureforget --sae $S/hiercontrastive --forget-topic languages --out runs/unlearn-gemma
