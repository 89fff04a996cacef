"""
The smol ICET sweep in one table and one JSON: per image layer, keyword ASR on the held-out harmful requests,
over-refusal on the held-out benign ones (measure_sft.py), smol-VQA accuracy (measure_vqa.py) and the
out-of-distribution scores of the projected features (extract.py).

    python data/smol/sweep_table.py --refusals=out/measure-smol/smol-llava.json --vqa=out/vqa-smol-llava.json \
        --extract=out/extract-smol/statistics.json --out=out/smol-sweep.json
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))

from common import atomic_write_json, markdown_table, read_json, run_stage  # noqa: E402

refusals = "out/measure-smol/smol-llava.json"
vqa = "out/vqa-smol-llava.json"
extract = "out/extract-smol/statistics.json"
out = "out/smol-sweep.json"


def main():
    ref = read_json(refusals)
    L, default = ref["num_layers"], ref["default_layer"]
    rate = {(r["split"], r["layer"]): r["refusal_rate"] for r in ref["results"] if r["temperature"] == 0}
    vqa_layers = read_json(vqa)["layers"] if vqa else {}
    ood = {r["layer"]: r for r in read_json(extract)["layers"]} if extract else {}
    rows = []
    for layer in range(L + 1):
        key = str(layer) if str(layer) in vqa_layers else str(layer - L - 1)  # measure_vqa may name -2 for 11
        v = vqa_layers.get(key, {}).get("images", {})
        rows.append({"layer": layer, "asr": 100 - rate[("harmful", layer)] if ("harmful", layer) in rate else None,
                     "over_refusal": rate.get(("benign", layer)), "vqa": 100 * v["all"] if v else None,
                     "mahalanobis": ood.get(layer, {}).get("ood"), "fd_default": ood.get(layer, {}).get("fd_default")})
    atomic_write_json({"model": ref["model"], "default_layer": default, "layers": rows}, out)
    header = ["layer", "keyword ASR %", "over-refusal %", "smol-VQA %", "Mahalanobis OOD", "FD vs default"]
    table = [[f"{r['layer']}" + (" (default)" if r["layer"] == default else "")] +
             [r[k] for k in ("asr", "over_refusal", "vqa", "mahalanobis", "fd_default")] for r in rows]
    print(markdown_table(header, table))


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(here)), "configurator.py")).read())
    run_stage(main)
