"""reward.py: reward models against transformers' GPT2ForSequenceClassification and LlamaForSequenceClassification
on tiny random checkpoints, saving for transformers, training, and bad input.

Tolerance: max abs difference <= 1e-4 on float32 scores (scores are O(1); observed differences ~1e-6).
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reward
import tiny
from common import InputError
from model import LoRALinear
from reward import RewardModel, choose_trainable, format_hh, read_preference_jsonl, right_pad

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

CORPUS = [
    "\n\nHuman: Do you like apples?\n\nAssistant: I like apples very much.",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then bake it.",
    "I'm sorry, but I can't help with that. It could hurt people.",
    "The quick brown fox jumps over the lazy dog; numbers 12345 and 3.14 too.",
]


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def perturb(model, head_std=1.0):
    """Random init leaves norms at 1 and biases at 0, and the head tiny; move them so that they are tested too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name == "score.weight":
                p.normal_(0, head_std)
    return model


def make_tiny_gpt2(path, cls_name="GPT2ForSequenceClassification", seed=0, **kw):
    """Save a random transformers GPT-2 (with its tokenizer files) to `path` and return it in eval mode."""
    import transformers
    vocab = tiny.make_gpt2_tokenizer(path, CORPUS, vocab_size=400)
    kw = {"num_labels": 1, **kw}
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0,
                                  eos_token_id=0, bos_token_id=0, **kw)  # <|endoftext|> is id 0
    torch.manual_seed(seed)
    model = perturb(getattr(transformers, cls_name)(cfg).eval())
    model.save_pretrained(path)
    return model


def make_tiny_llama_rm(path, seed=0):
    from transformers import LlamaForSequenceClassification
    cfg = tiny.tiny_llava_config().text_config
    cfg.num_labels, cfg.pad_token_id = 1, tiny.PAD_TOKEN
    torch.manual_seed(seed)
    model = perturb(LlamaForSequenceClassification(cfg).eval())
    model.save_pretrained(path)
    tiny.make_tiny_tokenizer(path)
    return model


