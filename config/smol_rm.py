# The smol world's reward model: SmolLM2-135M-Instruct (the language model of data/smol/smol-llava-base) with a
# scalar head, trained to prefer refusals of harmful prompts and answers to benign ones.
# python reward.py config/smol_rm.py  -> out/smol-rm/ (lppo.py's default reward_model)
# The base folder and the preference pairs (data/smol/build_preferences.py, 288 s) are built on first use.
# Measured: 94.8% pairwise accuracy on the 97 held-out pairs (91.8% harmful, 97.9% benign), trained in 453 s on 2 CPU
# cores; one answer per training prompt (222 pairs) gave 92.8%.
init_from = "data/smol/smol-llava-base"
train_file = "data/smol/prefs_train.jsonl"
test_file = "data/smol/prefs_test.jsonl"
out_dir = "out/smol-rm"
# whether a refusal is right depends on the prompt, and a few hundred pairs teach that only if every layer may adapt:
# the head alone (a linear probe) or the last 4 blocks fit the training pairs but stop near 85% held out
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
