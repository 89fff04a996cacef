"""FSDP2 (fsdp = True) on two gloo ranks of the CPU against one process, on a tiny model of each family: the same
L-PPO update, the same SFT step, the same greedy rollouts; a checkpoint of the sharded run resumes into the
uninterrupted run; and the settings FSDP2 cannot serve are refused in one line.

Tolerance: two ranks sum each gradient in another order than one process does, so the float32 results differ by
rounding. An update (after - before) is compared within 1e-5 times the largest entry of the one-process update of that
tensor (float32's epsilon is 1.2e-7; the dozens of additions behind each entry leave it a factor of 100 of room), plus
4 float32 ulps of the tensor's largest weight, the rounding of reading an update as a difference of two weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from common import InputError, average_gradients, shard_model, trained_state
from lppo import ppo_update
from model import VLM, encode_batch, encode_images, load_image, load_tokenizer
from ranks import run_ranks
import sft as sft_stage
from sft import collate, count_targets, sft_loss, target_positions, tokenize_examples
from test_lppo import ROOT, lora_policy, run_lppo, world  # noqa: F401 (world: test_lppo's tiny L-PPO world, a fixture)
from test_model_mllama import make_tiny_mllama, make_tokenizer

FAMILIES = ("llava", "llava-next", "mllama")
SIZES = [(20, 45), (30, 12), (14, 14), (40, 40)]  # (height, width): different anyres crops and mllama tile grids
PROMPTS = ["w5 w30 w60", "w6 w31", "w7 w32 w61 w62", "w8"]
RESPONSES = ["w40 w41 w42 w43", "w50 w51", "w60 w61 w62", "w70 w71 w72 w73 w74"]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: folder} of tiny random checkpoints with their tokenizers, and four images beside them."""
    d = tmp_path_factory.mktemp("fsdp")
    for name, make in (("llava", tiny.make_tiny_llava), ("llava-next", tiny.make_tiny_llava_next),
                       ("mllama", make_tiny_mllama)):
        make(d / name)
        (make_tokenizer if name == "mllama" else tiny.make_tiny_tokenizer)(d / name)
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
    return d


def _steps(rank, world_size, folder, result_file, fsdp=True):
    """This rank's share of: greedy rollouts of the four prompts, one L-PPO update (two epochs, SGD with momentum,
    clipped gradients) and one SFT step; the trained weights before and after each, gathered, saved by rank 0."""
    folder = str(folder)
    images = [load_image(f"{folder}/../images/{i}.png") for i in range(4)]
    rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    tok = load_tokenizer(folder)
    vlm = lora_policy(folder)
    if fsdp:
        shard_model(vlm, True, world_size, "cpu")
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    out = {"before": trained_state(vlm, opt)[0]}

    # rollouts: this rank's prompts, greedy, at two image layers; the ranks' rows end at different steps
    batch = encode_batch(tok, vlm.config, PROMPTS[rows], images[rows])
    batch["layers"] = torch.tensor([1, 2, 1, 2][rows])
    extras = {k: v for k, v in batch.items() if k in vlm.image_inputs}
    tokens, _ = vlm.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["layers"],
                             max_new_tokens=5, eos_token_id=tok.convert_tokens_to_ids("w9"), **extras)
    out["tokens"] = torch.nn.functional.pad(tokens, (0, 5 - tokens.shape[1]), value=vlm.config.pad_token_id)

    # L-PPO: a fixed rollout, the same for one process and for the ranks' halves
    g = torch.Generator().manual_seed(1)
    n = 5
    ro = {**encode_batch(tok, vlm.config, PROMPTS, images), "layers": torch.tensor([1, 2, 1, 2]),
          "tokens": torch.randint(5, 100, (4, n), generator=g), "mask": torch.ones(4, n, dtype=torch.long),
          "old_logprobs": -torch.rand(4, n, generator=g) * 4, "old_values": torch.randn(4, n, generator=g),
          "advantages": torch.randn(4, n, generator=g), "returns": torch.randn(4, n, generator=g)}
    ppo_update(vlm, opt, {k: v[rows] for k, v in ro.items()}, ppo_epochs=2, minibatch_size=4 // world_size,
               micro_batch_size=1, clip_eps=0.2, clip_eps_v=0.2,
               vf_coef=0.1, grad_clip=0.5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    out["lppo"], optimizer_state = trained_state(vlm, opt)

    # SFT: one step of the summed response cross-entropy over all four examples' targets, as sft.py takes it
    examples = tokenize_examples([{"image": f"{i}.png", "image_size": SIZES[i], "prompt": p, "response": r,
                                   "where": str(i)} for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))],
                                 tok, vlm.config, vlm.config.text.max_position_embeddings)
    n_target = count_targets(examples) / world_size
    mine = examples[rows]
    input_ids, labels, mask = collate(mine, vlm.config.pad_token_id)
    inputs = encode_images(vlm, images[rows], input_ids)
    pixels = inputs.pop("pixel_values")
    opt.zero_grad(set_to_none=True)
    logits = vlm(input_ids, pixels, [2, 1, 2, 1][rows], mask, logits_at=target_positions(labels), **inputs)
    sft_loss(logits, labels, n_target).backward()
    average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    out["sft"], _ = trained_state(vlm, opt)
    out["optimizer"] = optimizer_state
    gathered = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(gathered, out["tokens"])
        out["tokens"] = torch.cat(gathered)
    if rank == 0:
        torch.save(out, result_file)


