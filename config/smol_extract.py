# Is an early CLIP layer out of distribution for the smol language model? Every layer's projected features of the
# 24 shipped images, compared with the default layer (-2) and with SmolLM2's text embeddings.
# Run: python extract.py config/smol_extract.py
init_from = "data/smol/smol-llava"
image_dir = "data/smol/images"
limit = 0
out_dir = "out/extract-smol"
