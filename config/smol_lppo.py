# L-PPO on the smol world: what `python lppo.py` runs with no config (these are lppo.py's defaults, spelled out).
# The trained layer and the settings below were chosen on the earlier safety-stage model (170 SFT iterations), whose
# ICET sweep (python evaluate.py config/smol_eval.py: greedy, the 50 held-out harmful requests, refusal keywords)
# found keyword ASR of 8-16% at every layer 0..12 and was worst at layer 2 (16%). There, this config took layer 2
# from 84% to 90% refused, the default layer from 90% to 88%, and over-refusal from 21% to 19%.
# The current smol-llava (340 SFT iterations) has 8-10% ASR at every layer, and no weak layer for L-PPO to repair:
# from it this config ends refusing 98% at layer 2, 100% at the default, and 31% of benign requests (README).
# The default layer (-2 = 11) and benign over-refusal are watched at every eval, on the full held-out sets.
init_from = "data/smol/smol-llava"
reward_model = "out/smol-rm"
# harmful requests drawn twice as often as benign ones (62% of rollouts): with the two at their natural 45/55 mix,
# L-PPO traded harmful refusals for helpfulness (84% -> 76% refused at layer 2, over-refusal 21% -> 15%); with
# harmful requests only, the paper's setting, it learned to refuse everything (100% refused, 73% over-refused)
prompt_files = ["data/smol/harmful_train.jsonl", "data/smol/harmful_train.jsonl", "data/smol/benign_train.jsonl"]
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
learning_rate = 5e-4
kl_coef = 0.1
lora_r = 8
lora_alpha = 16

max_iters = 24
eval_interval = 8
eval_size = 0
checkpoint_interval = 4
