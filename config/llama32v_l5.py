# L-PPO on Llama 3.2 11B Vision Instruct at image layer 5: the paper's setting (config/llava15_l5.py) on Meta's
# cross-attention VLM. The layer is one of the local ViT's 32 (h_0..h_32, None = 32: model.MllamaVisionModel); the
# early exit skips local layers 6..32, the global ViT and the projector still run. The reward model is text-only.
# LoRA on q_proj/v_proj adapts the language model's self- and cross-attention; the vision model stays frozen.
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llama32v_l5.py
#      (hf download meta-llama/Llama-3.2-11B-Vision-Instruct --local-dir checkpoints/Llama-3.2-11B-Vision-Instruct,
#      a gated repository; the rest as in docs/real-checkpoints.md)
exec(open("config/llava15_l5.py").read())
init_from = "meta-llama/Llama-3.2-11B-Vision-Instruct"
out_dir = "out/lppo-llama32v-l5"
