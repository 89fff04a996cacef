# L-PPO on the smol world: what `python lppo.py` runs with no config (these are lppo.py's defaults, spelled out).
# The trained layer: the ICET sweep of smol-llava (greedy, 50 held-out harmful requests; data/smol/measure_sft.py)
# found refusal rates of 76-88% at every layer 0..12, with no early-exit collapse (its vision tower is untrained,
# so no layer's image tokens carry meaning). Layer 2 is the early layer where it refused least (78%), so L-PPO
# trains there; the default layer (-2 = 11, 80%) and benign over-refusal are watched at every eval.
init_from = "data/smol/smol-llava"
reward_model = "out/smol-rm"
prompt_files = ["data/smol/harmful_train.jsonl", "data/smol/benign_train.jsonl"]
eval_harmful = "data/smol/harmful_test.jsonl"
eval_benign = "data/smol/benign_test.jsonl"
out_dir = "out/lppo-smol"

image_layer = 2

batch_size = 16
max_new_tokens = 32
temperature = 0.7
ppo_epochs = 2
minibatch_size = 8
micro_batch_size = 8
learning_rate = 2e-4
kl_coef = 0.05
lora_r = 8
lora_alpha = 16

max_iters = 16
eval_interval = 8
eval_size = 24
checkpoint_interval = 4
