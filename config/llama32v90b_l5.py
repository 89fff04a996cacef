# L-PPO on Llama 3.2 90B Vision Instruct at image layer 5, the setting of config/llama32v_l5.py on a model whose bf16
# weights (177 GB) fit on no single GPU: FSDP2 shards them over the ranks (docs/fsdp.md, with the memory table behind
# the batch sizes below).
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llama32v90b_l5.py   (several machines: docs/fsdp.md)
#      (hf download meta-llama/Llama-3.2-90B-Vision-Instruct --local-dir checkpoints/Llama-3.2-90B-Vision-Instruct,
#      a gated repository)
exec(open("config/llama32v_l5.py").read())
init_from = "meta-llama/Llama-3.2-90B-Vision-Instruct"
out_dir = "out/lppo-llama32v90b-l5"
fsdp = True
micro_batch_size = 2         # half of the 11B's: 100 decoder layers of 8,192
save_merged = False          # merging needs every weight whole on one rank: out_dir/peft merges later, on the CPU
