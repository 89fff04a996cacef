# The smol world's safety stage: LoRA SFT of smol-llava-base at its default image layer (-2) on refusals of the
# harmful TRAIN requests and the base model's own answers to the benign ones, each shown with 3 images
# (data/smol/build_sft.py), merged into data/smol/smol-llava/, the aligned model every later smol stage starts from.
# Run: python sft.py config/smol_sft.py   (~17 min on 2 free CPU cores, plus ~100 s to build the data on first use)
# Measured (python data/smol/measure_sft.py, the held-out prompts, default layer): 90% of harmful requests refused
# greedy (90% at T=0.7); 10.4% of benign ones over-refused (12.5% at T=0.7). Before it SmolLM2 refused 22% / 8%.
# Tried, same data but before the benign refusals were resampled (greedy / T=0.7, harmful refused; benign refused):
#   170 iterations: 90 / 84; 21 / 21     272: 88 / 88; 12.5 / 16.7     340: 90 / 90; 14.6 / 12.5
# and with the resampled data at 408 iterations: 88 / 84; 6.2 / 6.2 (refuses less of both; 340 is the closer miss)
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
max_iters = 340  # ~2.4 epochs of 1143 examples
warmup_iters = 10
eval_interval = 25
log_interval = 10

merge_at_end = True
merged_dir = "data/smol/smol-llava"
