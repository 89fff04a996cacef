# The multi-layer SFT baseline: as config/smol_sft_l1.py, each example drawing its image layer from 0..12, next to
# multi-layer L-PPO (config/smol_lppo_all.py).
# Run: python sft.py config/smol_sft_all.py
exec(open("config/smol_sft_l1.py").read())
image_layer = list(range(0, 13))
out_dir = "out/sft-smol-all"
