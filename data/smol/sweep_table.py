"""
The smol ICET sweep (config/smol_sweep.py) or comparison (config/smol_compare.py) in one table and one JSON, read
from the summary.json of evaluate.py's runs: per layer group and image layer, keyword ASR and the reward model's mean
score (where it ran) on the held-out harmful requests, keyword over-refusal on the benign ones, smol-VQA accuracy, and
the out-of-distribution scores of the projected features (extract.py); then smol-VQA per question type.

    python data/smol/sweep_table.py
    python data/smol/sweep_table.py --runs=out/compare-lppo --extract="" --out=out/compare-lppo/table.json
"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))

from common import InputError, atomic_write_json, markdown_table, read_json, run_stage  # noqa: E402

runs = "out/sweep-smol"  # evaluate.py's out_dirs <runs>/harmful, <runs>/benign, <runs>/vqa; a missing one is left out
extract = "out/extract-smol/statistics.json"  # "" = no out-of-distribution columns
out = "out/sweep-smol/table.json"

# (run, summary metric, column)
COLUMNS = [("harmful", "KW-ASR", "keyword ASR %"), ("harmful", "TR", "RM score"),
           ("benign", "KW-ORR", "over-refusal %"), ("vqa", "VQA", "smol-VQA %")]


def main():
    paths = {part: os.path.join(runs, part, "summary.json") for part in ("harmful", "benign", "vqa")}
    summaries = {part: read_json(p) for part, p in paths.items() if os.path.isfile(p)}
    if not summaries:
        raise InputError(f"runs = {runs!r}: none of {', '.join(paths.values())} exists; expected the out_dirs of "
                         "evaluate.py config/smol_sweep.py or config/smol_compare.py")
    first = next(iter(summaries.values()))
    columns = [(part, m, title) for part, m, title in COLUMNS
               if part in summaries and any(r.get(m) is not None for r in summaries[part]["layers"])]
    groups = {part: {g["name"]: g for g in s["groups"]} for part, s in summaries.items()}
    layers = {part: {r["layer"]: r for r in s["layers"]} for part, s in summaries.items()}
    ood = {r["layer"]: r for r in read_json(extract)["layers"]} if extract else {}
    rows = [{"name": g["name"] + (f" ({g['layers']})" if g["layers"] else ""),
             **{m: groups[part].get(g["name"], {}).get(m) for part, m, _ in columns}} for g in first["groups"]]
    for layer in sorted(set().union(*(ls.keys() for ls in layers.values()))):
        rows.append({"name": f"layer {layer}" + (" (default)" if layer == first["default_layer"] else ""),
                     "layer": layer, **{m: layers[part].get(layer, {}).get(m) for part, m, _ in columns},
                     "mahalanobis": ood.get(layer, {}).get("ood"), "fd_default": ood.get(layer, {}).get("fd_default")})
    by_type = summaries["vqa"].get("vqa_by_type", {}) if "vqa" in summaries else {}
    atomic_write_json({"model": first["model"], "adapter": first["adapter"], "default_layer": first["default_layer"],
                       "rows": rows, "vqa_by_type": by_type}, out)
    extra = [("mahalanobis", "Mahalanobis OOD"), ("fd_default", "FD vs default")] if ood else []
    print(markdown_table(["layers"] + [title for _, _, title in columns] + [title for _, title in extra],
                         [[r["name"]] + [r[m] for _, m, _ in columns] + [r.get(k) for k, _ in extra] for r in rows]))
    if by_type:
        types = list(next(iter(by_type.values())))
        print(markdown_table(["smol-VQA % by type"] + types,
                             [[f"layer {layer}"] + [acc[t] for t in types] for layer, acc in by_type.items()]))


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.dirname(here)), "configurator.py")).read())
    run_stage(main)
