# The multi-layer variant the paper's discussion asks for: one policy trained over every image layer at once,
# each rollout drawing its layer at random from 0..12 (hidden_states indexing of the 12-block smol tower).
# Run: python lppo.py config/smol_lppo_all.py    then measure refusal at every layer with evaluate.py.
exec(open("config/smol_lppo.py").read())
image_layer = list(range(0, 13))
out_dir = "out/lppo-smol-all"