def assert_same_update(one, two, before):
    """Each tensor's update by two ranks against its update by one process: within REL_TOL of the largest entry of
    the update, plus 4 float32 ulps of the largest weight (the update is read as a difference of two weights)."""
    assert one.keys() == two.keys() == before.keys() and len(one) > 0
    moved = 0.0
    for k in one:
        delta_one, delta_two = one[k] - before[k], two[k] - before[k]
        scale = delta_one.abs().max().item()
        atol = REL_TOL * scale + 4 * torch.finfo(torch.float32).eps * one[k].abs().max().item()
        torch.testing.assert_close(delta_two, delta_one, rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
        moved = max(moved, scale)
    assert moved > 1e-3  # the update really moved the weights: not a comparison of two no-ops


@pytest.mark.parametrize("family", FAMILIES)
def test_two_fsdp_ranks_take_the_same_lppo_and_sft_steps_and_rollouts_as_one_process(families, tmp_path, family):
    run_ranks(_steps, 2, families / family, tmp_path / "two.pt", timeout=300)
    _steps(0, 1, families / family, tmp_path / "one.pt", fsdp=False)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(one["tokens"], two["tokens"])  # greedy, so rounding would have to flip an argmax
    assert_same_update(one["lppo"], two["lppo"], one["before"])
    assert_same_update(one["sft"], two["sft"], one["lppo"])
    # the optimizer state is gathered whole, keyed by parameter name
    assert one["optimizer"]["state"].keys() == two["optimizer"]["state"].keys()
    assert any("lora_B" in k for k in two["lppo"]) and "value_head.weight" in two["lppo"]


# ---------------------------------------------------------------------------- the stages under torchrun, fsdp=True

def test_an_interrupted_and_resumed_fsdp_run_of_lppo_equals_an_uninterrupted_one(world, tmp_path):
    # two ranks each time: a checkpoint gathered from the shards, loaded and sharded again, continues the same run
    full = run_lppo(world, tmp_path / "full", "--max_iters=2", "--fsdp=True", nproc=2)
    assert full.returncode == 0, full.stderr[-3000:]
    part = run_lppo(world, tmp_path / "part", "--max_iters=1", "--fsdp=True", nproc=2)
    rest = run_lppo(world, tmp_path / "part", "--max_iters=2", "--fsdp=True", "--resume", nproc=2)
    assert part.returncode == rest.returncode == 0, rest.stderr[-3000:]
    assert "resumed from" in rest.stdout and "2 rank(s)" in full.stdout
    cf, cp = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "part"))
    assert cp["iter_num"] == 2 and cf["trainable"].keys() == cp["trainable"].keys()
    assert any("lora_B" in k for k in cf["trainable"]) and "value_head.weight" in cf["trainable"]
    for k in cf["trainable"]:
        assert torch.equal(cf["trainable"][k], cp["trainable"][k]), k
    for k in cf["optimizer"]["state"]:
        assert torch.equal(cf["optimizer"]["state"][k]["exp_avg"], cp["optimizer"]["state"][k]["exp_avg"]), k
    # every statistic of both iterations (the part run also evaluated at its end, and the timings differ)
    for a, b in zip(cf["history"], cp["history"], strict=True):
        assert {k: v for k, v in a.items() if k in b and not k.startswith("t_") and k != "tok_per_s"} == \
            {k: v for k, v in b.items() if k in a and not k.startswith("t_") and k != "tok_per_s"}
    # the adapter files hold the whole gathered tensors, not rank 0's shards
    from safetensors.torch import load_file
    adapter = load_file(tmp_path / "full" / "adapter.safetensors")
    for k in cf["trainable"]:
        assert torch.equal(adapter[k], cf["trainable"][k]), k


