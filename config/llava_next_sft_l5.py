# The layer-wise SFT baseline on LLaVA-NeXT (LLaVA-1.6) Vicuna-7B: config/llava15_sft_l5.py's LoRA SFT at CLIP layer 5
# (ICET-5), the layer of config/llava_next_l5.py; every anyres crop of an image is read at layer 5.
# Run: torchrun --standalone --nproc_per_node=8 sft.py config/llava_next_sft_l5.py
#      (fetch: hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-v1.6-vicuna-7b-hf)
init_from = "llava-hf/llava-v1.6-vicuna-7b-hf"
data = "data/llava_sft/train.jsonl"  # {"image", "prompt", "response"} a line: see docs/real-checkpoints.md
out_dir = "out/sft-llava-next-l5"
image_layer = 5  # a list, e.g. list(range(1, 24)), draws one layer per example: the reviewer's variant

lora_r = 16
lora_alpha = 32
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 4  # per GPU, half of LLaVA-1.5's: an image is up to 2,928 tokens here, 576 there
gradient_accumulation_steps = 4  # 128 examples per step on 8 GPUs, as config/llava15_sft_l5.py
learning_rate = 1e-4
min_lr = 1e-5
max_iters = 100  # ~3 epochs of 4,000 examples at 128 per step (scale with your data and GPU count)
warmup_iters = 5
eval_interval = 25

merge_at_end = True
merged_dir = "checkpoints/llava-v1.6-vicuna-7b-sft-l5"  # a llava_next folder: evaluate.py --init_from=... reads it
