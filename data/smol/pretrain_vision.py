"""
The smol world's CLIP pretraining: the vision tower of smol-llava-base, untrained until now, learns to see
smol-VQA's images (data/smol/vqa.py), with one linear head per question type on its last layer. No language model
takes part: this is the stand-in for the contrastive pretraining that made OpenAI's CLIP before LLaVA used it.

The heads are thrown away; the tower's weights replace the random ones in a copy of smol-llava-base, written to
data/smol/smol-llava-vision-tower/. The projector and the language model come next (sft.py config/smol_vision.py),
as in LLaVA's feature-alignment stage.

    python data/smol/pretrain_vision.py
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository root, for model.py

from common import copy_tokenizer_files, seed_for
from model import VLM, preprocess_image  # noqa: E402
from data.smol import vqa  # noqa: E402

base_dir = os.path.join(here, "smol-llava-base")
out_dir = os.path.join(here, "smol-llava-vision-tower")
steps = 1200
batch_size = 48
learning_rate = 1e-3
warmup = 30
eval_examples = 600
seed = 0


def pixels(examples, size):
    return torch.stack([preprocess_image(img, size) for img, *_ in examples])


def targets(examples):
    """(qtype index, answer index) of each example."""
    types = list(vqa.QUESTIONS)
    return [(types.index(q), vqa.QUESTIONS[q][1].index(a)) for _, q, _, a in examples]


class Heads(nn.Module):
    """One linear classifier per question type, on the tower's last-layer patch tokens side by side: like the
    language model later, a head sees every patch where it is, so "left or right" is a question it can answer."""

    def __init__(self, width, patches):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width * patches, len(answers)) for _, answers in vqa.QUESTIONS.values())

    def loss_and_hits(self, features, tgt):
        losses, hits = [], []
        for f, (t, a) in zip(features, tgt):
            logits = self.heads[t](f)
            losses.append(F.cross_entropy(logits[None], torch.tensor([a])))
            hits.append(int(logits.argmax()) == a)
        return torch.stack(losses).mean(), hits


def features(vlm, x):
    L = vlm.config.vision.num_hidden_layers
    h = vlm.vision_tower(x, {L})[L][:, 1:]
    return F.layer_norm(h, h.shape[-1:]).flatten(1)  # normalised tokens: the wide heads see inputs of unit scale


def main():
    t0 = time.time()
    vlm = VLM.from_pretrained(base_dir)
    tower, size = vlm.vision_tower, vlm.config.vision.image_size
    torch.manual_seed(seed_for("vision heads", seed))
    heads = Heads(vlm.config.vision.hidden_size, vlm.config.image_seq_length)
    params = list(tower.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    # a head reads 36 x 256 inputs: at the tower's learning rate its logits would swing by tens per step
    opt = torch.optim.AdamW([{"params": list(tower.parameters()), "scale": 1.0},
                             {"params": list(heads.parameters()), "scale": 0.05}], lr=learning_rate, weight_decay=0.05)
    held_out = vqa.draw_split(seed, "test", eval_examples)
    tower.train()
    for step in range(steps):
        lr = learning_rate * min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)))
        for g in opt.param_groups:
            g["lr"] = float(lr) * g["scale"]
        batch = []
        for i in range(step * batch_size, (step + 1) * batch_size):  # question types in turn, as in draw_split
            qtype = list(vqa.QUESTIONS)[i % len(vqa.QUESTIONS)]
            img, question, answer = vqa.make_example(vqa.example_rng(seed, "train", i), qtype)
            batch.append((img, qtype, question, answer))
        loss, hits = heads.loss_and_hits(features(vlm, pixels(batch, size)), targets(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy {sum(hits) / len(hits):.2f}, "
                  f"{time.time() - t0:.0f}s", flush=True)
    tower.eval()
    with torch.no_grad():
        hits = []
        for i in range(0, len(held_out), 100):
            chunk = held_out[i:i + 100]
            hits += heads.loss_and_hits(features(vlm, pixels(chunk, size)), targets(chunk))[1]
    by_type = {q: sum(h for h, (_, qq, _, _) in zip(hits, held_out) if qq == q) /
               sum(qq == q for _, qq, _, _ in held_out) for q in vqa.QUESTIONS}
    print(f"held-out accuracy of the heads: {sum(hits) / len(hits):.3f} " +
          " ".join(f"{q} {a:.2f}" for q, a in by_type.items()))
    for p in vlm.parameters():
        p.requires_grad_(False)
    vlm.save_pretrained(out_dir)
    copy_tokenizer_files(base_dir, out_dir)  # the tokenizer, chat template and processor config stay the base's
    print(f"wrote {out_dir} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
