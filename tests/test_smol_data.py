"""The smol world's data scripts generate with model.generate_responses: on a tiny checkpoint, build_sft's
model_answers, measure_sft's respond and build_preferences' sample_answers give exactly the texts of the batched
vlm.generate loops they ran before (kept below as the reference), greedy and sampled with a seeded generator, so
the data files they write do not change.

The tiny model's EOS logit is scaled up so that some responses end with EOS and others run out of tokens; the
scale that gives both depends on the temperature."""

import json
import statistics

import pytest
import torch
from PIL import Image

import data.smol.build_preferences as build_preferences
import data.smol.build_sft as build_sft
import data.smol.measure_sft as measure_sft
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


@pytest.mark.parametrize("layer,temperature,eos_scale", [(None, 0.0, 1), (2, 0.0, 1), (None, 0.7, 12)])
def test_measure_sft_responses_are_those_of_the_old_loop(world, monkeypatch, layer, temperature, eos_scale):
    vlm, tok = load(world[0], eos_scale)
    monkeypatch.setattr(measure_sft, "batch_size", BATCH_SIZE)
    monkeypatch.setattr(measure_sft, "max_new_tokens", MAX_NEW_TOKENS)
    want = old_respond(vlm, tok, world[1], layer, temperature, torch.Generator().manual_seed(0))
    assert measure_sft.respond(vlm, tok, world[1], layer, temperature, torch.Generator().manual_seed(0)) == want
    assert len(set(len(w.split()) for w in want)) > 1  # some ended with EOS, some ran out of tokens
    if layer is not None:  # the layer changes what is said
        assert want != old_respond(vlm, tok, world[1], None, temperature, torch.Generator().manual_seed(0))


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
