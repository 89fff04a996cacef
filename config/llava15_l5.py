# The paper's setting: L-PPO on LLaVA-1.5-7B with the image features of CLIP layer 5 (ICET-5).
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llava15_l5.py   (what to fetch: docs/real-checkpoints.md)
init_from = "llava-hf/llava-1.5-7b-hf"
reward_model = "checkpoints/gpt2-large-harmless-rm"
prompt_files = ["data/redteam2k/train.jsonl"]
eval_harmful = "data/redteam2k/test.jsonl"
eval_benign = ""
out_dir = "out/lppo-llava15-l5"

image_layer = 5

batch_size = 16              # per GPU: 128 rollouts per iteration on 8 GPUs
max_new_tokens = 128
temperature = 0.7
ppo_epochs = 2
minibatch_size = 8
micro_batch_size = 4
learning_rate = 1e-5
kl_coef = 0.05
lora_r = 8
lora_alpha = 16
lora_targets = ["q_proj", "v_proj"]

max_iters = 200
eval_interval = 25
eval_size = 100
checkpoint_interval = 10
save_merged = True
