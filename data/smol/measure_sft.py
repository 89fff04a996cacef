"""
Measures what the smol safety stage (python sft.py config/smol_sft.py) did, on the held-out test prompts:

    refusal rate on harmful_test.jsonl at the default image layer    (the target: >= 90% after SFT)
    over-refusal rate on benign_test.jsonl at the default layer      (the target: <= 10% after SFT)
    refusal rate on harmful_test.jsonl at every image layer 0..L     (the ICET sweep, in miniature; and
                                                                     over-refusal too with sweep_splits)

with greedy decoding and with temperature 0.7, judged by evaluate.py's refusal keywords. Every response is
written to out_dir/<model name>.jsonl, and the numbers to out_dir/<model name>.json.
Run from the repository root:
    python data/smol/measure_sft.py --model=data/smol/smol-llava-base
    python data/smol/measure_sft.py --model=data/smol/smol-llava
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent.parent))  # the repository root, for model.py and evaluate.py

from evaluate import KEYWORD_JUDGE, is_refusal  # noqa: E402
from common import read_prompt_jsonl, run_stage
from model import VLM, generate_responses, load_tokenizer  # noqa: E402

model = "data/smol/smol-llava"
out_dir = "out/measure_sft"
temperatures = [0.0, 0.7]
sweep_temperatures = [0.0]  # the every-layer sweep; add 0.7 for the sampled sweep too
sweep_splits = ["harmful"]  # add "benign" for over-refusal at every layer too
max_new_tokens = 48  # a refusal says so in its first sentence
batch_size = 25
seed = 0


def respond(vlm, tok, rows, layer, temperature, generator):
    """The model's response to each {"prompt", "image"} row, with the features of image layer `layer`."""
    return [t.strip() for t in generate_responses(vlm, tok, rows, layer, max_new_tokens, temperature,
                                                  batch_size=batch_size, generator=generator)]


def main():
    os.makedirs(out_dir, exist_ok=True)
    name = Path(model).name
    vlm, tok = VLM.from_pretrained(model), load_tokenizer(model)
    L, default = vlm.config.vision.num_hidden_layers, vlm.image_layer_index(None)
    harmful, benign = read_prompt_jsonl(here / "harmful_test.jsonl"), read_prompt_jsonl(here / "benign_test.jsonl")
    runs = [(split, rows, default, t) for split, rows in (("harmful", harmful), ("benign", benign))
            for t in temperatures]
    sets = {"harmful": harmful, "benign": benign}
    runs += [(split, sets[split], l, t) for split in sweep_splits for t in sweep_temperatures for l in range(L + 1)
             if l != default]
    records, summary, t0 = [], [], time.time()
    for split, rows, layer, temperature in runs:
        g = torch.Generator().manual_seed(seed)
        responses = respond(vlm, tok, rows, layer, temperature, g)
        refused = [is_refusal(r) for r in responses]
        rate = 100 * sum(refused) / len(refused)
        summary.append({"split": split, "layer": layer, "temperature": temperature, "refusal_rate": rate})
        records += [{"split": split, "layer": layer, "temperature": temperature, "prompt": r["prompt"],
                     "response": resp, "refusal": ref} for r, resp, ref in zip(rows, responses, refused)]
        print(f"{name}: {split:7s} layer {layer:2d} T={temperature}: refusal {rate:5.1f}% ({time.time() - t0:.0f}s)")
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"model": model, "judge": KEYWORD_JUDGE, "max_new_tokens": max_new_tokens, "default_layer": default,
                   "num_layers": L, "results": summary}, f, indent=2)
    for split in ("harmful", "benign"):  # a few greedy responses at the default layer
        for r in [r for r in records if r["split"] == split and r["layer"] == default and r["temperature"] == 0][:3]:
            print(f"[{split}] {r['prompt']}\n    -> {r['response'][:200]!r}")
    print(f"wrote {out_dir}/{name}.jsonl and {name}.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    exec(open(here.parent.parent / "configurator.py").read())
    run_stage(main)
