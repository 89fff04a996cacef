"""
How far from home are intermediate-layer image features, as the language model sees them? The paper explains the
ICET vulnerability by intermediate-layer embeddings being out of distribution for the LM (its Fig. 2c); this measures
it. For a set of images, CLIP runs once and the hidden state of every layer is kept (saved as safetensors); each layer
then goes through the unchanged projector and is compared with the default layer's projected features and with the
LM's own text-token embeddings:

    cos    mean cosine similarity: token by token against the default layer, over all pairs against the text
    norm   ratio of mean norms (layer / reference)
    CKA    linear CKA against the default layer (Kornblith et al. 2019), 1 = the same geometry up to rotation and scale
    FD     Fréchet distance between Gaussian fits, the FID formula
    OOD    mean Mahalanobis distance under a Gaussian fitted on default-layer features (Lee et al. 2018)

Everything is computed after the projector, in the LM's input space: that is what the LM reads, and it puts the
default layer and the text embeddings in one space. The images are split in two seeded halves: the default layer's
Gaussian fits come from one, every layer (the default too) is scored on the other. The default layer's own FD and
OOD are then the noise floor, what a layer from the default layer's distribution gets; statistics.json and the
table report it.

Llama 3.2 Vision (mllama) feeds its decoder through cross-attention: a layer's features are what its projector reads
with the local ViT stopped at that layer (model.MllamaVisionModel), one vision pass per layer, and the tokens of an
image's padding tiles are left out. They are tiles x 1601 x 7680 values per image and layer for the 11B model: keep
`limit` small.

    python extract.py --init_from=checkpoints/llava-1.5-7b-hf --image_dir=data/cp/images --out_dir=out/extract

A LLaVA-NeXT checkpoint runs CLIP on every anyres crop of an image; the statistics use the crop tokens the LM reads
(the base view and the un-padded grid; image_newline is the same at every layer and is left out).
"""

import json
import os
import random
from pathlib import Path

import torch

from common import (DEVICE, DTYPE, IMAGE_SUFFIXES, InputError, atomic_save_safetensors, atomic_write, atomic_write_json,
                    check_writable_dir, line_plot, markdown_table, run_stage, write_csv)
from model import VLM, layer_features, load_image

# -----------------------------------------------------------------------------
# Statistics on (N, D) feature sets, in float64


def paired_cosine(a, b):
    """Mean cosine similarity of matching rows (the same image token at two layers)."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def mean_pairwise_cosine(a, b):
    """Mean cosine similarity over all pairs (a_i, b_j), for sets with no row-to-row match."""
    # the mean of all N*M dot products of unit vectors is the dot product of their means
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (unit(a).mean(0) @ unit(b).mean(0)).item()


def norm_ratio(a, b):
    """Mean row norm of a over mean row norm of b."""
    return (a.norm(dim=-1).mean() / b.norm(dim=-1).mean()).item()


def linear_cka(x, y):
    """Linear CKA of paired samples x (N, D1) and y (N, D2): |Y'X|_F^2 / (|X'X|_F |Y'Y|_F) after centering."""
    # the feature-space form: D x D products instead of N x N Gram matrices, N being tens of thousands of tokens
    x, y = x - x.mean(0), y - y.mean(0)
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def gaussian_fit(x):
    """Mean and (unbiased) covariance of the rows of x."""
    return x.mean(0), torch.cov(x.T)


