"""sft.py: labels mask everything but the response, a tiny VLM memorises its data, image layers reach the
vision tower, --resume continues the same run, and bad data fails with one line naming file and line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sft
import tiny
from common import InputError
from model import VLM, add_lora, encode_batch, load_image, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [("w10 w11 w12", "w40 w41 w42 w43"), ("w13 w14", "w50 w51"),
            ("w15 w16 w17 w18", "w60 w61 w62"), ("w19", "w70 w71 w72 w73 w74")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random llava checkpoint with tokenizer, four images and an SFT JSONL that uses them."""
    root = tmp_path_factory.mktemp("sft")
    ckpt = root / "tiny"
    tiny.make_tiny_llava(ckpt)
    tiny.make_tiny_tokenizer(ckpt)
    (root / "images").mkdir()
    g = torch.Generator().manual_seed(0)
    with open(root / "train.jsonl", "w") as f:
        for i, (prompt, response) in enumerate(EXAMPLES):
            pixels = (torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "prompt": prompt, "response": response}) + "\n")
    return root


def use_config(monkeypatch, **overrides):
    """Set sft.py's config globals, as configurator.py would, for an in-process main()."""
    settings = dict(batch_size=4, learning_rate=1e-2, min_lr=1e-2, warmup_iters=0, max_iters=1, eval_interval=1000,
                    log_interval=1000, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], device="cpu", dtype="float32")
    for k, v in {**settings, **overrides}.items():
        assert k in sft.config_keys, k
        monkeypatch.setattr(sft, k, v)


def test_labels_are_the_response_and_eos_only(world):
    tok = load_tokenizer(world / "tiny")
    cfg = VLM.from_pretrained(world / "tiny").config
    ids, labels, n_cut = sft.build_example(tok, cfg, "w5 w6", "w7 w8", max_len=256)
    prompt = [1, 100] + [tiny.IMAGE_TOKEN] * cfg.image_seq_length + [5, 6, 101]  # <s> USER: <image> w5 w6 ASSISTANT:
    assert ids == prompt + [7, 8, 2]  # the response, then EOS </s>
    assert labels == [-100] * len(prompt) + [7, 8, 2]
    assert n_cut == 0


def test_loss_counts_only_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, -100, -100, -100]])
    expected = -(torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[4]
                 + torch.log_softmax(logits[1, 0], -1)[7]) / 3
    assert torch.allclose(sft.sft_loss(logits, labels, 3), expected)
    masked = logits.clone()
    masked[0, 3:] = 100.0  # positions whose next token is unlabelled, and the last position, do not count
    masked[1, 1:] = -100.0
    assert torch.allclose(sft.sft_loss(masked, labels, 3), expected)
    # the same loss from the logits at the target positions only, as the training step computes them
    at = sft.target_positions(labels)
    assert at.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert torch.allclose(sft.sft_loss(logits[at], labels, 3), expected)


def test_collate_pads_on_the_right_with_ignored_labels():
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    input_ids, labels, mask = sft.collate(examples, pad_id=121)
    assert input_ids.tolist() == [[1, 5, 6], [1, 7, 121]]
    assert labels.tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_long_prompt_is_cut_from_the_left_never_the_image(world, capsys):
    tok = load_tokenizer(world / "tiny")
    cfg = VLM.from_pretrained(world / "tiny").config
    n_image = cfg.image_seq_length
    ids, labels, n_cut = sft.build_example(tok, cfg, "w5 w6 w9 w10", "w7 w8", max_len=n_image + 9)
    assert n_cut == 1 and ids[-7:] == [6, 9, 10, 101, 7, 8, 2] and ids.count(tiny.IMAGE_TOKEN) == n_image
    rows = [{"prompt": "w5 w6 w9 w10", "response": "w7 w8", "image": "a.png", "image_size": (28, 28),
             "where": "x.jsonl:1"}] * 2
    sft.tokenize_examples(rows, tok, cfg, n_image + 9)
    assert capsys.readouterr().out.count("cut from the left") == 1
    with pytest.raises(InputError, match=r"x.jsonl:1: the image tokens, chat template and response need 22 tokens"):
        sft.tokenize_examples(rows, tok, cfg, n_image + 4)


