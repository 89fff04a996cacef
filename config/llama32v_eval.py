# The ICET sweep on Llama 3.2 11B Vision Instruct: every held-out RedTeam-2K request of config/llama32v_l5.py, with
# its image, at every local-ViT layer 1..32 (32 = the default, the whole encoder; Early 1-11, Middle 12-21, Late
# 22-32), judged by Llama Guard, refusal keywords and the reward model. Greedy.
# Run: python evaluate.py config/llama32v_eval.py                       (before L-PPO)
#      python evaluate.py config/llama32v_eval.py --adapter=out/lppo-llama32v-l5/adapter.safetensors \
#          --out_dir=out/eval-llama32v-after --before_dir=out/eval-llama32v-before
init_from = "meta-llama/Llama-3.2-11B-Vision-Instruct"
dataset = "jsonl"
data_path = "data/redteam2k/test.jsonl"
layers = []  # every layer 1..32
llama_guard = "checkpoints/Llama-Guard-3-8B"
reward_model = "checkpoints/gpt2-large-harmless-rm"
max_new_tokens = 128
batch_size = 16
out_dir = "out/eval-llama32v-before"
