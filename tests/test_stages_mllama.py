"""Llama 3.2 Vision (mllama) through every stage on a tiny random checkpoint: evaluate.py's layer sweep, extract.py's
per-layer features, sft.py's LoRA training and lppo.py's L-PPO, each end to end on the CPU, and checked where a result
is known: the sweep's layers and groups, the saved features, a falling SFT loss, and rollout logprobs that the PPO
forward reproduces. The image layer indexes the local ViT's hidden states h_0..h_L (model.MllamaVisionModel)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import extract
import sft
from common import InputError
from lppo import ppo_update, response_forward, score_rollout
from model import (VLM, MllamaVLM, add_lora, encode_batch, extend_per_token, first_eos_mask, generate_responses,
                   batch_images, load_image, load_tokenizer)
from test_evaluate import make_tiny_reward_model
from test_lppo import run_lppo
from test_model_mllama import make_tiny_mllama, make_tokenizer

LOCAL_LAYERS = 5  # config "a" of test_model_mllama: 5 local ViT layers, taps at 1 and 3, cross-attention at 1 and 3
SIZES = [(20, 45), (30, 12), (14, 14), (40, 40)]  # (height, width): 1x3, 3x1, 1x1 and 2x2 tiles of 14 pixels
PROMPTS = ["w5 w30 w60", "w6 w31", "w7 w32 w61 w62", "w8"]
RESPONSES = ["w40 w41 w42 w43", "w50 w51", "w60 w61 w62", "w70 w71 w72 w73 w74"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny mllama policy with its tokenizer, four images of different tile grids, prompt and SFT sets, a tiny
    text-only reward model, and an L-PPO config (read by test_lppo.run_lppo)."""
    d = tmp_path_factory.mktemp("mllama_world")
    make_tiny_mllama(d / "policy")
    # the random head 10 times larger: with std 0.02 it bounds every logit to about +-1, too flat to learn from
    weights = load_file(d / "policy" / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    save_file({**weights, head: weights[head] * 10}, d / "policy" / "model.safetensors", metadata={"format": "pt"})
    make_tokenizer(d / "policy")
    make_tiny_reward_model(d / "rm")
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
    with open(d / "prompts.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"prompt": p, "image": f"images/{i}.png"}) + "\n")
    with open(d / "sft.jsonl", "w") as f:
        for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
            f.write(json.dumps({"image": f"images/{i}.png", "prompt": p, "response": r}) + "\n")
    (d / "tiny_lppo.py").write_text(f"""init_from = {str(d / 'policy')!r}
reward_model = {str(d / 'rm')!r}
prompt_files = [{str(d / 'prompts.jsonl')!r}]
eval_harmful = {str(d / 'prompts.jsonl')!r}
eval_benign = ""
eval_vqa = ""
image_layer = [1, 3]
batch_size = 4
minibatch_size = 4
micro_batch_size = 2
max_new_tokens = 5
eval_max_new_tokens = 3
ppo_epochs = 2
learning_rate = 1e-2
max_iters = 2
eval_interval = 2
checkpoint_interval = 1
lora_targets = ["q_proj", "v_proj"]
device = "cpu"
dtype = "float32"
""")
    return d


def rows_of(world):
    return [{"prompt": p, "image": str(world / "images" / f"{i}.png")} for i, p in enumerate(PROMPTS)]


# ---------------------------------------------------------------------------- evaluate.py

def test_evaluate_sweeps_every_local_vit_layer_in_thirds_with_the_default_last(world, tmp_path, monkeypatch):
    settings = dict(init_from=str(world / "policy"), data_path=str(world / "prompts.jsonl"), max_new_tokens=4,
                    batch_size=3, reward_model=str(world / "rm"), llama_guard="", toxicity_model="", layers=[],
                    device="cpu", dtype="float32", out_dir=str(tmp_path / "eval"))
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    for k, v in settings.items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # image_layer None is the whole local ViT: L = 5 local layers, the default is h_5, the sweep is 1..5
    assert summary["num_layers"] == LOCAL_LAYERS and summary["default_layer"] == LOCAL_LAYERS
    assert [g["layers"] for g in summary["groups"]] == ["1-2", "3-3", "4-5", ""]
    assert [r["layer"] for r in summary["layers"]] == [1, 2, 3, 4, 5]
    responses = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == len(PROMPTS) * LOCAL_LAYERS
    # a response is the model's greedy answer to that prompt alone, with its image seen at that layer
    vlm, tok = VLM.from_pretrained(world / "policy"), load_tokenizer(world / "policy")
    for layer in (1, 4):
        row = next(r for r in responses if r["id"] == "prompts:3" and r["layer"] == layer)
        batch = encode_batch(tok, vlm.config, [row["prompt"]], [load_image(row["image"])])
        tokens, _ = vlm.generate(**batch, image_layer=layer, max_new_tokens=4, eos_token_id=tok.eos_token_id)
        assert row["response"] == evaluate.decode_until_eos(tok, tokens, [tok.eos_token_id])[0]
    judged = [json.loads(line) for line in (tmp_path / "eval" / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == len(responses) and all(isinstance(j["reward"], float) for j in judged)


def test_generate_responses_differs_by_layer_and_batches_like_one_prompt_at_a_time(world):
    vlm, tok = VLM.from_pretrained(world / "policy"), load_tokenizer(world / "policy")
    rows = rows_of(world)
    together = generate_responses(vlm, tok, rows, layer=[1, 2, 3, 5], max_new_tokens=6, batch_size=4)
    alone = [generate_responses(vlm, tok, [r], layer=l, max_new_tokens=6)[0] for r, l in zip(rows, [1, 2, 3, 5])]
    assert together == alone
    # the image reaches the answer: the same prompts at one early layer answer otherwise somewhere
    assert generate_responses(vlm, tok, rows, layer=0, max_new_tokens=6) != \
        generate_responses(vlm, tok, rows, layer=None, max_new_tokens=6)


# ---------------------------------------------------------------------------- extract.py

def test_extract_keeps_every_layers_projector_input_and_scores_only_real_tiles(world, tmp_path, monkeypatch):
    for k, v in dict(init_from=str(world / "policy"), image_dir=str(world / "images"), out_dir=str(tmp_path / "x"),
                     limit=0, batch_size=3, device="cpu", dtype="float32", save_dtype="float32").items():
        monkeypatch.setattr(extract, k, v)
    extract.main()
    vlm = VLM.from_pretrained(world / "policy")
    assert isinstance(vlm, MllamaVLM)
    tok = load_tokenizer(world / "policy")
    images = [load_image(world / "images" / f"{i}.png") for i in range(len(SIZES))]
    batch = encode_batch(tok, vlm.config, [""] * len(images), images)
    with safe_open(str(tmp_path / "x" / "features.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted([f"layer_{l}" for l in range(LOCAL_LAYERS + 1)] + ["valid_tokens"])
        for layer in (0, 2, LOCAL_LAYERS):
            with torch.no_grad():
                expected = vlm.vision_features(batch["pixel_values"], layer, batch["aspect_ratio_ids"],
                                               batch["aspect_ratio_mask"]).flatten(1, 3)
            torch.testing.assert_close(f.get_tensor(f"layer_{layer}"), expected)
        valid = f.get_tensor("valid_tokens").bool()
    tiles = batch["aspect_ratio_mask"][:, 0].sum(1)
    assert tiles.min() < vlm.config.vision.max_num_tiles  # some images have padding tiles
    assert valid.sum(1).tolist() == (tiles * vlm.config.vision.num_patches).tolist()
    stats = json.loads((tmp_path / "x" / "statistics.json").read_text())
    assert stats["default_layer"] == LOCAL_LAYERS and [r["layer"] for r in stats["layers"]] == list(range(6))
    # the statistics see the tokens of real tiles only: fewer than max_tokens here, so all of them
    names = [str(world / "images" / f"{i}.png") for i in range(len(SIZES))]
    n_valid = dict(zip(names, valid.sum(1).tolist()))
    assert stats["fit_tokens"] == sum(n_valid[p] for p in stats["fit_images"])
    assert stats["scored_tokens"] == sum(n_valid[p] for p in stats["scored_images"])
    default = stats["layers"][LOCAL_LAYERS]
    assert default["cos_default"] == pytest.approx(1.0) and default["cka_default"] == pytest.approx(1.0)
    assert stats["layers"][1]["cos_default"] < 0.999  # an early exit changes the features


# ---------------------------------------------------------------------------- sft.py

def test_sft_trains_lora_on_the_language_model_at_drawn_layers_and_its_loss_falls(world, tmp_path, monkeypatch,
                                                                                 capsys):
    seen = []
    original = MllamaVLM.vision_features

    def spy(self, pixel_values, layer=None, aspect_ratio_ids=None, aspect_ratio_mask=None):
        seen.append([self.image_layer_index(l) for l in layer])
        return original(self, pixel_values, layer, aspect_ratio_ids, aspect_ratio_mask)
    monkeypatch.setattr(MllamaVLM, "vision_features", spy)
    settings = dict(init_from=str(world / "policy"), data=str(world / "sft.jsonl"), image_layer=[1, 3, -1],
                    batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, min_lr=1e-2, warmup_iters=0,
                    max_iters=25, eval_interval=1000, log_interval=1, out_dir=str(tmp_path / "out"),
                    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    merge_at_end=True, merged_dir=str(tmp_path / "merged"), device="cpu", dtype="float32")
    for k, v in settings.items():
        assert k in sft.config_keys, k
        monkeypatch.setattr(sft, k, v)
    sft.main()
    losses = [float(x) for x in re.findall(r"iter \d+: loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 25 and sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3, losses
    drawn = [sft.draw_layers([1, 3, -1], 4, sft.seed, step) for step in range(25)]
    assert seen == [[l % (LOCAL_LAYERS + 1) for l in d[m:m + 2]] for d in drawn for m in (0, 2)]
    # the merged checkpoint is an mllama folder whose weights changed in the language model only
    base, merged = VLM.from_pretrained(world / "policy"), VLM.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, MllamaVLM)
    changed = {k.split(".")[0] for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {"language_model"}


def test_a_text_only_sft_row_is_refused_in_one_line_naming_its_file_and_line(world, tmp_path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": None, "prompt": "w5", "response": "w6"}) + "\n")
    tok, cfg = load_tokenizer(world / "policy"), VLM.from_pretrained(world / "policy").config
    with pytest.raises(InputError) as e:
        sft.tokenize_examples(sft.read_sft_jsonl(str(tmp_path / "sft.jsonl")), tok, cfg, 256)
    assert str(e.value) == (f"{tmp_path / 'sft.jsonl'}:1: a row without an image; expected an image with every row "
                            "for a Llama 3.2 Vision model (text-only rows are for the llava family)")


# ---------------------------------------------------------------------------- lppo.py

def rollout(vlm, tok, world, layers, temperature=0.7):
    """A rollout as lppo.py makes one: the prompt batch with its image inputs, layers, sampled tokens and mask; also the
    logprobs generate gave the tokens."""
    rows = rows_of(world)
    ro = encode_batch(tok, vlm.config, [r["prompt"] for r in rows], [load_image(r["image"]) for r in rows])
    ro["layers"] = torch.tensor(layers)
    tokens, logprobs = vlm.generate(ro["input_ids"], ro["attention_mask"], image_layer=ro["layers"], max_new_tokens=6,
                                    temperature=temperature, eos_token_id=tok.eos_token_id, return_logprobs=True,
                                    generator=torch.Generator().manual_seed(0), **batch_images(vlm, ro))
    ro["mask"], _ = first_eos_mask(tokens, tok.eos_token_id)
    ro["tokens"] = tokens.masked_fill(ro["mask"] == 0, vlm.config.pad_token_id)
    return ro, logprobs


def test_the_response_sees_what_the_prompts_last_token_saw():
    cam = torch.tensor([[[[0, 0]], [[1, 0]], [[1, 1]]]])  # (B=1, T=3, images=1, tiles=2)
    extended = extend_per_token(MllamaVLM, {"cross_attention_mask": cam, "aspect_ratio_ids": torch.tensor([[4]])}, 2)
    assert extended["cross_attention_mask"][0, :, 0].tolist() == [[0, 0], [1, 0], [1, 1], [1, 1], [1, 1]]
    assert extended["aspect_ratio_ids"].tolist() == [[4]]  # not per token: unchanged


def test_rollout_logprobs_equal_the_ppo_forwards_at_the_first_epoch(world):
    torch.manual_seed(0)
    vlm, tok = VLM.from_pretrained(world / "policy"), load_tokenizer(world / "policy")
    vlm.add_value_head()
    add_lora(vlm, targets=["q_proj", "v_proj"], r=4, alpha=8)
    with torch.no_grad():  # adapters that change the policy, so that the reference differs from it
        for name, p in vlm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    ro, sampled = rollout(vlm, tok, world, [1, 3, 5, 1])
    assert ro["mask"].sum(1).min() >= 1 and "cross_attention_mask" in ro
    with torch.no_grad():
        logprobs, _, _ = response_forward(vlm, ro, 0.7)
    m = ro["mask"].bool()
    torch.testing.assert_close(logprobs[m], sampled[m], atol=1e-5, rtol=0)
    old, values, ref = score_rollout(vlm, ro, 0.7, micro_batch_size=2)
    torch.testing.assert_close(old[m], sampled[m], atol=1e-5, rtol=0)
    assert (ref - old)[m].abs().max() > 1e-3  # the reference is the policy without its adapters
    with torch.no_grad():  # the same tokens scored at other layers: the image at layer l is what the ratio sees
        ro_other = {**ro, "layers": torch.tensor([5, 5, 1, 3])}
        assert (response_forward(vlm, ro_other, 0.7)[0] - logprobs)[m].abs().max() > 1e-4
    # the first minibatch of the first epoch trains on exactly these logprobs: its ratio is 1, its KL 0
    ro.update(old_logprobs=sampled, old_values=values, advantages=torch.randn(sampled.shape), returns=values)
    params = [p for p in vlm.parameters() if p.requires_grad]
    stats = ppo_update(vlm, torch.optim.SGD(params, lr=1e-2), ro, ppo_epochs=2, minibatch_size=4, micro_batch_size=4,
                       clip_eps=0.2, clip_eps_v=0.2, vf_coef=0.1, grad_clip=1.0, temperature=0.7,
                       generator=torch.Generator().manual_seed(0))
    assert stats["ratio"][0].item() == pytest.approx(1.0, abs=1e-5) and stats["approx_kl"][0].item() < 1e-10
    assert abs(stats["ratio"][1].item() - 1.0) > 1e-5  # the second epoch sees the updated policy


def test_lppo_runs_end_to_end_and_its_adapter_reaches_evaluate(world, tmp_path, monkeypatch):
    p = run_lppo(world, tmp_path / "lppo", "--save_merged=True")
    assert p.returncode == 0, p.stderr[-3000:]
    history = json.loads((tmp_path / "lppo" / "history.json").read_text())["history"]
    assert [h["iter"] for h in history] == [0, 1, 2]
    assert {"refusal@1", "refusal@3", "refusal@-1"} <= set(history[0]) and "score" in history[1]
    assert history[1]["ratio"] == pytest.approx(1.0, abs=0.2) and history[2]["kl"] != 0
    ckpt = torch.load(tmp_path / "lppo" / "ckpt.pt", weights_only=True)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in ckpt["trainable"].items())
    assert all(k.startswith(("language_model.", "value_head.")) for k in ckpt["trainable"])
    assert isinstance(VLM.from_pretrained(tmp_path / "lppo" / "merged"), MllamaVLM)
    # evaluate.py reads the adapter back onto the base checkpoint: the same answers as the merged policy
    settings = dict(init_from=str(world / "policy"), adapter=str(tmp_path / "lppo" / "adapter.safetensors"),
                    data_path=str(world / "prompts.jsonl"), max_new_tokens=4, batch_size=4, layers=[2],
                    reward_model="", llama_guard="", toxicity_model="", device="cpu", dtype="float32",
                    out_dir=str(tmp_path / "eval"))
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    for k, v in settings.items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    responses = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert sorted({r["layer"] for r in responses}) == [2, LOCAL_LAYERS]
    merged, tok = VLM.from_pretrained(tmp_path / "lppo" / "merged"), load_tokenizer(world / "policy")
    rows = [{"prompt": r["prompt"], "image": r["image"]} for r in responses]
    assert generate_responses(merged, tok, rows, layer=[r["layer"] for r in responses], max_new_tokens=4) == \
        [r["response"] for r in responses]
