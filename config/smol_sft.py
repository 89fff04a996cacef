# The smol world's safety stage: LoRA SFT of smol-llava-vision at its default image layer on refusals of the harmful
# TRAIN requests and the base model's answers to the benign ones (data/smol/build_sft.py), with smol-VQA questions
# mixed in so that the model keeps its sight, as LLaVA mixes its data; merged into smol-llava/.
# It stops half-way through a 120-iteration schedule, while refusal has been learnt at the default layer and has not
# yet spread to the early ones: the ICET gap the world exists to show (docs/results.md). Trained to the end,
# or as config/smol_sft_full.py, the model refuses at every layer alike and there is nothing for L-PPO to repair.
# Run: python data/smol/world.py (it runs this config after the stages before it; results: docs/)
init_from = "data/smol/smol-llava-vision"
data = "data/smol/sft_train.jsonl,data/smol/vqa/vqa_mix.jsonl"
out_dir = "out/smol-sft"
image_layer = None  # the checkpoint's default, -2: only this layer is aligned, which is what ICET exploits

lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8
learning_rate = 5e-4
min_lr = 5e-5
max_iters = 60
lr_decay_iters = 120  # the learning rate at iteration 60 is still 60% of its peak: the stage is cut, not annealed
warmup_iters = 10
eval_interval = 30
log_interval = 10

merge_at_end = True
merged_dir = "data/smol/smol-llava"
