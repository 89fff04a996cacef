# The smol world's reward model: SmolLM2-135M-Instruct (the language model of data/smol/smol-llava-base) with a
# scalar head, trained to prefer refusals of harmful prompts and answers to benign ones.
# python reward.py config/smol_rm.py  -> out/smol-rm/ (lppo.py's default reward_model)
# The base folder and the preference pairs (data/smol/build_preferences.py) are built on first use.
init_from = "data/smol/smol-llava-base"
train_file = "data/smol/prefs_train.jsonl"
test_file = "data/smol/prefs_test.jsonl"
out_dir = "out/smol-rm"
train_mode = "last_k"
last_k_blocks = 4
batch_size = 8
max_iters = 100
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
eval_interval = 25
