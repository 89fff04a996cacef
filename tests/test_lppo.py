"""lppo.py end to end on a tiny random world: determinism, resume, DDP, safety valves and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tiny
from ranks import run_ranks
from lppo import ppo_update
from model import VLM, add_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llava policy, a tiny Llama reward model on the same tokenizer, prompts with images, a config."""
    d = tmp_path_factory.mktemp("lppo_world")
    tiny.make_tiny_llava(d / "policy")
    tiny.make_tiny_tokenizer(d / "policy")
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=tiny.VOCAB, num_labels=1,
                                                    pad_token_id=tiny.PAD_TOKEN, max_position_embeddings=512))
    rm.save_pretrained(d / "rm")
    tiny.make_tiny_tokenizer(d / "rm")
    (d / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (30 + i, 28), (40 * i, 90, 200 - 30 * i)).save(d / "images" / f"{i}.png")
    for name, n in (("train", 12), ("test", 4)):
        with open(d / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"w{5 + i} w{30 + i} w{60 + i}", "image": f"images/{i % 4}.png"}) + "\n")
    with open(d / "vqa.jsonl", "w") as f:  # a held-out VQA set: rows with their human answers
        for i in range(4):
            f.write(json.dumps({"prompt": f"w{8 + i}", "image": f"images/{i}.png", "answers": ["w9"] * 10}) + "\n")
    cfg = d / "tiny_lppo.py"
    cfg.write_text(f"""init_from = {str(d / 'policy')!r}
reward_model = {str(d / 'rm')!r}
prompt_files = [{str(d / 'train.jsonl')!r}]
eval_harmful = {str(d / 'test.jsonl')!r}
eval_benign = {str(d / 'test.jsonl')!r}
eval_vqa = {str(d / 'vqa.jsonl')!r}
image_layer = 2
batch_size = 4
minibatch_size = 4
micro_batch_size = 2
max_new_tokens = 6
eval_max_new_tokens = 4
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


def run_lppo(world, out_dir, *args, nproc=1):
    cmd = [sys.executable, str(ROOT / "lppo.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "lppo.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + [str(world / "tiny_lppo.py"), f"--out_dir={out_dir}", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def trainable(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)


def test_a_run_is_deterministic_under_a_seed_and_writes_its_outputs(world, tmp_path):
    a, b = run_lppo(world, tmp_path / "a", "--max_iters=1"), run_lppo(world, tmp_path / "b", "--max_iters=1")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-2000:]
    ca, cb = trainable(tmp_path / "a"), trainable(tmp_path / "b")
    assert ca["iter_num"] == 1 and set(ca["trainable"]) == set(cb["trainable"])
    assert any("lora_B" in k for k in ca["trainable"]) and "value_head.weight" in ca["trainable"]
    for k in ca["trainable"]:
        assert torch.equal(ca["trainable"][k], cb["trainable"][k]), k
    assert any(ca["trainable"][k].abs().sum() > 0 for k in ca["trainable"] if "lora_B" in k)  # it learned something
    # the scores are normalised by the first rollouts' mean and spread, those of the starting policy
    hist1 = json.loads((tmp_path / "a" / "history.json").read_text())["history"][1]
    assert ca["score_stats"][0] == pytest.approx(hist1["score"], abs=1e-4) and ca["score_stats"][1] > 0
    for f in ("adapter.safetensors", "peft/adapter_model.safetensors", "peft/adapter_config.json", "history.json"):
        assert (tmp_path / "a" / f).is_file(), f
    hist = json.loads((tmp_path / "a" / "history.json").read_text())["history"]
    # the evaluation before training: refusal and VQA accuracy at the trained and the default layer, over-refusal
    assert {"refusal@2", "refusal@-2", "vqa@2", "vqa@-2", "over_refusal"} <= set(hist[0])
    assert all(0 <= hist[0][k] <= 1 for k in ("vqa@2", "vqa@-2"))
    for key in ("score", "kl", "rlhf_reward", "entropy", "clipfrac", "approx_kl", "vf_loss", "ratio", "resp_len",
                "tok_per_s"):
        assert key in hist[1], key


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(world, tmp_path):
    full = run_lppo(world, tmp_path / "full", "--max_iters=2")
    part = run_lppo(world, tmp_path / "part", "--max_iters=1")
    rest = run_lppo(world, tmp_path / "part", "--max_iters=2", "--resume")
    assert full.returncode == part.returncode == rest.returncode == 0, rest.stderr[-2000:]
    assert "resumed from" in rest.stdout
    cf, cp = trainable(tmp_path / "full"), trainable(tmp_path / "part")
    assert cp["iter_num"] == 2
    for k in cf["trainable"]:
        assert torch.equal(cf["trainable"][k], cp["trainable"][k]), k
    assert cf["kl_coef"] == cp["kl_coef"]


def test_torchrun_with_two_ranks_runs_two_iterations(world, tmp_path):
    p = run_lppo(world, tmp_path / "ddp", "--max_iters=2", nproc=2)
    assert p.returncode == 0, (p.stdout[-1500:], p.stderr[-3000:])
    assert "2 rank(s)" in p.stdout and trainable(tmp_path / "ddp")["iter_num"] == 2


def test_exploding_kl_stops_the_run_and_keeps_the_last_good_checkpoint(world, tmp_path):
    # iteration 1 rolls out with fresh adapters (KL exactly 0); after its update, iteration 2's KL is positive
    p = run_lppo(world, tmp_path / "kl", "--max_kl=0.0", "--kl_estimator=k3", "--learning_rate=0.5")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: iteration 2: KL")
    assert trainable(tmp_path / "kl")["iter_num"] == 1


@pytest.mark.parametrize("override,message", [
    ("--prompt_files=['/nonexistent/prompts.jsonl']", "/nonexistent/prompts.jsonl"),
    ("--image_layer=9", "image layer 9 is out of range"),
    ("--lerning_rate=1", "unknown config key 'lerning_rate'"),
    ("--temperature=0", "temperature=0.0; expected a number > 0"),
    ("--top_p=0.9", "top_p=0.9; expected one of 1.0"),
    ("--dtype=float16", "dtype='float16'; expected one of 'float32', 'bfloat16'"),
    ("--kl_estimator=k9", "kl_estimator='k9'; expected one of"),
    ("--batch_size=0", "batch_size=0; expected a number > 0"),
    ("--micro_batch_size=-2", "micro_batch_size=-2; expected a number > 0"),
    ("--max_new_tokens=0", "max_new_tokens=0; expected a number > 0"),
    ("--lora_r=0", "lora_r=0; expected a number > 0"),
    ("--batch_size=None", "batch_size=None has type NoneType, expected int"),
    ("--image_layer=None", "image_layer=None has type NoneType, expected int or list"),
])
def test_bad_input_is_one_clear_line(world, tmp_path, override, message):
    p = run_lppo(world, tmp_path / "bad", override)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, p.stderr[-1500:]


def test_missing_image_and_empty_prompt_set_are_named(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w5", "image": "images/none.png"}) + "\n")
    p = run_lppo(world, tmp_path / "o", f"--prompt_files=['{bad}']", f"--image_root={world}")
    assert p.returncode == 1 and "images/none.png: image file not found" in p.stderr.strip().splitlines()[-1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run_lppo(world, tmp_path / "o", f"--prompt_files=['{empty}']")
    assert p.returncode == 1 and "empty.jsonl: 0 prompts" in p.stderr.strip().splitlines()[-1]
    short = tmp_path / "short.jsonl"  # listed twice: drawn twice as often, still too few for one batch of 4
    short.write_text(json.dumps({"prompt": "w5", "image": "images/0.png"}) + "\n")
    p = run_lppo(world, tmp_path / "o", f"--prompt_files=['{short}', '{short}']", f"--image_root={world}")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last == f"error: {short}: 2 prompts, expected at least batch_size x ranks = 4", last


def test_an_empty_eval_set_a_corrupt_image_and_an_out_dir_that_is_a_file_fail_at_start_up(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run_lppo(world, tmp_path / "o", f"--eval_benign={empty}")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == \
        f"error: {empty}: no prompts; expected at least one held-out prompt (or eval_benign='')"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "w5", "image": "broken.png", "id": "r1"}) + "\n")
    p = run_lppo(world, tmp_path / "o", f"--eval_harmful={rows}")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"error: prompt r1: {tmp_path / 'broken.png'}: not a readable image " \
        "(UnidentifiedImageError)"
    (tmp_path / "afile").write_text("x")
    p = run_lppo(world, tmp_path / "afile")
    assert p.returncode == 1 and "is a file; expected a folder" in p.stderr.strip().splitlines()[-1]


def test_a_prompt_longer_than_the_context_is_cut_with_a_notice(world, tmp_path):
    long = tmp_path / "long.jsonl"
    words = " ".join(f"w{3 + i % 90}" for i in range(400))  # the tiny context holds 256 tokens
    long.write_text("".join(json.dumps({"prompt": words, "image": str(world / "images" / "0.png")}) + "\n"
                            for _ in range(4)))
    p = run_lppo(world, tmp_path / "o", f"--prompt_files=['{long}']", "--max_iters=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "note: 1 prompts are longer than the 250 tokens" in p.stdout


def test_a_planted_checkpoint_runs_no_code_on_resume(world, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "o").mkdir()
    torch.save({"config": Payload()}, tmp_path / "o" / "ckpt.pt")
    p = run_lppo(world, tmp_path / "o", "--resume")
    assert p.returncode == 1 and not marker.exists()
    assert "ckpt.pt: not a checkpoint of this project" in p.stderr.strip().splitlines()[-1]


def test_resume_refuses_a_changed_setting(world, tmp_path):
    assert run_lppo(world, tmp_path / "o", "--max_iters=1").returncode == 0
    for override, key in (("--image_layer=3", "image_layer was 2, now 3"), ("--lora_r=4", "lora_r was 8, now 4"),
                          ("--learning_rate=0.5", "learning_rate was 0.01, now 0.5")):
        p = run_lppo(world, tmp_path / "o", "--max_iters=2", "--resume", override)
        assert p.returncode == 1 and key in p.stderr.strip().splitlines()[-1], p.stderr[-1500:]
    # the checkpoint it refused is still the one the first run wrote
    assert trainable(tmp_path / "o")["iter_num"] == 1


# ---------------------------------------------------------------------------- one update, one rank vs two

def lora_policy(folder):
    """The tiny policy with a value head and LoRA on q and v, every trained weight drawn at random (seed 0): adapters
    that are not zero, so that a step changes what the policy computes."""
    torch.manual_seed(0)
    vlm = VLM.from_pretrained(folder)
    vlm.add_value_head()
    add_lora(vlm, targets=("q_proj", "v_proj"), r=4, alpha=8)
    with torch.no_grad():
        for p in vlm.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return vlm


def _update(rank, world_size, folder, result_file, nan_on_rank=None):
    """One ppo_update on this rank's half of a fixed rollout (or on all of it with one rank)."""
    vlm = lora_policy(folder)
    params = [p for p in vlm.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    B, T0, n = 8, 20, 5
    ids = torch.randint(3, 100, (B, T0), generator=g)
    ids[:, 2:18] = tiny.IMAGE_TOKEN
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T0, dtype=torch.long),
             "pixel_values": torch.randn(B, 3, 28, 28, generator=g)}
    tokens = torch.randint(3, 100, (B, n), generator=g)
    mask = torch.ones(B, n, dtype=torch.long)  # equal lengths: per-rank token means average to the global mean
    old_lp, old_v = -torch.rand(B, n, generator=g) * 4, torch.randn(B, n, generator=g)
    adv, ret = torch.randn(B, n, generator=g), torch.randn(B, n, generator=g)
    layers = torch.tensor([1, 2, 3, 4] * 2)
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    local = B // world_size
    if rank == nan_on_rank:
        adv[rows.start + 1, 2] = float("nan")  # one poisoned token on one rank only
    opt = torch.optim.SGD(params, lr=1.0)
    ro = {**batch, "tokens": tokens, "mask": mask, "layers": layers, "old_logprobs": old_lp, "old_values": old_v,
          "advantages": adv, "returns": ret}
    try:
        ppo_update(vlm, opt, {k: v[rows] for k, v in ro.items()}, ppo_epochs=1, minibatch_size=local,
                   micro_batch_size=2, clip_eps=0.2, clip_eps_v=0.2, vf_coef=0.1, grad_clip=0.0, temperature=0.7,
                   generator=torch.Generator().manual_seed(0))
        outcome = "stepped"
    except FloatingPointError as e:
        outcome = f"FloatingPointError: {e}"
    after = {n: p.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}
    torch.save({"before": before, "after": after, "outcome": outcome}, f"{result_file}.{rank}")


