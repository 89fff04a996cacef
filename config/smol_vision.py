# The smol world's visual-instruction stage (LLaVA's feature alignment): the projector and LoRA on the language model
# learn to answer smol-VQA questions from the pretrained tower's default-layer features. Run after
# `python data/smol/pretrain_vision.py`: python sft.py config/smol_vision.py
init_from = "data/smol/smol-llava-vision-tower"
data = "data/smol/vqa/vqa_train.jsonl"  # python data/smol/vqa.py writes it
out_dir = "out/smol-vision"
image_layer = None  # the default layer, -2, as LLaVA trains it
train_projector = True

lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 225  # one epoch of the 1800 examples
warmup_iters = 10
eval_interval = 75
log_interval = 10

merge_at_end = True
merged_dir = "data/smol/smol-llava-vision"
