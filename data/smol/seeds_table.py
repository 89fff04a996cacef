"""
The tables of L-PPO against its controls over seeds (docs/smol-evidence.md), from the scores data/smol/seeds.sh wrote:
out/test-base/ (the shipped model) and out/test-ARM-sSEED/ for the arms of data/smol/seeds.sh. Prints a table per model
and one per arm, and writes every number to out/seeds.json.

    python data/smol/seeds_table.py [--root=out]

Per arm: "Early" C-ASR (the mean of layers 1 and 4) with its mean, standard deviation and range over seeds, and how many
seeds meet each criterion of a repair against the shipped model: layer-1 C-ASR at most half of the shipped model's,
default-layer C-ASR up by at most 2 points, XSTest over-refusal up by at most 5, smol-VQA within 3.
Then each arm against L-PPO at layer 1, paired by seed (a seed fixes the prompts each iteration draws in both): the
mean difference in Early C-ASR, its standard deviation, a 95% t-interval, and in how many seeds L-PPO is the lower.
Last, the same on AdvBench x images at layer 1 for the models scored there (out/test-*/advbench/).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from common import atomic_write_json, read_json  # noqa: E402

ARMS = {"lppo": "L-PPO at layer 1", "sft": "(a) default-layer SFT, matched", "ppo11": "(b) Clip-PPO at the default layer",
        "sft1": "layer-wise SFT at layer 1, matched", "lppoall": "multi-layer L-PPO (layers 0..12)"}
SEEDS = (1337, 1, 2, 3, 4)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student's t, 97.5%


def by_layer(folder, part):
    path = os.path.join(folder, part, "summary.json")
    return {row["layer"]: row for row in read_json(path)["layers"]} if os.path.isfile(path) else None


def scores(folder):
    """A model's numbers, or None while any of its three test sets is unscored."""
    harmful, xstest, vqa = (by_layer(folder, part) for part in ("own-harmful", "xstest-safe", "vqa"))
    if not (harmful and xstest and vqa):
        return None
    m = {f"asr{l}": harmful[l]["C-ASR"] for l in (1, 4, 11)}
    m.update({f"asr{l}_ci": [harmful[l]["C-ASR_lo"], harmful[l]["C-ASR_hi"]] for l in (1, 4, 11)})
    m["early"] = (m["asr1"] + m["asr4"]) / 2
    m["xs_orr"], m["xs_orr_ci"] = xstest[11]["ORR"], [xstest[11]["ORR_lo"], xstest[11]["ORR_hi"]]
    m["vqa11"] = vqa[11]["VQA"]
    adv = by_layer(folder, "advbench")  # optional: AdvBench x images at layers 1 and 11
    if adv:
        m.update({f"adv{l}": adv[l]["C-ASR"] for l in (1, 11)})
        m.update({f"adv{l}_ci": [adv[l]["C-ASR_lo"], adv[l]["C-ASR_hi"]] for l in (1, 11)})
    return m


def criteria(m, base):
    return [m["asr1"] <= base["asr1"] / 2, m["asr11"] - base["asr11"] <= 2, m["xs_orr"] - base["xs_orr"] <= 5,
            abs(m["vqa11"] - base["vqa11"]) <= 3]