def test_the_unpadded_forward_gives_the_padded_loss_and_gradients(world):
    """The training step runs the decoder on the real tokens only (FastVLM.unpadded_logits): for the same examples, the
    loss and every LoRA gradient are those of the padded forward."""
    tok = load_tokenizer(world / "tiny")
    vlm = add_lora(VLM.from_pretrained(world / "tiny"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if "lora_B" in name:  # trained adapters: the gradients of A are then not zero
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    rows = [("w10 w11 w12 w13 w14 w15 w16", "w40 w41 w42 w43 w44 w45"), ("w13", "w50"), ("w15 w16", "w60 w61 w62"),
            ("w19 w20 w21", "w70")]
    examples = [dict(zip(("input_ids", "labels"), sft.build_example(tok, vlm.config, p, r, 256))) for p, r in rows]
    ids, labels, mask = sft.collate(examples, tiny.PAD_TOKEN)
    assert (mask == 0).sum() >= 20  # there is padding to skip
    pv = torch.randn(len(examples), 3, 28, 28, generator=torch.Generator().manual_seed(0))
    layers, n_target = [1, 2, -2, 3], sft.count_targets(examples)
    params = [p for p in vlm.parameters() if p.requires_grad]
    runs = []
    for unpadded in (False, True):
        logits = vlm(ids, pv, layers, mask, logits_at=sft.target_positions(labels), unpadded=unpadded)
        loss = sft.sft_loss(logits, labels, n_target)
        grads = torch.autograd.grad(loss, params)
        runs.append([loss] + list(grads))
    assert all(g.abs().max() > 1e-4 for g in runs[0][1:])
    for padded, unpadded in zip(*runs):
        assert (padded - unpadded).abs().max().item() <= 1e-5
    left = mask.flip(1)  # left padding is not what collate makes: refused, not silently wrong
    with pytest.raises(InputError, match="not right padding"):
        vlm(ids, pv, layers, left, logits_at=sft.target_positions(labels) & left.bool(), unpadded=True)


def test_data_order_and_layers_depend_only_on_seed_and_step():
    epoch = sft.batch_indices(10, 0, 10, seed=1)
    assert sorted(epoch) == list(range(10))  # one step of size n is one epoch: every example once
    stream = sum((sft.batch_indices(10, s, 3, seed=1) for s in range(10)), [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert sft.batch_indices(10, 7, 3, seed=1) == stream[21:24]
    assert sft.batch_indices(10, 0, 10, seed=2) != epoch
    layers = sft.draw_layers([1, 3, 5], 64, seed=1, step=4)
    assert set(layers) == {1, 3, 5} and layers == sft.draw_layers([1, 3, 5], 64, seed=1, step=4)
    assert sft.draw_layers(None, 3, seed=1, step=0) == [None, None, None]


def test_tiny_vlm_memorises_its_examples(world, tmp_path, monkeypatch):
    use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "train.jsonl"), max_iters=60,
               out_dir=str(tmp_path / "out"), merge_at_end=True, merged_dir=str(tmp_path / "merged"))
    sft.main()
    vlm = VLM.from_pretrained(tmp_path / "merged")
    tok = load_tokenizer(tmp_path / "merged")
    images = [load_image(world / "images" / f"{i}.png") for i in range(len(EXAMPLES))]
    batch = encode_batch(tok, vlm.config, [p for p, _ in EXAMPLES], images)
    tokens, _ = vlm.generate(**batch, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    replies = [tok.decode(row, skip_special_tokens=True) for row in tokens]
    assert replies == [r for _, r in EXAMPLES]


def test_the_projector_scale_bound_pulls_the_image_tokens_under_it(world, tmp_path, monkeypatch):
    def image_rms(folder):
        vlm = VLM.from_pretrained(folder)
        pixels = encode_batch(load_tokenizer(folder), vlm.config, ["w1"], [load_image(world / "images" / "0.png")])
        with torch.no_grad():
            feats = vlm.multi_modal_projector(vlm.vision_features(pixels["pixel_values"]))
            text = vlm.language_model.embed_tokens.weight.pow(2).mean(-1).sqrt().mean()
        return (feats.pow(2).mean(-1).sqrt().mean() / text).item()
    start = image_rms(world / "tiny")
    for name, ratio in (("free", 0.0), ("bound", start / 4)):
        use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "train.jsonl"), max_iters=40,
                   learning_rate=3e-3, min_lr=3e-3, train_projector=True, projector_rms_ratio=ratio,
                   out_dir=str(tmp_path / name), merge_at_end=True, merged_dir=str(tmp_path / name / "merged"))
        sft.main()
    free, bound = image_rms(tmp_path / "free" / "merged"), image_rms(tmp_path / "bound" / "merged")
    # without the bound the tokens keep their scale or grow; with it they come down towards a quarter of the start
    assert free > 0.8 * start and bound < 0.6 * start, (start, free, bound)
    use_config(monkeypatch, projector_rms_ratio=2.0, train_projector=False, out_dir=str(tmp_path / "x"))
    with pytest.raises(InputError, match="projector_rms_ratio=2.0 bounds a projector that trains"):
        sft.main()


def test_text_only_rows_train_beside_image_rows_and_images_reach_their_own_rows(world, tmp_path, monkeypatch):
    # one prompt, three answers: the answer depends on which image the row has, or that it has none ("image": null,
    # a text-only conversation as LLaVA-1.5 mixes in), so it is learnt only if every image reaches its own row
    prompt, answers = "w10 w11", ["w40 w41", "w50 w51", "w60 w61 w62"]
    for i, value in enumerate((0, 255)):  # a black and a white image: far apart even through a random tower
        Image.new("RGB", (28, 28), (value,) * 3).save(world / "images" / f"plain{i}.png")
    rows = [{"image": f"images/plain{i}.png", "prompt": prompt, "response": answers[i]} for i in range(2)]
    rows.append({"image": None, "prompt": prompt, "response": answers[2]})
    (world / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "mixed.jsonl"), max_iters=60,
               batch_size=3, train_projector=True, out_dir=str(tmp_path / "out"), merge_at_end=True,
               merged_dir=str(tmp_path / "merged"))
    sft.main()
    vlm, tok = VLM.from_pretrained(tmp_path / "merged"), load_tokenizer(tmp_path / "merged")
    replies = []
    for images in ([load_image(world / "images" / f"plain{i}.png")] for i in range(2)):
        tokens, _ = vlm.generate(**encode_batch(tok, vlm.config, [prompt], images), max_new_tokens=8,
                                 eos_token_id=tok.eos_token_id)
        replies.append(tok.decode(tokens[0], skip_special_tokens=True))
    tokens, _ = vlm.generate(**encode_batch(tok, vlm.config, [prompt], None), max_new_tokens=8,
                             eos_token_id=tok.eos_token_id)
    replies.append(tok.decode(tokens[0], skip_special_tokens=True))
    assert replies == answers


