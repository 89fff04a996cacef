"""
Does a smol model read its images? Held-out smol-VQA accuracy per question type at the given image layers, next to
the same questions asked with the image replaced by noise and by another question's image, and the chance level.

    python data/smol/measure_vqa.py --model=data/smol/smol-llava-vision --layers=[11,2]
"""
import json
import os
import random
import sys
import time

from PIL import Image

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository root

from evaluate import vqa_accuracy  # noqa: E402
from common import read_prompt_jsonl, run_stage
from model import VLM, generate_responses, load_tokenizer  # noqa: E402
from data.smol import vqa  # noqa: E402

model = "data/smol/smol-llava-vision"
data = os.path.join(here, "vqa", "vqa_test.jsonl")
layers = [-2]  # image layers to measure; -2 is the default
max_new_tokens = 4
batch_size = 50
out = ""  # also write the results here as JSON
seed = 0


def accuracy_by_type(rows, responses):
    by_type = {}
    for row, response in zip(rows, responses):
        by_type.setdefault(row["type"], []).append(vqa_accuracy(response, row["answers"]))
    result = {t: sum(v) / len(v) for t, v in by_type.items()}
    result["all"] = sum(sum(v) for v in by_type.values()) / sum(len(v) for v in by_type.values())
    return result


def main():
    t0 = time.time()
    rows = read_prompt_jsonl(data)
    vlm, tok = VLM.from_pretrained(model), load_tokenizer(model)
    rng = random.Random(seed)
    noise_dir = os.path.join(here, "vqa", "noise_images")
    os.makedirs(noise_dir, exist_ok=True)
    noise_rows, swapped_rows = [], []
    for i, row in enumerate(rows):
        path = os.path.join(noise_dir, f"{i:05d}.png")
        if not os.path.exists(path):
            pixels = bytes(rng.randrange(256) for _ in range(vqa.SIZE * vqa.SIZE * 3))
            Image.frombytes("RGB", (vqa.SIZE, vqa.SIZE), pixels).save(path)
        noise_rows.append({**row, "image": path})
        # another question's image of another type: its answer is unrelated to this question
        swapped_rows.append({**row, "image": rows[(i + 7) % len(rows)]["image"]})
    chance = {t: 1 / len(answers) for t, (_, answers) in vqa.QUESTIONS.items()}
    chance["all"] = sum(chance.values()) / len(chance)
    results = {"model": model, "chance": chance, "layers": {}}
    for layer in layers:
        results["layers"][layer] = {}
        for name, these in (("images", rows), ("noise", noise_rows), ("swapped", swapped_rows)):
            if name != "images" and layer != layers[0]:
                continue  # the controls once, at the first layer
            responses = generate_responses(vlm, tok, these, layer, max_new_tokens, batch_size=batch_size)
            acc = accuracy_by_type(these, responses)
            results["layers"][layer][name] = acc
            print(f"{model} layer {layer} {name:8s} " + " ".join(f"{t} {a:.2f}" for t, a in acc.items()) +
                  f" ({time.time() - t0:.0f}s)", flush=True)
    print("chance           " + " ".join(f"{t} {a:.2f}" for t, a in chance.items()))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(here)), "configurator.py")).read())
    run_stage(main)
