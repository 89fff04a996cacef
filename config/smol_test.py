# The smol world's held-out test sets, each scored once per reported model (greedy, 48 new tokens, the three-way judge).
# Every choice was made on the validation splits (data/smol/*_val.jsonl) before these were run.
#   own harmful:  python evaluate.py config/smol_test.py --out_dir=out/test/own-harmful
#   own benign:   python evaluate.py config/smol_test.py --data_path=data/smol/benign_test.jsonl --benign=True \
#                     --out_dir=out/test/own-benign
#   AdvBench:     python evaluate.py config/smol_test.py --dataset=advbench_coco \
#                     --pair_image_dir=data/smol/vqa/test_images \
#                     --data_path=data/external/advbench/harmful_behaviors.csv --out_dir=out/test/advbench
#   XSTest safe:  python evaluate.py config/smol_test.py --dataset=xstest \
#                     --pair_image_dir=data/smol/vqa/test_images \
#                     --data_path=data/external/xstest/xstest_prompts.csv --out_dir=out/test/xstest-safe
#   XSTest unsafe: the same with --xstest_part=unsafe --out_dir=out/test/xstest-unsafe
# AdvBench (llm-attacks, data/advbench/harmful_behaviors.csv) and XSTest v2 (paul-rottger/exaggerated-safety,
# xstest_prompts.csv) are not in this repository: fetch them into data/external/ (gitignored). Each prompt of a set
# without images gets a held-out smol-VQA image (pair_image_dir, a seeded draw per prompt), as AdvBench-COCO pairs
# AdvBench goals with COCO images, so that its image layer can change.
init_from = "data/smol/smol-llava"
dataset = "jsonl"
data_path = "data/smol/harmful_test.jsonl"
pair_image_dir = ""
layers = [0, 1, 2, 3, 4, 6, 8, 11]
max_new_tokens = 48
batch_size = 40
reward_model = ""
out_dir = "out/test/own-harmful"
