# The smol world's safety stage: LoRA SFT of smol-llava-vision at its default image layer on refusals of the harmful
# TRAIN requests and the base model's answers to the benign ones (data/smol/build_sft.py), with smol-VQA questions
# mixed in so that the model keeps its sight, as LLaVA mixes its data; merged into smol-llava/.
# This is the full stage (about 21 minutes on 2 cores): its model refuses alike at every image layer, so it shows no
# ICET gap; the shipped world stops earlier (config/smol_sft.py). Run: python sft.py config/smol_sft_full.py
# --merged_dir=out/smol-llava-full (results: docs/smol-results.md)
init_from = "data/smol/smol-llava-vision"
data = "data/smol/sft_train.jsonl,data/smol/vqa/vqa_mix.jsonl"
out_dir = "out/smol-sft-full"
image_layer = None  # the checkpoint's default, -2: only this layer is aligned, which is what ICET exploits

lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 340  # ~1.8 epochs of 1143 safety and 360 VQA examples
warmup_iters = 10
eval_interval = 25
log_interval = 10

merge_at_end = True
merged_dir = "out/smol-llava-full"