def test_one_update_with_two_ranks_equals_one_rank_on_the_same_data(tmp_path):
    tiny.make_tiny_llava(tmp_path / "m")
    run_ranks(_update, 2, str(tmp_path / "m"), str(tmp_path / "two.pt"))
    _update(0, 1, str(tmp_path / "m"), str(tmp_path / "one.pt"))
    one, two = torch.load(tmp_path / "one.pt.0"), torch.load(tmp_path / "two.pt.0")
    assert one["outcome"] == two["outcome"] == "stepped"
    for k in one["after"]:
        assert torch.allclose(one["after"][k], two["after"][k], atol=1e-6), (k, (one["after"][k] - two["after"][k]).abs().max())
    # the update really moved the weights: the comparison is not between two no-ops
    assert max((one["after"][k] - one["before"][k]).abs().max() for k in one["after"]) > 1e-3


def test_a_nan_loss_on_one_rank_stops_every_rank_before_any_step(tmp_path):
    tiny.make_tiny_llava(tmp_path / "m")
    run_ranks(_update, 2, str(tmp_path / "m"), str(tmp_path / "r.pt"), 1, timeout=120)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"r.pt.{rank}")
        assert r["outcome"].startswith("FloatingPointError"), (rank, r["outcome"])
        for k in r["after"]:
            assert torch.equal(r["after"][k], r["before"][k]), (rank, k)  # no optimizer step was taken
    assert "loss is nan" in torch.load(tmp_path / "r.pt.1")["outcome"]
    assert "other rank" in torch.load(tmp_path / "r.pt.0")["outcome"]


