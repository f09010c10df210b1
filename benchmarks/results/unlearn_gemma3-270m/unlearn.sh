#!/usr/bin/env bash
# The unlearning comparison on Gemma 3 270M, with the SAEs of train_saes.sh; writes unlearning.json (config, gate,
# question split, every grid point), table.md and unlearning.png into this folder (replacing the earlier result).
# CounterFact: the command's default data set (or add --counterfact FILE).
# Cost, measured: 12 min 55 s wall on one thread (OMP_NUM_THREADS=1) while another one-thread job shared the
# two cores, 3.7 GB peak: question selection 89 s, the five SAE grids 45-180 s each (a clamp that fails the gate
# stops after 1-2 batches), MEMIT 233 s (v* of 40 requests), EMMET 62 s (same targets).
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1
mkdir -p runs
S=runs/gemma-sae
/usr/bin/time -v .venv/bin/fastedit -v unlearn --model gemma3-270m --sae $S/relu --sae $S/topk --sae $S/factor \
  --sae $S/featureforget --sae $S/hiercontrastive --forget-topic languages \
  --max-forget 40 --retain-questions 300 --retain-max-drop 0.01 --candidates 200 \
  --out benchmarks/results/unlearn_gemma3-270m --overwrite 2> runs/unlearn-gemma.log