def test_sft_with_fsdp_on_two_ranks_takes_the_step_of_one_process(families, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"image": str(families / "images" / f"{i}.png"), "prompt": p, "response": r})
                            + "\n" for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))))
    args = [f"--init_from={families / 'llava'}", f"--data={data}", "--max_iters=1", "--warmup_iters=0",
            "--learning_rate=1e-2", "--grad_clip=1.0", "--device=cpu", "--dtype=float32", "--image_layer=[1, 2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "sft.py", *args, "--batch_size=4", f"--out_dir={tmp_path / 'one'}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                          *args, "--batch_size=2", "--fsdp=True", f"--out_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # the step's gradient, read from AdamW's first moment (Adam's own update would magnify rounding, see test_sft)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["adapter"].keys() == b["adapter"].keys()
    for k, state in a["optimizer"]["state"].items():
        g = state["exp_avg"]
        torch.testing.assert_close(b["optimizer"]["state"][k]["exp_avg"], g, rtol=0,
                                   atol=REL_TOL * g.abs().max().item() + 1e-12, msg=lambda m: f"{k}: {m}")


def test_what_fsdp_cannot_serve_is_refused_in_one_line(families, tmp_path, monkeypatch):
    vlm = VLM.from_pretrained(families / "llava")
    with pytest.raises(InputError, match=r"^fsdp=True shards the model over the ranks, but this run has 1; expected "
                                         r"torchrun with --nproc_per_node of 2 or more \(or fsdp=False\)$"):
        shard_model(vlm, True, 1, "cpu")
    with pytest.raises(InputError, match=r"^fsdp=True with compile=True: .*; expected compile=False$"):
        shard_model(vlm, True, 2, "cpu", compile=True, save_merged=False)
    with pytest.raises(InputError, match=r"^fsdp=True with save_merged=True: merging the adapters"):
        shard_model(vlm, True, 2, "cpu", compile=False, save_merged=True)
    assert shard_model(vlm, False, 1, "cpu", compile=True) is vlm  # without fsdp, nothing to check or do
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"image": None, "prompt": "w5", "response": "w6"}) + "\n")
    for k, v in dict(init_from=str(families / "llava"), data=str(data), fsdp=True, device="cpu", dtype="float32",
                     out_dir=str(tmp_path / "o")).items():
        monkeypatch.setattr(sft_stage, k, v)
    with pytest.raises(InputError, match=r"^fsdp=True with text-only rows in .*mixed.jsonl: a rank whose batch has no "
                                         r"image would skip the image encoder's gather"):
        sft_stage.main()
