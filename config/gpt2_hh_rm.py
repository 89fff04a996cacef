# The paper's reward model: GPT-2 large with a scalar head, Bradley-Terry on HH-RLHF harmless-base (what to fetch:
# docs/real-checkpoints.md). Run: torchrun --standalone --nproc_per_node=8 reward.py config/gpt2_hh_rm.py
init_from = "checkpoints/gpt2-large"
train_file = "data/hh-rlhf/harmless-base/train.jsonl.gz"
test_file = "data/hh-rlhf/harmless-base/test.jsonl.gz"
out_dir = "out/gpt2-large-hh-rm"
train_mode = "last_k"
last_k_blocks = 36        # every block of GPT-2 large; the embeddings stay frozen
max_length = 512          # long multi-turn transcripts lose the start of their prompt
batch_size = 16           # pairs per GPU per micro step
gradient_accumulation_steps = 4
max_iters = 660           # ~1 epoch of 42.5k pairs at 64 pairs per step on one GPU (divide by the GPU count)
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 30
weight_decay = 0.01
eval_interval = 100
eval_batch_size = 32
