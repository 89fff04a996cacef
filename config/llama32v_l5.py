# L-PPO on Llama 3.2 11B Vision Instruct at image layer 5: the paper's setting (config/llava15_l5.py) on Meta's
# cross-attention VLM. The layer is one of the local ViT's 32 (h_0..h_32, None = 32: model.MllamaVisionModel); the
# early exit skips local layers 6..32, the global ViT and the projector still run. The reward model is text-only.
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llama32v_l5.py
#      (hf download meta-llama/Llama-3.2-11B-Vision-Instruct --local-dir checkpoints/Llama-3.2-11B-Vision-Instruct,
#      a gated repository; the rest as in docs/real-checkpoints.md)
init_from = "meta-llama/Llama-3.2-11B-Vision-Instruct"
reward_model = "checkpoints/gpt2-large-harmless-rm"
prompt_files = ["data/redteam2k/train.jsonl"]
eval_harmful = "data/redteam2k/test.jsonl"
eval_benign = ""
out_dir = "out/lppo-llama32v-l5"

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
lora_targets = ["q_proj", "v_proj"]  # the language model's self- and cross-attention; the vision model stays frozen

max_iters = 200
eval_interval = 25
eval_size = 100
checkpoint_interval = 10
save_merged = True
