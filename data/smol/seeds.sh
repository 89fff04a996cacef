#!/usr/bin/env bash
# L-PPO against its two controls over seeds, each model scored once on the held-out test sets (docs/smol-evidence.md).
# Every arm starts from data/smol/smol-llava and makes 96 updates of 8 sequences:
#   lppo   L-PPO at layer 1 (lppo.py's defaults)
#   sft    (a) the default-layer safety SFT continued for as many updates (config/smol_sft_matched.py)
#   ppo11  (b) Clip-PPO at the default layer (--image_layer=-2)
#   sft1   layer-wise SFT: (a) with layer 1's features (--image_layer=1)
#   lppoall  multi-layer L-PPO: each rollout draws its layer from 0..12 (config/smol_lppo_all.py)
#   base   the shipped model itself, scored only
# Usage: bash data/smol/seeds.sh ARM [SEED ...]   (seeds 1337 1 2 3 4 by default), then python data/smol/seeds_table.py
# Models go to out/ARM-sSEED/, their scores to out/test-ARM-sSEED/ (out/test-base/): the own harmful set at layers
# 1, 4 and 11, AdvBench x images at 1 and 11 (the shipped model also at 4), XSTest's safe prompts and smol-VQA at the
# default. A finished step is skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
arm=${1:?usage: bash data/smol/seeds.sh lppo|sft|ppo11|sft1|lppoall|base [SEED ...]}
shift
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1337 1 2 3 4)
case $arm in
  lppo|sft|ppo11|sft1|lppoall) ;;
  base) seeds=(none) ;;
  *) echo "data/smol/seeds.sh: arm '$arm'; expected lppo, sft, ppo11, sft1, lppoall or base" >&2; exit 2 ;;
esac
advbench="--dataset=advbench_coco --pair_image_dir=data/smol/vqa/test_images
  --data_path=data/external/advbench/harmful_behaviors.csv"
xstest="--dataset=xstest --pair_image_dir=data/smol/vqa/test_images --data_path=data/external/xstest/xstest_prompts.csv"
for s in "${seeds[@]}"; do
  name=$arm-s$s; adapter=(--adapter=out/$name/adapter.safetensors)
  case $arm in
    lppo)  train=(python lppo.py --seed=$s --out_dir=out/$name) ;;
    sft)   train=(python sft.py config/smol_sft_matched.py --seed=$s --out_dir=out/$name) ;;
    ppo11) train=(python lppo.py --seed=$s --image_layer=-2 --out_dir=out/$name) ;;
    sft1)  train=(python sft.py config/smol_sft_matched.py --seed=$s --image_layer=1 --out_dir=out/$name) ;;
    lppoall) train=(python lppo.py config/smol_lppo_all.py --seed=$s --out_dir=out/$name) ;;
    base)  name=base; adapter=() ;;
  esac
  [ $arm = base ] || [ -f out/$name/adapter.safetensors ] || "${train[@]}"
  t=out/test-$name
  [ -f $t/own-harmful/summary.json ] || python evaluate.py config/smol_test.py "${adapter[@]}" "--layers=[1,4,11]" \
      --out_dir=$t/own-harmful
  [ -f $t/xstest-safe/summary.json ] || python evaluate.py config/smol_test.py "${adapter[@]}" $xstest "--layers=[11]" \
      --out_dir=$t/xstest-safe
  adv_layers="[1,11]"; [ $arm = base ] && adv_layers="[1,4,11]"
  [ -f $t/advbench/summary.json ] || python evaluate.py config/smol_test.py "${adapter[@]}" $advbench \
      "--layers=$adv_layers" --out_dir=$t/advbench
  [ -f $t/vqa/summary.json ] || python evaluate.py config/smol_test.py "${adapter[@]}" \
      --data_path=data/smol/vqa/vqa_test.jsonl "--layers=[11]" --max_new_tokens=8 --out_dir=$t/vqa
done
