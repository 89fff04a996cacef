"""
The comparison the paper's reviewers asked for, on the smol world: one model (a folder, plus an optional adapter
from lppo.py or sft.py) measured at Early / Middle / Late image layers and the default, on the held-out sets, with
the paper's Table 2 grouping. Per layer: keyword ASR on the harmful requests, over-refusal of the benign ones, the
reward model's mean score of the responses to the harmful ones, and smol-VQA accuracy. Greedy.

    python data/smol/compare.py --adapter=out/lppo-smol/adapter.safetensors --out=out/compare-lppo.json
    python data/smol/compare.py --out=out/compare-before.json                      # smol-llava itself

Each group is the mean of its layers; one or two layers stand for a group, to keep a CPU run at a few minutes.
"""
import json
import os
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository root

from evaluate import is_refusal, vqa_accuracy  # noqa: E402
from common import atomic_write_json, read_prompt_jsonl, run_stage
from model import VLM, generate_responses, load_lora, load_tokenizer
from reward import RewardModel  # noqa: E402

model = "data/smol/smol-llava"
adapter = ""  # adapter.safetensors of lppo.py or sft.py; "" = the model as it is
reward_model = "out/smol-rm"
groups = {"early": [0, 1, 2], "middle": [5], "late": [9], "default": [11]}
max_new_tokens = 32
out = "out/compare.json"


def main():
    vlm, tok = VLM.from_pretrained(model), load_tokenizer(model)
    if adapter:
        load_lora(vlm, adapter)
    rm = RewardModel.from_pretrained(reward_model)
    harmful, benign = (read_prompt_jsonl(os.path.join(here, f)) for f in ("harmful_test.jsonl", "benign_test.jsonl"))
    vqa = read_prompt_jsonl(os.path.join(here, "vqa", "vqa_test.jsonl"))
    layers, t0 = {}, time.time()
    for layer in sorted({l for ls in groups.values() for l in ls}):
        rh = generate_responses(vlm, tok, harmful, layer, max_new_tokens, batch_size=25)
        rb = generate_responses(vlm, tok, benign, layer, max_new_tokens, batch_size=24)
        rv = generate_responses(vlm, tok, vqa, layer, 4, batch_size=50)
        layers[layer] = {
            "asr": 100 * (1 - sum(map(is_refusal, rh)) / len(rh)),
            "over_refusal": 100 * sum(map(is_refusal, rb)) / len(rb),
            "rm_score": rm.score([r["prompt"] for r in harmful], rh).mean().item(),
            "vqa": 100 * sum(vqa_accuracy(a, r["answers"]) for a, r in zip(rv, vqa)) / len(vqa),
            "examples": [{"prompt": r["prompt"], "response": a} for r, a in zip(harmful[:4], rh)]}
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.2f}" for k, v in layers[layer].items() if k != "examples") +
              f" ({time.time() - t0:.0f}s)", flush=True)
    table = {g: {m: sum(layers[l][m] for l in ls) / len(ls) for m in ("asr", "over_refusal", "rm_score", "vqa")}
             for g, ls in groups.items()}
    atomic_write_json({"model": model, "adapter": adapter, "groups": groups, "table": table, "layers": layers}, out)
    print(json.dumps(table))


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(here)), "configurator.py")).read())
    run_stage(main)
