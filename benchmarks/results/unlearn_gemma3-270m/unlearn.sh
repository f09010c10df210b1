#!/usr/bin/env bash
# The unlearning comparison on Gemma 3 270M, with the SAEs of train_saes.sh; writes unlearning.json (config, gate,
# question split, every grid point), table.md and unlearning.png into this folder (replacing the earlier result).
# CounterFact: the command's default data set (or add --counterfact FILE).
# Cost: scoring 340 questions takes ~58 s of one CPU core on this model (one forward per question); a clamp that
# passes the gate costs ~70 s (300 retain + 2 x 40 forget), one that fails stops after 1-2 batches. Expected total
# ~40 min of one core (selection ~2.5 min, activations ~3, grids ~25, MEMIT/EMMET ~11); at most ~3.5 h if every
# clamp of the 5 x 32-point grid passed the gate.
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1
mkdir -p runs
S=runs/gemma-sae
/usr/bin/time -v .venv/bin/fastedit -v unlearn --model gemma3-270m --sae $S/relu --sae $S/topk --sae $S/factor \
  --sae $S/featureforget --sae $S/hiercontrastive --forget-topic languages \
  --max-forget 40 --retain-questions 300 --retain-max-drop 0.01 --candidates 200 \
  --out benchmarks/results/unlearn_gemma3-270m --overwrite 2> runs/unlearn-gemma.log
