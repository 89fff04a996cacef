"""The smol world's data scripts and its ICET sweep generate with model.generate_responses: on a tiny checkpoint,
build_sft's model_answers, build_preferences' sample_answers and evaluate.py's sweep (config/smol_sweep.py) give
exactly the texts of the batched vlm.generate loops they ran before (kept below as the reference), greedy and sampled
with a seeded generator, so the data files and the rates they write do not change.

The tiny model's EOS logit is scaled up so that some responses end with EOS and others run out of tokens; the
scale that gives both depends on the temperature."""

import json
import statistics

import pytest
import torch
from PIL import Image

import data.smol.build_preferences as build_preferences
import data.smol.build_sft as build_sft
import evaluate
import tiny
from model import VLM, encode_batch, load_image, load_tokenizer

PROMPTS = ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18", "w19", "w20 w21"]
MAX_NEW_TOKENS = 8
BATCH_SIZE = 2  # five rows: batches of 2, 2 and 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint and five rows with images."""
    root = tmp_path_factory.mktemp("smol_data")
    tiny.make_tiny_llava(root / "tiny")
    tiny.make_tiny_tokenizer(root / "tiny")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        pixels = (torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"prompt": prompt, "image": str(root / f"{i}.png")})
    return root / "tiny", rows


def load(folder, eos_scale):
    vlm, tok = VLM.from_pretrained(folder), load_tokenizer(folder)
    with torch.no_grad():
        vlm.lm_head.weight[tok.eos_token_id] *= eos_scale
    return vlm, tok

# -----------------------------------------------------------------------------
# The loops the scripts ran before, verbatim but for the settings passed in


def old_model_answers(vlm, tok, rows, temperature=0.0, generator=None):
    answers, ended = [], []
    for i in range(0, len(rows), BATCH_SIZE):
        chunk = rows[i:i + BATCH_SIZE]
        images = [load_image(r["image"]) for r in chunk]
        batch = encode_batch(tok, vlm.config, [r["prompt"] for r in chunk], images)
        tokens, _ = vlm.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id,
                                 temperature=temperature, generator=generator)
        for row in tokens.tolist():
            finished = tok.eos_token_id in row
            text = tok.decode(row[:row.index(tok.eos_token_id)] if finished else row, skip_special_tokens=True)
            answers.append(text.strip() if finished else build_sft.first_sentences(text))
            ended.append(finished)
    return answers, ended


def old_respond(vlm, tok, rows, layer, temperature, generator):
    out = []
    for i in range(0, len(rows), BATCH_SIZE):
        chunk = rows[i:i + BATCH_SIZE]
        images = [load_image(r["image"]) for r in chunk]
        batch = encode_batch(tok, vlm.config, [r["prompt"] for r in chunk], images)
        tokens, _ = vlm.generate(**batch, image_layer=layer, max_new_tokens=MAX_NEW_TOKENS, temperature=temperature,
                                 eos_token_id=tok.eos_token_id, generator=generator)
        for row in tokens.tolist():
            end = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            out.append(tok.decode(row[:end], skip_special_tokens=True).strip())
    return out


def old_sample_answers(vlm, tok, prompts, generator):
    answers = [None] * len(prompts)
    for _ in range(build_preferences.tries):
        todo = [i for i, a in enumerate(answers) if a is None]
        for s in range(0, len(todo), BATCH_SIZE):
            rows = todo[s:s + BATCH_SIZE]
            batch = encode_batch(tok, vlm.config, [prompts[i] for i in rows], images=None)
            tokens, _ = vlm.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW_TOKENS,
                                     temperature=build_preferences.temperature, top_p=build_preferences.top_p,
                                     eos_token_id=tok.eos_token_id, generator=generator)
            for i, text in zip(rows, tok.batch_decode(tokens, skip_special_tokens=True)):
                text = text.strip()
                if text and not build_preferences.is_refusal(text):
                    answers[i] = text
    return answers

# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,eos_scale", [(0.0, 1), (0.7, 12)])
def test_build_sft_answers_are_those_of_the_old_loop(world, monkeypatch, temperature, eos_scale):
    vlm, tok = load(world[0], eos_scale)
    monkeypatch.setattr(build_sft, "batch_size", BATCH_SIZE)
    monkeypatch.setattr(build_sft, "max_new_tokens", MAX_NEW_TOKENS)
    # the tiny vocabulary has no full stops: mark the answers that ran out of tokens instead
    monkeypatch.setattr(build_sft, "first_sentences", lambda text: f"cut: {text}")
    want, ended = old_model_answers(vlm, tok, world[1], temperature, torch.Generator().manual_seed(3))
    got = build_sft.model_answers(vlm, tok, world[1], temperature, torch.Generator().manual_seed(3))
    assert got == want
    assert any(ended) and not all(ended)  # both endings: stripped at EOS, cut to whole sentences otherwise