def ragged(lengths, low, high, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_rm")
    return path, make_tiny_gpt2(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_rm")
    return path, make_tiny_llama_rm(path)

# -----------------------------------------------------------------------------
# Parity with transformers


def test_gpt2_reward_matches_transformers_at_the_last_token_with_right_padding(gpt2):
    path, hf = gpt2
    rm = RewardModel.from_pretrained(path)
    ids, mask = right_pad(ragged([9, 3, 17], 1, hf.config.vocab_size), pad_id=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert maxdiff(rm(ids, mask), want) <= TOL
        assert maxdiff(rm(ids), want) <= TOL  # no mask: padding is wherever pad_token_id is, as in transformers
    assert want.abs().max() > 0.1  # the head is not near zero, so the comparison means something


def test_gpt2_reward_loads_bare_keys_old_buffers_and_shards(gpt2, tmp_path):
    path, hf = gpt2
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    sd = load_file(path / "model.safetensors")
    # GPT2Model checkpoints have no "transformer." prefix, and older ones store the causal mask as attn.bias
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tiny.shard(tmp_path)
    ids, mask = right_pad(ragged([5, 11], 1, hf.config.vocab_size, seed=1), pad_id=0)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert maxdiff(RewardModel.from_pretrained(tmp_path)(ids, mask), want) <= TOL


def test_gpt2_score_of_text_matches_transformers_tokenizer_and_model(gpt2):
    from transformers import GPT2TokenizerFast
    path, hf = gpt2
    rm = RewardModel.from_pretrained(path)
    tok = GPT2TokenizerFast.from_pretrained(str(path))
    prompts = ["Do you like apples?", "How do I bake bread?", "Tell me a joke about a lazy dog."]
    responses = ["I like apples very much.", "I'm sorry, but I can't help with that.", "Numbers: 12345, and 3.14!"]
    got = rm.score(prompts, responses, batch_size=2)
    with torch.no_grad():
        want = torch.stack([hf(**tok(format_hh(p, r), return_tensors="pt")).logits[0, 0]
                            for p, r in zip(prompts, responses)])
    assert got.shape == (3,) and got.dtype == torch.float32
    assert maxdiff(got, want) <= TOL


def test_llama_reward_matches_transformers_at_the_last_token_with_right_padding(llama):
    path, hf = llama
    rm = RewardModel.from_pretrained(path)
    ids, mask = right_pad(ragged([7, 2, 12], 3, 100), pad_id=tiny.PAD_TOKEN)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert maxdiff(rm(ids, mask), want) <= TOL
        assert maxdiff(rm(ids), want) <= TOL
    assert want.abs().max() > 0.1


def test_llava_language_model_starts_a_reward_model_with_a_zero_head(tmp_path):
    from model import VLM
    tiny.make_tiny_llava(tmp_path)
    tiny.make_tiny_tokenizer(tmp_path)
    with pytest.raises(InputError, match="no reward head"):
        RewardModel.from_pretrained(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path, init_head=True)
    ids = torch.tensor(ragged([6, 6], 3, 100))
    assert rm.model_type == "llama" and rm.pad_token_id == tiny.PAD_TOKEN
    assert torch.equal(rm(ids), torch.zeros(2))
    with torch.no_grad():
        rm.head.weight.normal_()
        _, hidden = VLM.from_pretrained(tmp_path)(ids, return_hidden=True)
        assert maxdiff(rm(ids), hidden[:, -1] @ rm.head.weight[0]) <= TOL

# -----------------------------------------------------------------------------
# Saving: transformers loads what save_pretrained writes, LoRA adapters folded in


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_save_pretrained_round_trips_through_transformers(kind, gpt2, llama, tmp_path):
    from transformers import AutoModelForSequenceClassification
    path, hf = gpt2 if kind == "gpt2" else llama
    rm = RewardModel.from_pretrained(path)
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "down_proj"]
    choose_trainable(rm, "lora", lora_targets=targets)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # adapters that change the scores
    ids, mask = right_pad(ragged([8, 4], 3, 100, seed=2), pad_id=rm.pad_token_id)
    with torch.no_grad():
        ours = rm(ids, mask)
        assert maxdiff(ours, hf(input_ids=ids, attention_mask=mask).logits[:, 0]) > 1e-3
    rm.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert {"config.json", "model.safetensors"} <= set(os.listdir(saved))
    assert (saved / ("merges.txt" if kind == "gpt2" else "tokenizer.json")).is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(saved)).eval()
    with torch.no_grad():
        assert maxdiff(reloaded(input_ids=ids, attention_mask=mask).logits[:, 0], ours) <= TOL
        assert maxdiff(RewardModel.from_pretrained(saved)(ids, mask), ours) <= TOL
    assert not [k for k in load_file(saved / "model.safetensors") if "lora" in k]

# -----------------------------------------------------------------------------
# Training


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def toy_pairs(things):
    """Separable pairs: liking the thing is preferred over hating it, whatever the thing."""
    return [{"chosen": format_hh(f"Do you like {t}?", f"I like {t} very much."),
             "rejected": format_hh(f"Do you like {t}?", f"I hate {t}, go away.")} for t in things]


def run_reward(*args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "reward.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


TRAIN_THINGS = ["apples", "bread", "dogs", "foxes", "numbers", "water", "salt", "yeast", "flour", "people",
                "music", "trees", "cats", "rain", "books", "tea"]
TEST_THINGS = ["lazy dogs", "brown bread", "quick foxes", "jumps", "cheese", "boats"]


@pytest.mark.parametrize("torchrun", [False, True], ids=["python", "torchrun-2-ranks"])
def test_training_reaches_full_held_out_accuracy_on_a_separable_toy_set(torchrun, tmp_path):
    make_tiny_gpt2(tmp_path / "lm", cls_name="GPT2LMHeadModel")  # a language model: the head starts at zero
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(TRAIN_THINGS))
    test = write_jsonl(tmp_path / "test.jsonl", toy_pairs(TEST_THINGS))
    out = tmp_path / "rm"
    p = run_reward(f"--init_from={tmp_path / 'lm'}", f"--train_file={train}", f"--test_file={test}",
                   f"--out_dir={out}", "--train_mode=last_k", "--last_k_blocks=2", "--batch_size=4", "--max_iters=30",
                   "--learning_rate=3e-3", "--min_lr=3e-4", "--eval_interval=15", "--device=cpu", torchrun=torchrun)
    assert p.returncode == 0, p.stderr[-2000:]
    record = json.loads((out / "reward_train.json").read_text())
    assert record["finished"] and record["iter"] == 30
    assert record["held_out"]["accuracy"] == 1.0, record["held_out"]
    rm = RewardModel.from_pretrained(out)
    scores = rm.score([f"Do you like {t}?" for t in TEST_THINGS] * 2,
                      [f"I like {t} very much." for t in TEST_THINGS] + [f"I hate {t}, go away." for t in TEST_THINGS])
    assert (scores[:6] > scores[6:]).all()


def test_training_script_reports_a_bad_line_in_one_line(gpt2, tmp_path):
    path, _ = gpt2
    good = json.dumps(toy_pairs(["tea"])[0])
    train = tmp_path / "train.jsonl"
    train.write_text(good + "\n" + '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": ' + "\n")
    p = run_reward(f"--init_from={path}", f"--train_file={train}", f"--test_file={train}",
                   f"--out_dir={tmp_path / 'rm'}", "--device=cpu")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {train}:2: not valid JSON")

# -----------------------------------------------------------------------------
# Bad input


def test_long_transcripts_lose_the_start_of_the_prompt_and_say_so_once(gpt2, capsys):
    path, _ = gpt2
    rm = RewardModel.from_pretrained(path)
    rm.max_length = 24
    prompt, response = "How do I bake bread? " * 10 + "Tell me now.", "Mix flour."
    ids = rm.encode_hh(prompt, response)
    assert len(ids) == 24
    assert ids[:len(rm.tokens("\n\nHuman:"))] == rm.tokens("\n\nHuman:")
    tail = rm.tokens("\n\nAssistant: Mix flour.")
    assert ids[-len(tail):] == tail
    rm.score([prompt, prompt], [response, "Mix water."])
    out = capsys.readouterr().out
    assert out.count("longer than max_length=24") == 1 and "start of its prompt is dropped" in out
    assert rm.encode_hh("hi", "yo") == rm.tokens(format_hh("hi", "yo"))  # short ones are left alone


def test_gpt2_checkpoint_without_its_vocabulary_is_refused(gpt2, tmp_path):
    path, _ = gpt2
    for name in ("config.json", "model.safetensors", "vocab.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    with pytest.raises(InputError, match="merges.txt") as info:
        RewardModel.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(model_type="bert"), "model_type 'bert' is not supported"),
    (lambda d: d.update(architectures=["GPT2LMHeadModel"]), "no reward head"),
    (lambda d: d.update(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (lambda d: d.update(n_embd=64), r"has shape \(\d+, 32\), expected \(\d+, 64\) from config.json$"),
])
def test_checkpoint_config_problems_are_one_line_errors(gpt2, tmp_path, change, message):
    path, _ = gpt2
    for name in ("model.safetensors", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    config = json.loads((path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=message) as info:
        RewardModel.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_only_safetensors_checkpoints_load(gpt2, tmp_path):
    path, hf = gpt2
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="only safetensors"):
        RewardModel.from_pretrained(tmp_path)


def test_a_head_with_two_outputs_is_refused(tmp_path):
    make_tiny_gpt2(tmp_path, num_labels=2)
    with pytest.raises(InputError, match="num_labels=1"):
        RewardModel.from_pretrained(tmp_path)


def test_score_wants_one_response_per_prompt(gpt2):
    rm = RewardModel.from_pretrained(gpt2[0])
    with pytest.raises(InputError, match="2 prompts and 1 responses"):
        rm.score(["a", "b"], ["c"])


def test_choose_trainable_refuses_unknown_modes_and_block_counts(gpt2):
    rm = RewardModel.from_pretrained(gpt2[0])
    with pytest.raises(InputError, match="train_mode='all'"):
        choose_trainable(rm, "all")
    with pytest.raises(InputError, match=r"last_k_blocks=3, expected 1..2"):
        choose_trainable(rm, "last_k", last_k_blocks=3)
    with pytest.raises(InputError, match=r"\['q_proj'\] match no linear layer \(expected names from c_attn, c_fc, "
                                         r"c_proj\)"):
        choose_trainable(rm, "lora", lora_targets=["q_proj"])
    params = choose_trainable(rm, "last_k", last_k_blocks=1)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in [*rm.backbone.h[1].parameters(),
                                                                      *rm.backbone.ln_f.parameters(), rm.head.weight])


def test_lora_mode_trains_the_head_and_the_adapters_only(gpt2):
    rm = RewardModel.from_pretrained(gpt2[0])
    params = choose_trainable(rm, "lora", lora_r=4, lora_targets=["c_attn"])
    adapters = [m for m in rm.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 2  # one c_attn per block
    want = [rm.head.weight] + [p for m in adapters for p in (m.lora_A, m.lora_B)]
    assert {id(p) for p in params} == {id(p) for p in want}


def test_preference_reader_checks_hh_transcripts_and_reads_gzip(tmp_path):
    good = toy_pairs(["tea"])[0]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {"chosen": good["chosen"], "rejected": "no turns here"}])
    assert len(read_preference_jsonl(path)) == 2  # without hh=True any text will do
    with pytest.raises(InputError, match=f"^{path}:2: 'rejected' is not an HH-RLHF transcript"):
        read_preference_jsonl(path, hh=True)
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(good) + "\n")
    assert read_preference_jsonl(tmp_path / "pairs.jsonl.gz", hh=True) == [(good["chosen"], good["rejected"])]
    with pytest.raises(InputError, match="file not found"):
        read_preference_jsonl(tmp_path / "missing.jsonl")


