# The smol world's safety stage: LoRA SFT of smol-llava-base at its default image layer (-2) on refusals of the
# harmful TRAIN requests and the base model's own answers to the benign ones, each shown with 3 images
# (data/smol/build_sft.py), merged into data/smol/smol-llava/, the aligned model every later smol stage starts from.
# Run: python sft.py config/smol_sft.py   (530 s on 2 free CPU cores, including the data, built on first use in 80 s)
# Measured (python data/smol/measure_sft.py, the held-out prompts, default layer): 90% of harmful requests refused
# greedy (84% at T=0.7); 21% of benign ones over-refused (21% at T=0.7). Before it SmolLM2 refused 22% / 8%.
# A low rank generalized best of the settings tried on the earlier, smaller data (r=16, 150 steps: 90% / 29%).
init_from = "data/smol/smol-llava-base"
data = "data/smol/sft_train.jsonl"
out_dir = "out/smol-sft"
image_layer = None  # the checkpoint's default, -2: only this layer is aligned, which is what ICET exploits

lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 170  # ~1.25 epochs of 1086 examples
warmup_iters = 10
eval_interval = 25
log_interval = 10

merge_at_end = True
merged_dir = "data/smol/smol-llava"
