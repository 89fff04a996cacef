# The ICET sweep on LLaVA-NeXT (LLaVA-1.6) Vicuna-7B: every RedTeam-2K test request with its image, at every CLIP
# layer 1..24 and the default (-2 = 23), grouped Early 1-8 / Middle 9-16 / Late 17-24 as the paper's Table 2. Greedy.
# The reward model judges TR; add --llama_guard=<Llama Guard folder> for ASR.
# Run: python evaluate.py config/llava_next_eval.py                                (before L-PPO)
#      python evaluate.py config/llava_next_eval.py --adapter=out/lppo-llava-next-l5/adapter.safetensors \
#          --out_dir=out/eval-llava-next-after --before_dir=out/eval-llava-next-before
init_from = "llava-hf/llava-v1.6-vicuna-7b-hf"
dataset = "jsonl"
data_path = "data/redteam2k/test.jsonl"
reward_model = "checkpoints/gpt2-large-harmless-rm"
max_new_tokens = 128
batch_size = 8
out_dir = "out/eval-llava-next-before"
