# The multi-layer variant the paper's discussion asks for: one policy trained over every image layer at once,
# each rollout drawing its layer at random from 0..12 (hidden_states indexing of the 12-block smol tower).
# Run: python lppo.py config/smol_lppo_all.py
#      python evaluate.py config/smol_eval.py --adapter=out/lppo-smol-all/adapter.safetensors \
#          --out_dir=out/eval-smol-all-after --before_dir=out/eval-smol-before    (refusal at every layer)
exec(open("config/smol_lppo.py").read())
image_layer = list(range(0, 13))
out_dir = "out/lppo-smol-all"
# refusal at all 13 layers on every eval would take longer than the training: evaluate.py measures it after,
# and the run itself checks benign over-refusal at the start and the end
eval_harmful = ""
eval_vqa = ""  # likewise smol-VQA at 13 layers: python evaluate.py config/smol_compare.py measures it after
eval_interval = 24