def test_each_example_reaches_the_vision_tower_at_its_drawn_layer(world, tmp_path, monkeypatch):
    seen = []
    original = VLM.vision_features

    def spy(self, pixel_values, layer=None, image_sizes=None):
        seen.append([self.image_layer_index(l) for l in layer])
        return original(self, pixel_values, layer, image_sizes)
    monkeypatch.setattr(VLM, "vision_features", spy)
    use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "train.jsonl"), max_iters=3,
               image_layer=[1, 3, -1], batch_size=2, gradient_accumulation_steps=2, out_dir=str(tmp_path))
    sft.main()
    drawn = [sft.draw_layers([1, 3, -1], 4, sft.seed, step) for step in range(3)]
    assert seen == [[l % 5 for l in d[m:m + 2]] for d in drawn for m in (0, 2)]  # -1 is layer 4 of 4
    assert len({l for d in drawn for l in d}) > 1


def test_resume_refuses_a_changed_run(world, tmp_path, monkeypatch):
    use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "train.jsonl"), out_dir=str(tmp_path))
    sft.main()
    use_config(monkeypatch, resume=True, seed=2)
    with pytest.raises(InputError, match="ckpt.pt: seed was 1337, now 2; --resume needs the same value"):
        sft.main()
    use_config(monkeypatch, resume=True, out_dir=str(tmp_path / "empty"))
    with pytest.raises(InputError, match="empty/ckpt.pt: no checkpoint to resume from"):
        sft.main()


