# Control (a) for L-PPO: the smol world's safety stage continued at the default image layer for as many optimizer
# steps as `python lppo.py` takes. L-PPO makes 24 iterations x 2 PPO epochs x 2 minibatches = 96 updates of 8
# sequences; this makes 96 updates of 8 examples of the safety stage's own data (refusals of the harmful train
# requests, answers to the benign ones, smol-VQA mixed in) with fresh LoRA adapters on data/smol/smol-llava. What it
# measures: whether more of the default-layer alignment that L-PPO is compared with reaches the early layers by itself.
# Run, one seed:   python sft.py config/smol_sft_matched.py --seed=1 --out_dir=out/sft-matched-s1
# Score it:        python evaluate.py config/smol_test.py --adapter=out/sft-matched-s1/adapter.safetensors ...
exec(open("config/smol_sft.py").read())
init_from = "data/smol/smol-llava"
out_dir = "out/sft-matched"
max_iters = 96
lr_decay_iters = 96
learning_rate = 3e-4  # the continued safety stage's schedule (config/smol_sft_converged.py)
min_lr = 3e-5
eval_interval = 96
merge_at_end = False
merged_dir = ""
