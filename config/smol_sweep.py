# The ICET sweep on the smol world, one row per image layer 0..12 (11 = -2 is the default): keyword ASR on the held-out
# harmful requests, keyword over-refusal (KW-ORR) on the benign ones, smol-VQA accuracy (also per question type).
# Greedy, 24 new tokens. Three runs, then one table with extract.py's out-of-distribution scores:
#   python evaluate.py config/smol_sweep.py
#   python evaluate.py config/smol_sweep.py --data_path=data/smol/benign_test.jsonl --benign=True \
#       --out_dir=out/sweep-smol/benign
#   python evaluate.py config/smol_sweep.py --data_path=data/smol/vqa/vqa_test.jsonl --max_new_tokens=4 \
#       --batch_size=50 --out_dir=out/sweep-smol/vqa
#   python extract.py config/smol_extract.py
#   python data/smol/sweep_table.py
init_from = "data/smol/smol-llava"
dataset = "jsonl"
data_path = "data/smol/harmful_test.jsonl"
layers = list(range(0, 13))
max_new_tokens = 24
batch_size = 25
out_dir = "out/sweep-smol/harmful"
