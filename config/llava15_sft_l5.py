# The layer-wise SFT baseline (the paper's Appendix L): LoRA SFT of LLaVA-1.5-7B at CLIP layer 5 (ICET-5), the
# layer of config/llava15_l5.py. Run: torchrun --standalone --nproc_per_node=8 sft.py config/llava15_sft_l5.py
init_from = "llava-hf/llava-1.5-7b-hf"  # or the folder from `hf download llava-hf/llava-1.5-7b-hf --local-dir ...`
data = "data/llava_sft/train.jsonl"  # {"image", "prompt", "response"} a line: see docs/real-checkpoints.md
out_dir = "out/sft-llava15-l5"
image_layer = 5  # a list, e.g. list(range(1, 24)), draws one layer per example: the reviewer's variant

lora_r = 16
lora_alpha = 32
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8  # per GPU: 128 examples per step on 8 GPUs
gradient_accumulation_steps = 2
learning_rate = 1e-4
min_lr = 1e-5
max_iters = 100  # ~3 epochs of 4,000 examples at 128 per step (scale with your data and GPU count)
warmup_iters = 5
eval_interval = 25

merge_at_end = True
merged_dir = "checkpoints/llava-1.5-7b-sft-l5"  # a llava-hf folder: evaluate.py --init_from=... reads it
