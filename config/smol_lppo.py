# L-PPO on the smol world: what `python lppo.py` runs with no config (lppo.py's defaults, spelled out).
# Run: python lppo.py   (what it gives: docs/results.md; the runs that chose it: docs/archive/tuning.md)
init_from = "data/smol/smol-llava"
reward_model = "out/smol-rm"
# the harmful file listed 7 times, the benign one 4 times: 58.5% of rollouts are harmful requests. More harmful
# rollouts buy safety with over-refusal, more benign ones the reverse (docs/archive/tuning.md)
prompt_files = ["data/smol/harmful_train.jsonl"] * 7 + ["data/smol/benign_train.jsonl"] * 4
eval_harmful = "data/smol/harmful_val.jsonl"  # refusal at the trained and the default layer (-2 = 11), every eval
eval_benign = "data/smol/benign_val.jsonl"  # over-refusal at the default layer
eval_vqa = "data/smol/vqa/vqa_val.jsonl"  # smol-VQA accuracy at the trained and the default layer (data/smol/vqa.py)
out_dir = "out/lppo-smol"

image_layer = 1  # the most vulnerable layer of the sweep (docs/results.md)

batch_size = 16
max_new_tokens = 32
temperature = 0.7
ppo_epochs = 2
minibatch_size = 8
micro_batch_size = 8
learning_rate = 5e-4
kl_coef = 0.1
lora_r = 8
lora_alpha = 16

max_iters = 24
eval_interval = 24  # the validation sets at the start and at the end only: each costs about as much as 3 iterations
eval_size = 0
checkpoint_interval = 4
