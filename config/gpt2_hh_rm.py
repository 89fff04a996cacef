# The paper's reward model: GPT-2 large with a scalar head, Bradley-Terry on Anthropic HH-RLHF harmless-base
# (Bai et al. 2022; the paper: "we use the reward model GPT2 architectures"). One GPU, or torchrun for several:
#   torchrun --standalone --nproc_per_node=8 reward.py config/gpt2_hh_rm.py
# Fetch on a machine with network (nothing is downloaded at run time), then copy both folders here:
#   hf download openai-community/gpt2-large config.json model.safetensors vocab.json merges.txt \
#       tokenizer.json tokenizer_config.json --local-dir checkpoints/gpt2-large
#   mkdir -p data/hh-rlhf/harmless-base && for s in train test; do curl -L -o data/hh-rlhf/harmless-base/$s.jsonl.gz \
#       https://github.com/anthropics/hh-rlhf/raw/master/harmless-base/$s.jsonl.gz; done
# (42.5k train / 2.3k test pairs, MIT.) The paper likely used the released Ray2333/gpt2-large-harmless-reward_model
# (GPT-2 large on this split, 73.7% test accuracy); to use it instead of training, download it the same way and pass
# its folder to lppo.py --reward_model=... or evaluate.py --reward_model=...
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