@pytest.mark.parametrize("benign", [False, True])
def test_the_smol_sweep_responses_are_those_of_the_old_loop(world, tmp_path, monkeypatch, benign):
    """evaluate.py's sweep says at each layer what the old loop said one layer at a time, though its batches mix
    layers, and its keyword rates count those texts: ASR on a harmful set, over-refusal on a benign one."""
    vlm, tok = load(world[0], 1)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in world[1]))
    want = {layer: old_respond(vlm, tok, world[1], layer, 0.0, None) for layer in (vlm.image_layer_index(None), 2)}
    # the tiny model never refuses: call a word that some of its answers hold a refusal keyword, so those refuse
    word = next(w for text in want[2] for w in text.split() if not all(w in t.split() for t in want[2]))
    monkeypatch.setattr(evaluate, "REFUSAL_KEYWORDS", [word])
    refused = {layer: [evaluate.is_refusal(t) for t in texts] for layer, texts in want.items()}
    for k, v in dict(init_from=str(world[0]), data_path=str(data), layers=[2], batch_size=BATCH_SIZE,
                     max_new_tokens=MAX_NEW_TOKENS, benign=benign, device="cpu", dtype="float32",
                     out_dir=str(tmp_path / "out")).items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    rows = [json.loads(line) for line in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in rows] == sorted(r["layer"] for r in rows)  # 5 rows a layer in batches of 2: one mixed
    for layer, texts in want.items():
        assert [r["response"].strip() for r in rows if r["layer"] == layer] == texts
    assert want[2] != want[vlm.image_layer_index(None)]  # the layer changes what is said
    assert len(set(len(w.split()) for w in want[2])) > 1  # some ended with EOS, some ran out of tokens
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for row in summary["layers"]:
        rate = 100 * sum(refused[row["layer"]]) / len(world[1])
        assert all(want[row["layer"]])  # no empty answer, which keyword ASR would not count as an attack success
        assert row["KW-ORR" if benign else "KW-ASR"] == pytest.approx(rate if benign else 100 - rate)
    assert 0 < sum(refused[2]) < len(world[1])


def test_build_preferences_samples_are_those_of_the_old_loop(world, monkeypatch):
    vlm, tok = load(world[0], 12)
    monkeypatch.setattr(build_preferences, "batch_size", BATCH_SIZE)
    monkeypatch.setattr(build_preferences, "max_new_tokens", MAX_NEW_TOKENS)
    # the tiny model never refuses: call an answer with an odd number of words a refusal, so prompts are drawn again
    monkeypatch.setattr(build_preferences, "is_refusal", lambda text: len(text.split()) % 2 == 1)
    calls = []
    monkeypatch.setattr(vlm, "generate", lambda *a, **k: calls.append(1) or VLM.generate(vlm, *a, **k))
    prompts = [r["prompt"] for r in world[1]]
    want = old_sample_answers(vlm, tok, prompts, torch.Generator().manual_seed(0))
    n_old = len(calls)
    assert build_preferences.sample_answers(vlm, tok, prompts, torch.Generator().manual_seed(0)) == want
    assert len(calls) == 2 * n_old > 6  # the same batches, more than the first pass's three
    assert any(a is not None for a in want)


def test_the_seeds_table_counts_each_criterion_against_the_shipped_model(tmp_path, capsys):
    """data/smol/seeds_table.py: Early is the mean of layers 1 and 4, and a seed meets a criterion by its stated bar."""
    import data.smol.seeds_table as seeds_table

    def write(name, asr1, asr4, asr11, orr, vqa):
        for part, layers in (("own-harmful", {1: asr1, 4: asr4, 11: asr11}), ("xstest-safe", {11: orr}),
                             ("vqa", {11: vqa})):
            (tmp_path / name / part).mkdir(parents=True)
            rows = [{"layer": l, "C-ASR": v, "C-ASR_lo": v - 5, "C-ASR_hi": v + 5, "ORR": v, "ORR_lo": v - 5,
                     "ORR_hi": v + 5, "VQA": v} for l, v in layers.items()]
            (tmp_path / name / part / "summary.json").write_text(json.dumps({"layers": rows}))

    write("test-base", 26.0, 23.0, 11.0, 40.0, 50.0)
    write("test-lppo-s1337", 13.0, 10.0, 13.0, 45.0, 47.0)  # halved (13 <= 13), default +2, ORR +5, VQA -3: all met
    write("test-lppo-s1", 13.5, 9.0, 13.5, 45.5, 53.5)  # each bar missed by half a point
    write("test-sft-s1", 30.0, 30.0, 20.0, 30.0, 50.0)  # scored for one test set only: not counted
    (tmp_path / "test-sft-s1" / "vqa" / "summary.json").unlink()
    write("test-ppo11-s1337", 15.0, 11.0, 13.0, 45.0, 47.0)  # Early 13.0 against L-PPO's 11.5: +1.5
    write("test-ppo11-s1", 10.25, 10.0, 13.0, 45.0, 47.0)  # Early 10.125 against 11.25: -1.125
    seeds_table.main(str(tmp_path))
    out = json.loads((tmp_path / "seeds.json").read_text())
    assert out["summary"]["lppo"]["met"] == [1, 1, 1, 1] and out["summary"]["lppo"]["seeds"] == [1337, 1]
    assert out["summary"]["lppo"]["early_mean"] == (11.5 + 11.25) / 2 and "sft" not in out["summary"]
    assert "| L-PPO at layer 1 (2) | 11.4 (0.2) [11.2, 11.5] |" in capsys.readouterr().out
    paired = out["paired"]["ppo11"]  # each arm against L-PPO, seed by seed
    assert paired["diffs"] == [1.5, -1.125] and paired["lppo_lower"] == 1 and paired["mean"] == 0.1875
    half = 12.706 * statistics.stdev([1.5, -1.125]) / 2 ** 0.5  # Student's t with one degree of freedom
    assert paired["ci"] == [0.1875 - half, 0.1875 + half]
    assert out["advbench"] == {}  # no model scored on AdvBench: an empty table, no numbers