def test_l_ppo_raises_the_reward_of_a_toy_reward_model_that_pays_for_the_response_token(world, tmp_path):
    # a one-layer Llama reward model whose attention and MLP write nothing: its score is a fixed price of the last
    # token of the transcript, here the one-token response (prices: mean 0, std 1, best 2.2)
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=tiny.VOCAB, num_labels=1,
                                                    pad_token_id=tiny.PAD_TOKEN, max_position_embeddings=512))
    with torch.no_grad():
        rm.model.layers[0].self_attn.o_proj.weight.zero_()
        rm.model.layers[0].mlp.down_proj.weight.zero_()
        rm.score.weight.mul_(10)
    rm.save_pretrained(tmp_path / "toy_rm")
    tiny.make_tiny_tokenizer(tmp_path / "toy_rm")
    # the random policy's head, 10 times larger: logits that LoRA can move far enough to prefer some tokens
    shutil.copytree(world / "policy", tmp_path / "policy")
    weights = load_file(tmp_path / "policy" / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    save_file({**weights, head: weights[head] * 10}, tmp_path / "policy" / "model.safetensors", metadata={"format": "pt"})
    p = run_lppo(world, tmp_path / "o", f"--init_from={tmp_path / 'policy'}", f"--reward_model={tmp_path / 'toy_rm'}",
                 "--max_new_tokens=1", "--temperature=1.0", "--kl_coef=0.0", "--missing_eos_penalty=0.0",
                 "--batch_size=12", "--minibatch_size=12", "--micro_batch_size=12", "--ppo_epochs=4",
                 "--learning_rate=3e-2", "--max_iters=20", "--eval_interval=20", "--checkpoint_interval=20",
                 "--eval_max_new_tokens=1")
    assert p.returncode == 0, p.stderr[-2000:]
    scores = [h["score"] for h in json.loads((tmp_path / "o" / "history.json").read_text())["history"][1:]]
    assert sum(scores[-5:]) / 5 > scores[0] + 0.8, scores  # the mean price of the sampled token rises
