# The layer-wise SFT baseline on the smol world, next to L-PPO at the same layer (config/smol_lppo.py): LoRA SFT of
# smol-llava with the features of image layer 1, on refusals of the harmful TRAIN requests and answers to the benign
# ones (data/smol/sft_train.jsonl), with the adapter capacity of L-PPO (r=8 on q/k/v/o).
# Run: python sft.py config/smol_sft_l1.py   (compared in docs/results.md)
init_from = "data/smol/smol-llava"
data = "data/smol/sft_train.jsonl"
out_dir = "out/sft-smol-l1"
image_layer = 1

lora_r = 8
lora_alpha = 16
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]

batch_size = 8
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 96  # about as many prompts as L-PPO's 24 iterations of 16 rollouts see (768 examples)
warmup_iters = 5
eval_interval = 48
log_interval = 8
