# L-PPO on LLaVA-NeXT-34B (LLaVA-1.6 with Nous-Hermes-2-Yi-34B) with the image features of CLIP layer 5 (ICET-5), the
# setting of config/llava_next_l5.py on a model whose bf16 weights (69 GB) leave no room to train on one 80 GB GPU:
# FSDP2 shards them over the ranks (docs/fsdp.md, with the memory table behind the batch sizes below).
# Run: torchrun --standalone --nproc_per_node=8 lppo.py config/llava_next34b_l5.py   (several machines: docs/fsdp.md)
#      (fetch: hf download llava-hf/llava-v1.6-34b-hf --local-dir checkpoints/llava-v1.6-34b-hf)
exec(open("config/llava_next_l5.py").read())
init_from = "llava-hf/llava-v1.6-34b-hf"
out_dir = "out/lppo-llava-next34b-l5"
fsdp = True
batch_size = 8               # per GPU: 64 rollouts per iteration on 8 GPUs; the KV cache of 16 would not fit
minibatch_size = 8
micro_batch_size = 1         # an image is up to 2,928 tokens: one rollout's activations are ~45 GB
save_merged = False          # merging needs every weight whole on one rank: out_dir/peft merges later, on the CPU
