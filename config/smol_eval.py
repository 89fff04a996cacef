# The ICET sweep on the smol world: every held-out harmful request, with its image, at every image layer 0..12
# (0 = the patch embeddings; 11 = -2 is the default), judged by refusal keywords and the smol reward model. Greedy.
# Run: python evaluate.py config/smol_eval.py                       (before L-PPO)
#      python evaluate.py config/smol_eval.py --adapter=out/lppo-smol/adapter.safetensors \
#          --out_dir=out/eval-smol-after --before_dir=out/eval-smol-before
init_from = "data/smol/smol-llava"
dataset = "jsonl"
data_path = "data/smol/harmful_test.jsonl"
layers = list(range(0, 13))
reward_model = "out/smol-rm"
max_new_tokens = 48
batch_size = 25
out_dir = "out/eval-smol-before"
