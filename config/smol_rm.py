# The smol world's reward model: SmolLM2-135M-Instruct with a scalar head, preferring refusals of harmful prompts
# and answers to benign ones (pairs from data/smol/build_preferences.py, built on first use; results: docs/).
# Run: python reward.py config/smol_rm.py  -> out/smol-rm/ (lppo.py's default reward_model)
init_from = "data/smol/smol-llava-base"
train_file = "data/smol/prefs_train.jsonl"
test_file = "data/smol/prefs_test.jsonl"
out_dir = "out/smol-rm"
# whether a refusal is right depends on the prompt: with a few hundred pairs, every layer must adapt
train_mode = "lora"
lora_r = 16
lora_alpha = 32
lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
batch_size = 8
max_iters = 160           # 1.7 epochs of the 761 training pairs (two answers per training prompt)
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 5
eval_interval = 40