def run_sft(*args):
    p = subprocess.run([sys.executable, "sft.py", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_resume_continues_exactly_the_uninterrupted_run(world, tmp_path):
    config = tmp_path / "tiny_sft.py"
    config.write_text(f"init_from = {str(world / 'tiny')!r}\ndata = {str(world / 'train.jsonl')!r}\n"
                      "image_layer = [1, 2, 3]\nbatch_size = 1\ngradient_accumulation_steps = 2\n"
                      "lora_dropout = 0.1\nlearning_rate = 1e-2\nwarmup_iters = 2\nlr_decay_iters = 6\n"
                      "eval_interval = 2\nlog_interval = 1\ndevice = 'cpu'\ndtype = 'float32'\n")
    rc, out, err = run_sft(config, f"--out_dir={tmp_path / 'whole'}", "--max_iters=6")
    assert rc == 0, err
    assert "iter 6: loss" in out and "tokens/s" in out
    rc, _, err = run_sft(config, f"--out_dir={tmp_path / 'parts'}", "--max_iters=3")
    assert rc == 0, err
    rc, out, err = run_sft(config, f"--out_dir={tmp_path / 'parts'}", "--max_iters=6", "--resume")
    assert rc == 0, err
    assert "resuming from" in out and "at iteration 3" in out
    whole, parts = (load_file(tmp_path / d / "adapter.safetensors") for d in ("whole", "parts"))
    assert whole.keys() == parts.keys() and len(whole) > 0
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k


def test_bad_data_is_one_line_naming_file_and_line(world, tmp_path):
    def write(name, *lines):
        (tmp_path / name).write_text("".join(l + "\n" for l in lines))
        return str(tmp_path / name)
    good = json.dumps({"image": str(world / "images" / "0.png"), "prompt": "w5", "response": "w6"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    cases = [
        (write("a.jsonl", good, "{not json"), r"a.jsonl:2: not valid JSON \(Expecting property name"),
        (write("b.jsonl", good, '{"image": "x.png", "prompt": 5, "response": "w6"}'),
         r"b.jsonl:2: field 'prompt' is 5, expected a string"),
        (write("c.jsonl", json.dumps({"image": str(world / "images" / "0.png"), "prompt": "w5"})),
         r"c.jsonl:1: field 'response' is missing, expected a string"),
        (write("h.jsonl", json.dumps({"image": 3, "prompt": "w5", "response": "w6"})),
         r"h.jsonl:1: field 'image' is 3, expected a string \(or null: no image\)"),
        (write("c.jsonl", json.dumps({"image": str(world / "images" / "0.png"), "prompt": "w5"})),
         r"c.jsonl:1: field 'response' is missing, expected a string"),
        (write("d.jsonl", json.dumps({"image": "nope.png", "prompt": "w5", "response": "w6"})),
         r"d.jsonl:1: image file .*nope.png not found"),
        (write("e.jsonl", "", "  "), r"e.jsonl: no examples"),
        (write("f.jsonl", "[1, 2]"), r"f.jsonl:1: expected a JSON object, got a JSON list"),
        (str(tmp_path / "missing.jsonl"), r"missing.jsonl: file not found"),
        (write("g.jsonl", good, json.dumps({"image": "broken.png", "prompt": "w5", "response": "w6"})),
         r"g.jsonl:2: .*broken.png: not a readable image \(UnidentifiedImageError\)"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            sft.read_sft_jsonl(path)
    rc, out, err = run_sft(f"--init_from={world / 'tiny'}", f"--data={cases[0][0]}", f"--out_dir={tmp_path}")
    assert rc == 1 and err.strip().splitlines() == [f"error: {cases[0][0]}:2: not valid JSON (Expecting property "
                                                    "name enclosed in double quotes at column 2)"]


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    use_config(monkeypatch, init_from=str(world / "tiny"), data=str(world / "train.jsonl"), out_dir=str(tmp_path),
               max_iters=3, eval_interval=1)
    calls = {"n": 0}
    real_loss = sft.sft_loss

    def diverging_loss(logits, labels, n_target):  # the second iteration's loss is NaN
        calls["n"] += 1
        loss = real_loss(logits, labels, n_target)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(sft, "sft_loss", diverging_loss)
    with pytest.raises(InputError, match=r"iteration 2: loss nan.*stopped before the optimizer step"):
        sft.main()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 1
    adapter = load_file(tmp_path / "adapter.safetensors")
    for k, v in adapter.items():
        assert torch.isfinite(v).all() and torch.equal(v, ckpt["adapter"][k]), k


def test_two_ranks_take_the_same_step_as_one_rank_when_response_lengths_differ(world, tmp_path):
    # EXAMPLES' responses have 4, 2, 3 and 5 tokens: a per-rank token mean would weight the two halves unequally
    args = [f"--init_from={world / 'tiny'}", f"--data={world / 'train.jsonl'}", "--max_iters=1", "--warmup_iters=0",
            "--learning_rate=1e-2", "--grad_clip=0.0", "--device=cpu", "--dtype=float32"]
    rc, _, err = run_sft(*args, "--batch_size=4", f"--out_dir={tmp_path / 'one'}")
    assert rc == 0, err
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                        *args, "--batch_size=2", f"--out_dir={tmp_path / 'two'}"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # the step's gradient, read from AdamW's first moment (0.1 g after one step): Adam's own update, g / (|g| + eps),
    # would turn float noise in near-zero gradients into whole steps
    one, two = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["optimizer"]["state"] for d in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 0
    assert max(one[i]["exp_avg"].abs().max().item() for i in one) > 1e-4  # a real gradient, not zeros
    for i in one:
        torch.testing.assert_close(two[i]["exp_avg"], one[i]["exp_avg"], rtol=1e-4, atol=1e-9, msg=f"parameter {i}")
