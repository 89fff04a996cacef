# The layer-wise SFT baseline (the paper's Appendix L; a reviewer's "why RL rather than plain SFT?"): LoRA SFT of
# LLaVA-1.5-7B with the image features of CLIP layer 5 (ICET-5), the layer L-PPO is run at in config/llava15_l5.py.
# Run: torchrun --standalone --nproc_per_node=8 sft.py config/llava15_sft_l5.py   (or python sft.py ... on one GPU)
#
# data: a JSONL you prepare, one example a line, {"image": path (relative to the JSONL's folder), "prompt": ...,
# "response": ...}, e.g.
#   - each RedTeam-2K request of the L-PPO training split, with its JailBreakV-28K image, and a refusal as response
#     ("I'm sorry, but I cannot assist with that request."; vary the wording, or the model learns one string), and
#   - about as many benign (image, question) pairs (e.g. LLaVA-Instruct-150K or VQA-v2 train) with the model's own
#     answers at the default layer as responses, so that utility is kept (data/smol/build_sft.py does both for the
#     smol world). Keep every evaluation prompt out of it.
# image_layer = [1, 2, ..., 23] instead of 5 gives the reviewer's variant: one random layer per example.
init_from = "llava-hf/llava-1.5-7b-hf"  # or the folder from `hf download llava-hf/llava-1.5-7b-hf --local-dir ...`
data = "data/llava_sft/train.jsonl"
out_dir = "out/sft-llava15-l5"
image_layer = 5

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
