"""
The smol world's trained pieces: what its training stages changed, small enough to ship in the repository, so that
a fresh clone assembles the trained world in seconds instead of training it for an hour on a CPU.

Every trained folder is stored against the base model (data/smol/smol-llava-base/, which prepare.py rebuilds
from the SmolLM2 wheel and a seeded tower):
    - a weight the stages never changed is not stored;
    - a weight changed by LoRA adapters (merged into it by sft.py or reward.py) differs from the base by a
      low-rank matrix, stored as its two factors, found by an SVD: rank r instead of out x in numbers;
    - any other changed weight (the pretrained vision tower, the projector, the reward head) is stored whole.
Matrices are stored in int8 with one float32 scale per row (absmax / 127), vectors in float32. The folder's small
files (config.json, reward_train.json) travel in the file's metadata; the tokenizer is the base's.

Storing rounds the weights, so the world the README measures is the ASSEMBLED one: world.py assembles it, and
rebuilds from scratch only with --from_scratch.

    python data/smol/pieces.py export     # after python data/smol/world.py --from_scratch: writes data/smol/pieces/
    python data/smol/pieces.py assemble   # what world.py does when a folder is missing and its piece exists
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

here = Path(__file__).resolve().parent
root = here.parent.parent
sys.path.insert(0, str(root))

from common import InputError, atomic_folder, atomic_save_safetensors, copy_tokenizer_files, run_stage  # noqa: E402

base_dir = "data/smol/smol-llava-base"
pieces_dir = "data/smol/pieces"
# piece file -> (the folder it rebuilds, how the folder's weight names map to the base's)
PIECES = {
    "smol-llava.safetensors": ("data/smol/smol-llava", lambda k: k),
    # a reward model folder (reward.py) holds the Llama backbone as model.* and its head as score.weight
    "smol-rm.safetensors": ("out/smol-rm", lambda k: "language_model." + k),
}
max_rank = 64  # a changed matrix whose change needs a higher rank is stored whole
rank_tol = 1e-4  # singular values below this fraction of the largest one are float noise of the merge
SMALL_FILES = ("config.json", "reward_train.json", "generation_config.json", "preprocessor_config.json")


def quantize(x):
    """int8 rows and their float32 scales: x ~= q * scale[:, None]."""
    x = x.float()
    scale = x.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(x / scale[:, None]).to(torch.int8), scale


def dequantize(q, scale):
    return q.float() * scale[:, None]


def low_rank(delta):
    """(U, V) with delta ~= U @ V and the smallest rank that float noise allows, or None when that rank is above
    max_rank or the factors would not be smaller than the matrix."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = int((s > rank_tol * s[0]).sum()) if s[0] > 0 else 0
    if r > max_rank or r * sum(delta.shape) >= delta.numel():
        return None
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def encode(target, base, to_base):
    """The tensors of a piece: target's weights as changes from base's."""
    out = {}
    for k, t in target.items():
        b = base.get(to_base(k))
        if b is not None and b.shape == t.shape and torch.equal(b, t):
            continue
        if t.ndim == 2 and b is not None and b.shape == t.shape:
            uv = low_rank(t.double() - b.double())
            if uv is not None:
                for name, f in zip("UV", uv):
                    out[f"{k}::{name}"], out[f"{k}::{name}.scale"] = quantize(f)
                continue
        if t.ndim == 2:
            out[f"{k}::W"], out[f"{k}::W.scale"] = quantize(t)
        else:
            out[f"{k}::v"] = t.float()
    return out


def decode(piece, base, to_base, keys):
    """The folder's weights, in the order of `keys`, from the base's and the piece's tensors."""
    sd = {}
    for k in keys:
        if f"{k}::U" in piece:
            u = dequantize(piece[f"{k}::U"], piece[f"{k}::U.scale"])
            v = dequantize(piece[f"{k}::V"], piece[f"{k}::V.scale"])
            sd[k] = base[to_base(k)] + u @ v
        elif f"{k}::W" in piece:
            sd[k] = dequantize(piece[f"{k}::W"], piece[f"{k}::W.scale"])
        elif f"{k}::v" in piece:
            sd[k] = piece[f"{k}::v"]
        else:
            sd[k] = base[to_base(k)]
    return sd


def export(name):
    folder, to_base = PIECES[name]
    target = load_file(os.path.join(root, folder, "model.safetensors"))
    base = load_file(os.path.join(root, base_dir, "model.safetensors"))
    piece = encode(target, base, to_base)
    files = {f: open(os.path.join(root, folder, f)).read() for f in SMALL_FILES
             if os.path.isfile(os.path.join(root, folder, f))}
    meta = {"keys": json.dumps(list(target)), "files": json.dumps(files)}
    path = os.path.join(root, pieces_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save_safetensors({k: v.contiguous() for k, v in piece.items()}, path, metadata=meta)
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB for {folder}")


def assemble(name):
    """Write the folder of piece `name` from the base and the piece (the base must exist: prepare.py)."""
    folder, to_base = PIECES[name]
    path = os.path.join(root, pieces_dir, name)
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: build the world from scratch with python data/smol/world.py "
                         "--from_scratch")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        piece = {k: f.get_tensor(k) for k in f.keys()}
    base = load_file(os.path.join(root, base_dir, "model.safetensors"))
    sd = decode(piece, base, to_base, json.loads(meta["keys"]))
    with atomic_folder(os.path.join(root, folder)) as tmp:
        atomic_save_safetensors(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for f, text in json.loads(meta["files"]).items():
            with open(os.path.join(tmp, f), "w") as out:
                out.write(text)
        copy_tokenizer_files(os.path.join(root, base_dir), tmp)


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("export", "assemble"):
        raise InputError(f"usage: python data/smol/pieces.py export|assemble (got {what!r})")
    for name in PIECES:
        (export if what == "export" else assemble)(name)


if __name__ == "__main__":
    run_stage(main)
