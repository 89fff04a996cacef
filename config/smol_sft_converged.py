# The smol world's safety stage run to its plateau: config/smol_sft.py's model (data/smol/smol-llava, the stage cut at
# iteration 60 of 120) trained on the same data with fresh LoRA adapters for up to three more epochs (188 iterations
# each: 1143 safety and 360 smol-VQA examples in batches of 8), on one cosine schedule. Each epoch ends with a
# checkpoint; the plateau is chosen on the validation prompts (data/smol/harmful_val.jsonl, benign_val.jsonl): the
# first epoch after which one more epoch moves default-layer refusal and over-refusal by at most 2 points.
# Run, one epoch at a time (--resume continues the same schedule):
#   python sft.py config/smol_sft_converged.py --max_iters=188
#   python sft.py config/smol_sft_converged.py --max_iters=376 --resume=True
exec(open("config/smol_sft.py").read())
init_from = "data/smol/smol-llava"
out_dir = "out/smol-sft-converged"
max_iters = 564
lr_decay_iters = 564  # fixed, so that every epoch's run lies on the same schedule
learning_rate = 3e-4
min_lr = 3e-5
eval_interval = 94
merge_at_end = False
merged_dir = ""
