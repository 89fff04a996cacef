# L-PPO against its controls on the smol world: one model (plus an adapter of lppo.py or sft.py) at the layers that
# stand for Early (0, 1, 2), Middle (5) and Late (9), and the default (11). Greedy, 32 new tokens. Keyword ASR and
# the smol reward model's mean score (TR) on the held-out harmful requests, then keyword over-refusal (KW-ORR) on the
# benign ones and smol-VQA, joined into one table:
#   a=--adapter=out/lppo-smol/adapter.safetensors
#   python evaluate.py config/smol_compare.py $a --out_dir=out/compare-lppo/harmful
#   python evaluate.py config/smol_compare.py $a --out_dir=out/compare-lppo/benign \
#       --data_path=data/smol/benign_test.jsonl --benign=True --batch_size=24 --reward_model=""
#   python evaluate.py config/smol_compare.py $a --out_dir=out/compare-lppo/vqa \
#       --data_path=data/smol/vqa/vqa_test.jsonl --max_new_tokens=4 --batch_size=50 --reward_model=""
#   python data/smol/sweep_table.py --runs=out/compare-lppo --extract="" --out=out/compare-lppo/table.json
# Without --adapter it measures smol-llava itself (out_dir out/compare-before/...).
init_from = "data/smol/smol-llava"
dataset = "jsonl"
data_path = "data/smol/harmful_test.jsonl"
layers = [0, 1, 2, 5, 9, 11]
group_layers = [[0, 1, 2], [5], [9]]
reward_model = "out/smol-rm"
max_new_tokens = 32
batch_size = 25
out_dir = "out/compare-before/harmful"
