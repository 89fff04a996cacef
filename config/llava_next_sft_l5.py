# The layer-wise SFT baseline on LLaVA-NeXT (LLaVA-1.6) Vicuna-7B: config/llava15_sft_l5.py's LoRA SFT at CLIP layer 5
# (ICET-5), the layer of config/llava_next_l5.py; every anyres crop of an image is read at layer 5.
# Run: torchrun --standalone --nproc_per_node=8 sft.py config/llava_next_sft_l5.py
#      (fetch: hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-v1.6-vicuna-7b-hf)
exec(open("config/llava15_sft_l5.py").read())
init_from = "llava-hf/llava-v1.6-vicuna-7b-hf"
out_dir = "out/sft-llava-next-l5"
batch_size = 4  # per GPU, half of LLaVA-1.5's: an image is up to 2,928 tokens here, 576 there
gradient_accumulation_steps = 4  # 128 examples per step on 8 GPUs, as config/llava15_sft_l5.py
merged_dir = "checkpoints/llava-v1.6-vicuna-7b-sft-l5"  # a llava_next folder: evaluate.py --init_from=... reads it
