# L-PPO on LLaVA-NeXT (LLaVA-1.6) Vicuna-7B with the image features of CLIP layer 5 (ICET-5), config/llava15_l5.py's
# setting on the anyres model: every crop of an image (the base view and up to 4 grid crops) is read at layer 5.
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llava_next_l5.py
#      (fetch: hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir checkpoints/llava-v1.6-vicuna-7b-hf)
exec(open("config/llava15_l5.py").read())
init_from = "llava-hf/llava-v1.6-vicuna-7b-hf"
out_dir = "out/lppo-llava-next-l5"
micro_batch_size = 2  # half of LLaVA-1.5's: an image is up to 2,928 tokens here, 576 there
