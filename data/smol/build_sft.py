"""
Builds data/smol/sft_train.jsonl, the smol world's safety SFT data (config/smol_sft.py trains on it with sft.py):

    harmful TRAIN request + its image  ->  a refusal from refusals.txt (a seeded draw)
    benign TRAIN request + its image   ->  the base model's own answer, at the default image layer

The benign half is self-distillation: the model learns to refuse harmful requests while its answers to everything
else stay its own, so utility is kept. The answer is the greedy one; where that is a refusal (SmolLM2 turns down a
few harmless requests: 19 of the 211, six of them XSTest-style ones that only sound risky), it is sampled again
at temperature 0.7 until it is not, so that the requests the model most readily refuses are taught as answered.
Those answers are generated once and kept in the JSONL; a finished file is reused. Only the TRAIN files are read:
the test files stay held out.
Run: python data/smol/build_sft.py   (103 s on 2 CPU cores; builds the base checkpoint first if it is missing)
"""
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent.parent))  # the repository root: model.py, evaluate.py, data.smol.prepare

from data.smol.prepare import prepare  # noqa: E402
from evaluate import is_refusal  # noqa: E402
from common import InputError, read_prompt_jsonl
from model import VLM, generate_responses, load_tokenizer  # noqa: E402

base_dir = here / "smol-llava-base"
out_path = here / "sft_train.jsonl"
# SmolLM2-135M rambles and repeats itself; the first sentences of its answer are its answer
max_new_tokens = 64
batch_size = 16
# the smol world's images mean nothing: each request is shown with several, so that refusing cannot hinge on the image
images_per_request = 3
# a benign request the base model refuses greedily is sampled again up to this many times, at this temperature
resample_tries = 8
resample_temperature = 0.7


def first_sentences(text):
    """`text` up to its last complete sentence, for an answer that ran out of tokens mid-sentence."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n", text)]
    return text[:ends[-1]].strip() if ends else text.strip()


def model_answers(vlm, tok, rows, temperature=0.0, generator=None, desc="base model answers"):
    """The model's answer to each {"prompt", "image"} row at the checkpoint's default image layer (greedy at T=0)."""
    print(f"smol sft: {desc} ({len(rows)} requests)")
    texts, finished = generate_responses(vlm, tok, rows, None, max_new_tokens, temperature, batch_size=batch_size,
                                         generator=generator, return_finished=True)
    return [t.strip() if done else first_sentences(t) for t, done in zip(texts, finished)]


def answers_without_refusals(vlm, tok, rows, seed):
    """The greedy answer to each row, sampled again (seeded) where it is a refusal; None where every try refused."""
    answers = model_answers(vlm, tok, rows)
    refused = [i for i, a in enumerate(answers) if is_refusal(a)]
    generator = torch.Generator().manual_seed(seed)
    for attempt in range(resample_tries):
        if not refused:
            break
        again = model_answers(vlm, tok, [rows[i] for i in refused], resample_temperature, generator,
                              desc=f"resampling {len(refused)} refusals ({attempt + 1}/{resample_tries})")
        for i, a in zip(refused, again):
            answers[i] = a
        refused = [i for i in refused if is_refusal(answers[i])]
    for i in refused:
        answers[i] = None
    return answers


def build_smol_sft(seed=0):
    """Write sft_train.jsonl unless it exists; return its path."""
    if out_path.exists():
        print(f"smol sft: {out_path} is ready")
        return out_path
    prepare(base_dir)
    refusals = [line.strip() for line in open(here / "refusals.txt") if line.strip()]
    harmful, benign = read_prompt_jsonl(here / "harmful_train.jsonl"), read_prompt_jsonl(here / "benign_train.jsonl")
    rng = random.Random(seed)
    images = sorted(str(p) for p in (here / "images").glob("*.png"))

    def with_images(row):
        """The request's own image and images_per_request - 1 others, relative to this folder (sft_train.jsonl's)."""
        others = rng.sample([im for im in images if im != row["image"]], images_per_request - 1)
        return [os.path.relpath(im, here) for im in [row["image"]] + others]
    t0 = time.time()
    vlm, tok = VLM.from_pretrained(base_dir), load_tokenizer(base_dir)
    # SmolLM2 refuses a few harmless requests ("I'm sorry for any misunderstanding, but as a chatbot ..."):
    # distilling those would teach over-refusal, so they are sampled again, and left out if every try refuses
    answers = answers_without_refusals(vlm, tok, benign, seed)
    own = [(r, a) for r, a in zip(benign, answers) if a is not None]
    examples = [{"image": im, "prompt": r["prompt"], "response": rng.choice(refusals)}
                for r in harmful for im in with_images(r)]
    examples += [{"image": im, "prompt": r["prompt"], "response": a} for r, a in own for im in with_images(r)]
    tmp = out_path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    os.replace(tmp, out_path)
    print(f"smol sft: wrote {out_path} ({len(harmful)} refused and {len(own)} answered requests, "
          f"each with {images_per_request} images; "
          f"{len(benign) - len(own)} benign requests the base model refused {resample_tries + 1} times left out) "
          f"in {time.time() - t0:.0f}s")
    return out_path


if __name__ == "__main__":
    try:
        build_smol_sft()
    except InputError as e:
        sys.exit(f"error: {e}")
