"""
Builds the smol world's preference pairs for its reward model (reward.py, config/smol_rm.py), as HH-RLHF JSONL:

    harmful prompt: chosen = a refusal from refusals.txt,       rejected = the base model's own answer
    benign prompt:  chosen = the base model's own answer,       rejected = a refusal from refusals.txt

so the reward model has to read the prompt: a refusal is right for one kind and wrong for the other.
Answers are sampled from the base SmolLM2 (text only, through its chat template, no image) with a fixed seed,
48 new tokens at most, as lppo.py's rollouts; an answer that itself refuses (evaluate.is_refusal) is drawn again.
Writes prefs_train.jsonl (from *_train.jsonl) and prefs_test.jsonl (from *_test.jsonl, held out), both gitignored.
Each line: {"chosen", "rejected", "kind": "harmful" | "benign"}.
Run: python data/smol/build_preferences.py   (reward.py runs it when the files are missing; 288 s on 2 free CPU
cores for 761 training and 97 held-out pairs: generation is the slow part)
"""
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parents[1]))  # the repository root, for model.py and the stage scripts

from evaluate import is_refusal  # noqa: E402  (the same refusal test the evaluation uses)
from common import InputError, read_prompt_jsonl
from model import VLM, generate_responses, load_tokenizer  # noqa: E402
from reward import format_hh  # noqa: E402

max_new_tokens = 48
temperature = 0.7
top_p = 0.9
batch_size = 32
tries = 4  # draws per prompt before a prompt whose every answer refused is left out
# two answers per training prompt: the reward model sees more than one compliance and one answer per prompt;
# the held-out split keeps one pair per prompt
samples_per_prompt = {"train": 2, "test": 1}


def sample_answers(vlm, tok, prompts, generator):
    """One sampled answer per prompt that is not a refusal (None where all `tries` draws refused)."""
    answers = [None] * len(prompts)
    for _ in range(tries):
        todo = [i for i, a in enumerate(answers) if a is None]
        texts = generate_responses(vlm, tok, [{"prompt": prompts[i], "image": None} for i in todo], None,
                                   max_new_tokens, temperature, top_p, batch_size, generator)
        for i, text in zip(todo, texts):
            text = text.strip()
            if text and not is_refusal(text):
                answers[i] = text
    return answers


def build_split(vlm, tok, split, refusals, seed, samples):
    """Preference records for one split: `samples` pairs for every harmful and benign prompt with usable answers."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    records = []
    prompts_of = {kind: [r["prompt"] for r in read_prompt_jsonl(here / f"{kind}_{split}.jsonl")]
                  for kind in ("harmful", "benign")}
    for _ in range(samples):  # each pass draws a fresh answer and a fresh refusal for every prompt
        for kind, prompts in prompts_of.items():
            answers = sample_answers(vlm, tok, prompts, generator)
            dropped = sum(a is None for a in answers)
            if dropped:
                print(f"smol prefs: {dropped} of {len(prompts)} {kind} {split} prompts left out of a pass, "
                      f"every one of {tries} answers refused")
            for prompt, answer in zip(prompts, answers):
                if answer is None:
                    continue
                refusal = rng.choice(refusals)
                good, bad = (refusal, answer) if kind == "harmful" else (answer, refusal)
                records.append({"chosen": format_hh(prompt, good), "rejected": format_hh(prompt, bad), "kind": kind})
    return records


def build_preferences(out_dir=here, seed=0):
    """Write prefs_train.jsonl and prefs_test.jsonl into out_dir (each unless it exists); return their paths."""
    from data.smol.prepare import prepare
    out_dir = Path(out_dir)
    paths = {split: out_dir / f"prefs_{split}.jsonl" for split in ("train", "test")}
    todo = [split for split, path in paths.items() if not path.exists()]
    if not todo:
        return list(paths.values())
    t0 = time.time()
    folder = prepare()
    vlm, tok = VLM.from_pretrained(folder), load_tokenizer(folder)
    refusals = [line.strip() for line in open(here / "refusals.txt", encoding="utf-8") if line.strip()]
    for split in todo:
        records = build_split(vlm, tok, split, refusals, seed + (split == "test"), samples_per_prompt[split])
        tmp = paths[split].with_name(paths[split].name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, paths[split])
        print(f"smol prefs: wrote {paths[split]} ({len(records)} pairs) after {time.time() - t0:.0f}s")
    return list(paths.values())


if __name__ == "__main__":
    try:
        build_preferences()
    except InputError as e:
        sys.exit(f"error: {e}")
