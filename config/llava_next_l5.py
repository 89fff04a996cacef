# L-PPO on LLaVA-NeXT (LLaVA-1.6) Vicuna-7B with the image features of CLIP layer 5 (ICET-5), config/llava15_l5.py's
# setting on the anyres model: every crop of an image (the base view and up to 4 grid crops) is read at layer 5.
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llava_next_l5.py
#      (fetch: hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-v1.6-vicuna-7b-hf)
init_from = "llava-hf/llava-v1.6-vicuna-7b-hf"
reward_model = "checkpoints/gpt2-large-harmless-rm"
prompt_files = ["data/redteam2k/train.jsonl"]
eval_harmful = "data/redteam2k/test.jsonl"
eval_benign = ""
out_dir = "out/lppo-llava-next-l5"

image_layer = 5

batch_size = 16              # per GPU: 128 rollouts per iteration on 8 GPUs
max_new_tokens = 128
temperature = 0.7
ppo_epochs = 2
minibatch_size = 8
micro_batch_size = 2         # half of LLaVA-1.5's: an image is up to 2,928 tokens here, 576 there
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