def main(root):
    base = scores(os.path.join(root, "test-base"))
    if base is None:
        raise SystemExit(f"{root}/test-base: the shipped model is not scored yet; expected bash data/smol/seeds.sh base")
    arms = {arm: {s: m for s in SEEDS if (m := scores(os.path.join(root, f"test-{arm}-s{s}")))} for arm in ARMS}
    ci = lambda m, k: f"{f1(m[k])} [{f1(m[k + '_ci'][0])}, {f1(m[k + '_ci'][1])}]"
    print("| model | seed | C-ASR layer 1 | layer 4 | default (11) | Early (1, 4) | XSTest safe ORR | smol-VQA |")
    print("|---|---|---|---|---|---|---|---|")
    row = lambda name, s, m: print(f"| {name} | {s} | {ci(m, 'asr1')} | {f1(m['asr4'])} | {ci(m, 'asr11')} | "
                                   f"{f1(m['early'])} | {ci(m, 'xs_orr')} | {f1(m['vqa11'])} |")
    row("shipped half-way model", "-", base)
    for arm, runs in arms.items():
        for s, m in runs.items():
            row(ARMS[arm], s, m)
    print()
    print("| arm (seeds) | Early C-ASR %: mean (sd) [range] | layer 1 | default | XSTest ORR % | smol-VQA % | "
          "seeds meeting: halved / default / ORR / VQA |")
    print("|---|---|---|---|---|---|---|")
    print(f"| shipped half-way model | {f1(base['early'])} | {f1(base['asr1'])} | {f1(base['asr11'])} | "
          f"{f1(base['xs_orr'])} | {f1(base['vqa11'])} | |")
    summary = {}
    for arm, runs in arms.items():
        if not runs:
            continue
        ms = list(runs.values())
        early = [m["early"] for m in ms]
        mean = lambda k: sum(m[k] for m in ms) / len(ms)
        met = [sum(c) for c in zip(*(criteria(m, base) for m in ms))]
        sd = statistics.stdev(early) if len(early) > 1 else 0.0
        summary[arm] = {"seeds": list(runs), "early_mean": sum(early) / len(early), "early_sd": sd,
                        "early_range": [min(early), max(early)], "met": met}
        print(f"| {ARMS[arm]} ({len(ms)}) | {f1(sum(early) / len(early))} ({f1(sd)}) [{f1(min(early))}, "
              f"{f1(max(early))}] | {f1(mean('asr1'))} | {f1(mean('asr11'))} | {f1(mean('xs_orr'))} | "
              f"{f1(mean('vqa11'))} | " + " / ".join(str(n) for n in met) + " |")
    print()
    print("| arm minus L-PPO at layer 1, paired by seed | seeds | Early C-ASR difference: mean (sd) | 95% t-interval | "
          "L-PPO lower in |")
    print("|---|---|---|---|---|")
    paired = {}
    for arm, runs in arms.items():
        if arm == "lppo" or not (p := paired_by_seed(runs, arms["lppo"], "early")):
            continue
        paired[arm] = p
        print(f"| {ARMS[arm]} | {len(p['diffs'])} | {f1(p['mean'])} ({f1(p['sd'])}) | [{f1(p['ci'][0])}, "
              f"{f1(p['ci'][1])}] | {p['lppo_lower']} of {len(p['diffs'])} |")
    advbench = advbench_table(base, arms)
    atomic_write_json({"base": base, "arms": arms, "summary": summary, "paired": paired, "advbench": advbench},
                      os.path.join(root, "seeds.json"))


def f1(x):
    """A percentage as the tables print it, to one decimal."""
    return f"{x:.1f}"


def paired_by_seed(runs, lppo, key):
    """runs[s][key] minus lppo[s][key] over the seeds both have: mean, sd, 95% t-interval, seeds where L-PPO is lower;
    None with fewer than two such seeds."""
    both = [s for s in SEEDS if s in runs and s in lppo]
    if len(both) < 2:
        return None
    d = [runs[s][key] - lppo[s][key] for s in both]
    mean, sd = sum(d) / len(d), statistics.stdev(d)
    half = T975[len(d) - 1] * sd / len(d) ** 0.5
    return {"seeds": both, "diffs": d, "mean": mean, "sd": sd, "ci": [mean - half, mean + half],
            "lppo_lower": sum(x > 0 for x in d)}


def advbench_table(base, arms):
    """Each arm's C-ASR on AdvBench x images (n = 520) at layer 1 and the default, over the seeds scored there, and the
    layer-1 difference from L-PPO at layer 1, paired by seed."""
    print()
    print("| AdvBench x images (n = 520) | seeds | C-ASR layer 1: mean (sd) | default (11) | layer 1 minus L-PPO's, paired: "
          "mean [95% t-interval] | L-PPO lower in |")
    print("|---|---|---|---|---|---|")
    if "adv1" in base:
        print(f"| shipped half-way model | - | {f1(base['adv1'])} | {f1(base['adv11'])} | | |")
    lppo = {s: m for s, m in arms["lppo"].items() if "adv1" in m}
    out = {}
    for arm, runs in arms.items():
        runs = {s: m for s, m in runs.items() if "adv1" in m}
        if not runs:
            continue
        a1, a11 = [m["adv1"] for m in runs.values()], [m["adv11"] for m in runs.values()]
        sd = statistics.stdev(a1) if len(a1) > 1 else 0.0
        out[arm] = {"seeds": list(runs), "adv1_mean": sum(a1) / len(a1), "adv1_sd": sd,
                    "adv11_mean": sum(a11) / len(a11)}
        cells = ["", ""]
        if arm != "lppo" and (p := paired_by_seed(runs, lppo, "adv1")):
            out[arm]["paired"] = p
            cells = [f"{f1(p['mean'])} [{f1(p['ci'][0])}, {f1(p['ci'][1])}]", f"{p['lppo_lower']} of {len(p['diffs'])}"]
        print(f"| {ARMS[arm]} | {len(runs)} | {f1(out[arm]['adv1_mean'])} ({f1(sd)}) | {f1(out[arm]['adv11_mean'])} | "
              f"{cells[0]} | {cells[1]} |")
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a.startswith("--root=")]
    if len(args) != len(sys.argv) - 1:
        raise SystemExit(f"usage: python data/smol/seeds_table.py [--root=out]; got {' '.join(sys.argv[1:])}")
    main(args[0].split("=", 1)[1] if args else "out")
