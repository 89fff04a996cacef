# The smol world's safety stage: LoRA SFT of smol-llava-base at its default image layer (-2) on refusals of the
# harmful TRAIN requests and the base model's own answers to the benign ones (data/smol/build_sft.py), merged into
# data/smol/smol-llava/, the aligned model every later smol stage starts from (lppo.py, evaluate.py, extract.py).
# Run: python sft.py config/smol_sft.py   (the data is built on first use)
init_from = "data/smol/smol-llava-base"
data = "data/smol/sft_train.jsonl"
out_dir = "out/smol-sft"
image_layer = None  # the checkpoint's default, -2: only this layer is aligned, which is what ICET exploits

lora_r = 16
lora_alpha = 32
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

batch_size = 8
learning_rate = 3e-4
min_lr = 3e-5
max_iters = 150
warmup_iters = 10
eval_interval = 50
log_interval = 10

merge_at_end = True
merged_dir = "data/smol/smol-llava"