def sqrtm_psd(m):
    """Square root of a symmetric positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2, sqrt_cov1=None):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the Fréchet distance between two Gaussians."""
    s1 = sqrtm_psd(cov1) if sqrt_cov1 is None else sqrt_cov1
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), and the latter's matrix is symmetric PSD: eigvalsh is stable there
    cross = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp(min=0).sqrt().sum()
    fd = ((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(0.0, fd.item())  # identical Gaussians can come out a rounding error below zero


def fit_mahalanobis(x, shrinkage):
    """Mean and precision matrix of x, the covariance shrunk toward a multiple of the identity so that it stays
    invertible when tokens are few or nearly collinear."""
    mu, cov = gaussian_fit(x)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * torch.eye(d, dtype=cov.dtype, device=cov.device)
    return mu, torch.linalg.inv(cov)


def mahalanobis_distance(x, mu, precision):
    """sqrt((x - mu)' P (x - mu)) for each row of x."""
    diff = x - mu
    return ((diff @ precision) * diff).sum(-1).clamp(min=0).sqrt()


def layer_statistics(fit, features, default_layer, text_embeddings, shrinkage):
    """One row of statistics per layer. fit (M, D): default-layer features of one half of the images, to which the
    Gaussian (FD) and Mahalanobis (OOD) references are fitted; features {layer: (N, D)}: every layer on the other
    half, paired by row across layers (the same image tokens); text_embeddings (V, D); all in the LM's input space.
    The default layer is scored on images the fit never saw, like every other layer, so its FD and OOD are the noise
    floor: what a layer drawn from the default layer's own distribution gets."""
    fit, ref = fit.double(), features[default_layer].double()
    text = text_embeddings.double()
    mu_fit, cov_fit = gaussian_fit(fit)
    mu_text, cov_text = gaussian_fit(text)
    sqrt_fit, sqrt_text = sqrtm_psd(cov_fit), sqrtm_psd(cov_text)
    mu_ood, precision = fit_mahalanobis(fit, shrinkage)
    rows = []
    for layer, x in sorted(features.items()):
        x = x.double()
        mu, cov = gaussian_fit(x)
        rows.append({
            "layer": layer,
            "cos_default": paired_cosine(x, ref), "norm_default": norm_ratio(x, ref), "cka_default": linear_cka(x, ref),
            "fd_default": frechet_distance(mu_fit, cov_fit, mu, cov, sqrt_fit),
            "cos_text": mean_pairwise_cosine(x, text), "norm_text": norm_ratio(x, text),
            "fd_text": frechet_distance(mu_text, cov_text, mu, cov, sqrt_text),
            "ood": mahalanobis_distance(x, mu_ood, precision).mean().item(),
        })
    return rows


# layer_statistics' keys -> the table's and the plot's names
COLUMNS = {"cos_default": "cos vs default", "norm_default": "norm / default", "cka_default": "CKA vs default",
           "fd_default": "FD vs default", "cos_text": "cos vs text", "norm_text": "norm / text",
           "fd_text": "FD vs text", "ood": "Mahalanobis OOD"}


# -----------------------------------------------------------------------------
# default config values; config/*.py and --key=value override them (configurator.py)

init_from = "checkpoints/llava-1.5-7b-hf"  # llava-hf checkpoint folder
image_dir = "data/cp/images"  # the images (.jpg, .jpeg, .png), at least 2
limit = 64  # a seeded random subset of this many images; 0 = all (every layer of every image is kept in memory)
batch_size = 16
max_tokens = 8192  # image tokens per half (the same ones at every layer) and text embeddings the statistics use
shrinkage = 0.01  # of the default-layer covariance behind the Mahalanobis score
save_dtype = "float16"  # of features.safetensors
seed = 1337
out_dir = "out/extract"
device = DEVICE                             # "cuda" when there is a GPU
dtype = DTYPE                               # "bfloat16" where supported, else "float32"
config_keys = [k for k, v in globals().items() if not k.startswith("_") and not k.isupper()
               and isinstance(v, (int, float, bool, str, list, type(None)))]
# what the configurator checks before any work is done
POSITIVE = ("batch_size", "max_tokens")
CHOICES = {"save_dtype": ("float32", "bfloat16", "float16"), "dtype": ("float32", "bfloat16", "float16")}
# -----------------------------------------------------------------------------


@torch.no_grad()
def main():
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    # everything that can be wrong with the inputs fails here, before minutes of model loading
    check_writable_dir(out_dir)
    if not os.path.isdir(image_dir):
        raise InputError(f"image_dir={image_dir!r}: folder not found; expected a folder of .jpg or .png images")
    images = sorted(str(p) for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        images = sorted(random.Random(seed).sample(images, min(limit, len(images))))
    if len(images) < 2:
        raise InputError(f"image_dir={image_dir!r}: {len(images)} .jpg or .png images; expected at least 2 "
                         "(one half is fitted, the other scored)")
    for p in images:
        load_image(p)
    vlm = VLM.from_pretrained(init_from, device=device, dtype=dtypes[dtype])
    L = vlm.config.vision.num_hidden_layers
    default_layer = vlm.image_layer_index(None)

    # every layer's features of every crop of a batch of images, with the rows of them the LM reads
    # (model.layer_features); some tokens of Llama 3.2 Vision's are padding tiles', marked by valid
    per_layer, crops_per_image, reads, valid = {l: [] for l in range(L + 1)}, [], [], []
    for i in range(0, len(images), batch_size):
        chunk = [load_image(p) for p in images[i:i + batch_size]]
        features, crops, rows, chunk_valid = layer_features(vlm, chunk, range(L + 1))
        for l, h in features.items():
            per_layer[l].append(h.to("cpu", dtypes[save_dtype]))
        crops_per_image += crops
        reads += rows
        if chunk_valid is not None:
            valid.append(chunk_valid)
        print(f"features: {min(i + batch_size, len(images))}/{len(images)} images")
    per_layer = {l: torch.cat(hs) for l, hs in per_layer.items()}
    n_per_crop = per_layer[default_layer].shape[1]  # tokens per crop (Llama 3.2 Vision: per image, tiles x tokens)
    meta = {"images": json.dumps(images), "default_layer": str(default_layer), "model": init_from,
            "crops_per_image": json.dumps(crops_per_image)}
    atomic_save_safetensors({**{f"layer_{l}": h.contiguous() for l, h in per_layer.items()},
                             **({"valid_tokens": torch.cat(valid).to(torch.uint8)} if valid else {})},
                            os.path.join(out_dir, "features.safetensors"), metadata=meta)

    # The default layer's references are fitted on half of the images and every layer, the default included, is
    # scored on the other half: scored on its own fitting data the default layer would look closer to home than any
    # other layer can. The halves are of images, not tokens, as the tokens of one image are correlated.
    order = random.Random(seed).sample(range(len(images)), len(images))
    fit_images, scored_images = sorted(order[:len(images) // 2]), sorted(order[len(images) // 2:])
    g = torch.Generator().manual_seed(seed)
    first_token = [0] + torch.tensor(crops_per_image).cumsum(0).mul(n_per_crop).tolist()

    def tokens(image_idx):
        """Up to max_tokens random image tokens the LM reads of these images, as rows of a layer's flattened
        (crops * tokens)."""
        flat = torch.cat([first_token[i] + reads[i] for i in image_idx])
        return flat[torch.randperm(len(flat), generator=g)[:max_tokens]]

    def project(layer, rows):
        return vlm.multi_modal_projector(per_layer[layer].flatten(0, 1)[rows].to(device, dtypes[dtype])).double()

    fit_rows, scored_rows = tokens(fit_images), tokens(scored_images)
    fit = project(default_layer, fit_rows)
    # the same tokens at every layer, so that per-token cosine and CKA compare like with like
    projected = {l: project(l, scored_rows) for l in per_layer}
    embeddings = vlm.language_model.embed_tokens.weight
    text = embeddings[torch.randperm(embeddings.shape[0], generator=g)[:max_tokens].to(embeddings.device)].double()
    rows = layer_statistics(fit, projected, default_layer, text, shrinkage)
    default_row = next(r for r in rows if r["layer"] == default_layer)
    noise_floor = {"fd_default": default_row["fd_default"], "ood": default_row["ood"]}

    atomic_write_json({"model": init_from, "default_layer": default_layer,
                       "fit_images": [images[i] for i in fit_images],
                       "scored_images": [images[i] for i in scored_images],
                       "fit_tokens": len(fit_rows), "scored_tokens": len(scored_rows), "text_embeddings": len(text),
                       "noise_floor": noise_floor, "layers": rows}, os.path.join(out_dir, "statistics.json"))
    header = ["layer"] + list(COLUMNS.values())
    table = [[f"{r['layer']}" + (" (default)" if r["layer"] == default_layer else "")] + [r[c] for c in COLUMNS]
             for r in rows]
    # the distances a layer from the default layer's own distribution gets: smaller differences are noise
    table.append(["noise floor"] + [noise_floor.get(c) for c in COLUMNS])
    atomic_write(os.path.join(out_dir, "statistics.csv"), lambda tmp: write_csv(tmp, header, table))
    md = markdown_table(header, table)
    atomic_write(os.path.join(out_dir, "statistics.md"), lambda tmp: Path(tmp).write_text(md))
    print(md)
    name = os.path.basename(os.path.normpath(init_from))
    panels = [{"title": title, "mark": default_layer, "series": {name: [(r["layer"], r[c]) for r in rows]}}
              for c, title in COLUMNS.items()]
    atomic_write(os.path.join(out_dir, "statistics.png"), lambda tmp: line_plot(panels, tmp, columns=4))
    print(f"wrote {out_dir}/features.safetensors, statistics.json, statistics.csv, statistics.md, statistics.png")


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    run_stage(main)