def use_config(monkeypatch, **overrides):
    """Set reward.py's config globals, as configurator.py would, for an in-process main()."""
    for k, v in overrides.items():
        assert k in reward.config_keys, k
        monkeypatch.setattr(reward, k, v)


def test_a_diverging_run_stops_in_one_line_and_leaves_the_saved_reward_model_intact(tmp_path, monkeypatch):
    make_tiny_gpt2(tmp_path / "lm", cls_name="GPT2LMHeadModel")
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(TRAIN_THINGS))
    test = write_jsonl(tmp_path / "test.jsonl", toy_pairs(TEST_THINGS))
    out = tmp_path / "rm"
    use_config(monkeypatch, init_from=str(tmp_path / "lm"), train_file=str(train), test_file=str(test),
               out_dir=str(out), train_mode="last_k", last_k_blocks=2, batch_size=4, eval_interval=1, warmup_iters=0,
               device="cpu", dtype="float32", max_iters=2)
    reward.main()
    # a learning rate of 1e30 sends the weights far out on the first step; the loss is NaN soon after
    use_config(monkeypatch, max_iters=6, learning_rate=1e30, min_lr=1e30)
    with pytest.raises(InputError, match=r"^iteration \d+: .*stopped before .*holds the last good reward model$") \
            as info:
        reward.main()
    assert "\n" not in str(info.value)
    stopped_at = int(str(info.value).split()[1].rstrip(":"))
    record = json.loads((out / "reward_train.json").read_text())
    assert not record["finished"] and record["iter"] <= stopped_at
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # never a NaN model on disk


def test_bad_settings_are_refused_before_any_work(tmp_path):
    for arg, message in (("--train_mode=full", "train_mode='full'; expected one of 'head', 'last_k', 'lora'"),
                         ("--batch_size=0", "batch_size=0; expected a number > 0")):
        p = run_reward(arg, f"--out_dir={tmp_path / 'rm'}")
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: {message}"], p.stderr
    (tmp_path / "afile").write_text("")
    p = run_reward(f"--out_dir={tmp_path / 'afile'}", "--device=cpu")
    assert p.returncode == 1 and "is a file; expected a folder" in p.stderr.strip().splitlines()[-1]
