# The smol world's full safety stage: config/smol_sft.py trained to the end of its own schedule (340 iterations, about
# 1.8 epochs of 1143 safety and 360 VQA examples; about 21 minutes on 2 cores). Its model refuses alike at every image
# layer, so it shows no ICET gap; the shipped world stops earlier (config/smol_sft.py).
# Run: python sft.py config/smol_sft_full.py   (results: docs/archive/smol-results.md, "The world that sees")
exec(open("config/smol_sft.py").read())
out_dir = "out/smol-sft-full"
max_iters = 340
lr_decay_iters = 0  # the cosine decay ends at max_iters
eval_interval = 25
merged_dir = "out/smol-llava-full"