def test_the_seeds_table_pairs_advbench_by_seed_where_both_were_scored(tmp_path, capsys):
    """data/smol/seeds_table.py: AdvBench x images is optional per model; the paired layer-1 difference uses the
    seeds scored there for both arms."""
    import data.smol.seeds_table as seeds_table

    def write(name, parts):
        for part, layers in parts.items():
            (tmp_path / name / part).mkdir(parents=True)
            rows = [{"layer": l, "C-ASR": v, "C-ASR_lo": v - 5, "C-ASR_hi": v + 5, "ORR": v, "ORR_lo": v - 5,
                     "ORR_hi": v + 5, "VQA": v} for l, v in layers.items()]
            (tmp_path / name / part / "summary.json").write_text(json.dumps({"layers": rows}))

    own = {"own-harmful": {1: 20.0, 4: 20.0, 11: 10.0}, "xstest-safe": {11: 40.0}, "vqa": {11: 50.0}}
    write("test-base", {**own, "advbench": {1: 19.0, 4: 13.0, 11: 7.5}})
    write("test-lppo-s1337", {**own, "advbench": {1: 6.0, 11: 4.0}})
    write("test-lppo-s1", {**own, "advbench": {1: 8.0, 11: 5.0}})
    write("test-lppo-s2", own)  # not scored on AdvBench: left out of its table
    write("test-ppo11-s1337", {**own, "advbench": {1: 9.0, 11: 4.0}})
    write("test-ppo11-s1", {**own, "advbench": {1: 7.0, 11: 5.0}})
    write("test-ppo11-s2", {**own, "advbench": {1: 30.0, 11: 5.0}})  # L-PPO's seed 2 has no AdvBench: unpaired
    seeds_table.main(str(tmp_path))
    adv = json.loads((tmp_path / "seeds.json").read_text())["advbench"]
    assert adv["lppo"]["seeds"] == [1337, 1] and adv["lppo"]["adv1_mean"] == 7.0 and "paired" not in adv["lppo"]
    assert adv["ppo11"]["adv1_mean"] == 46.0 / 3 and adv["ppo11"]["adv11_mean"] == 14.0 / 3
    paired = adv["ppo11"]["paired"]
    assert paired["seeds"] == [1337, 1] and paired["diffs"] == [3.0, -1.0] and paired["lppo_lower"] == 1
    half = 12.706 * statistics.stdev([3.0, -1.0]) / 2 ** 0.5
    assert paired["ci"] == [1.0 - half, 1.0 + half]
    assert "| shipped half-way model | - | 19.0 | 7.5 | | |" in capsys.readouterr().out


def test_the_sweep_table_joins_the_three_runs_by_group_and_layer(tmp_path, monkeypatch, capsys):
    """data/smol/sweep_table.py: each column comes from its run's summary.json, and a run not made is left out."""
    import data.smol.sweep_table as sweep_table

    def write(part, metric, by_layer, **extra):
        layers = [{"layer": l, metric: v} for l, v in by_layer.items()]
        groups = [{"name": "Early", "layers": "0-2", metric: by_layer[1]}, {"name": "Average", "layers": "", metric: 0.5}]
        (tmp_path / part).mkdir()
        (tmp_path / part / "summary.json").write_text(json.dumps(
            {"model": "m", "adapter": "", "default_layer": 11, "layers": layers, "groups": groups, **extra}))

    write("harmful", "KW-ASR", {1: 40.0, 11: 16.0})
    write("vqa", "VQA", {1: 46.0, 11: 51.7}, vqa_by_type={"1": {"colour": 90.0}, "11": {"colour": 100.0}})
    for k, v in dict(runs=str(tmp_path), extract="", out=str(tmp_path / "table.json")).items():
        monkeypatch.setattr(sweep_table, k, v)
    sweep_table.main()
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [(r["name"], r["KW-ASR"], r["VQA"]) for r in rows] == [
        ("Early (0-2)", 40.0, 46.0), ("Average", 0.5, 0.5), ("layer 1", 40.0, 46.0), ("layer 11 (default)", 16.0, 51.7)]
    printed = capsys.readouterr().out
    assert "| layers | keyword ASR % | smol-VQA % |" in printed and "over-refusal" not in printed
    assert "| layer 11 | 100.00 |" in printed  # smol-VQA by question type
