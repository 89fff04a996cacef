"""torch.compile paths: the compiled decode step gives the eager tokens, and the compiled training forwards of
lppo.py, sft.py and reward.py give the eager numbers and never recompile once their length buckets are warm.

The decode test runs the real inductor backend (C++ on CPU, ~30 s to compile once); the training-forward tests use
backend="aot_eager", which traces exactly what inductor would be given, with the same guards, without compiling C++.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import model
import tiny
from common import InputError, strict_compile
from model import VLM, add_lora, compile_decode, left_pad, lora_modules
from test_model import pixels, prompt_ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny.make_tiny_llava(path)
    tiny.make_tiny_tokenizer(path)
    return path


def policy(path):
    """The tiny VLM with LoRA adapters that are not zero, so the adapters are part of what is compared."""
    vlm = VLM.from_pretrained(path)
    vlm.add_value_head()
    torch.manual_seed(0)
    add_lora(vlm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(vlm):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        vlm.value_head.weight.copy_(torch.randn(vlm.value_head.weight.shape, generator=g))
    return vlm.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_decode_gives_the_eager_tokens_and_logprobs_and_compiles_once(ckpt):
    eager, compiled = policy(ckpt), policy(ckpt)
    compile_decode(compiled, batch_size=4, max_len=64)  # inductor, C++ on this CPU
    rows = prompt_ids((6, 2, 9), seed=3)
    ids, mask = left_pad(rows, tiny.PAD_TOKEN)
    pv = pixels(3, seed=3)
    free, _ = eager.generate(ids, mask, pixel_values=pv, image_layer=2, max_new_tokens=20)
    eos = int(free[0, 10])  # row 0 ends at its 11th token or before
    eos1 = int(free[1, 5])  # row 1 alone ends by its 6th token: the compiled loop runs on to its check and cuts
    cases = [(ids, mask, pv, 0.0, 1.0, None), (ids, mask, pv, 0.0, 1.0, eos), (ids, mask, pv, 0.7, 1.0, eos),
             (ids[1:2], mask[1:2], pv[1:2], 0.0, 1.0, eos1),
             (ids[1:2, 3:], mask[1:2, 3:], pv[1:2], 1.3, 0.9, eos)]  # a shorter prompt, nucleus sampling
    lengths = []
    for ids_, mask_, pv_, temperature, top_p, eos_ in cases:
        out = []
        for vlm in (eager, compiled):
            g = torch.Generator().manual_seed(0)
            out.append(vlm.generate(ids_, mask_, pixel_values=pv_, image_layer=2, max_new_tokens=20,
                                    temperature=temperature, top_p=top_p, eos_token_id=eos_, return_logprobs=True,
                                    generator=g))
        (tok_e, lp_e), (tok_c, lp_c) = out
        assert torch.equal(tok_c, tok_e), (temperature, eos_)
        assert (lp_c - lp_e).abs().max().item() <= 1e-5  # inductor's own kernels: 4.8e-7 observed
        lengths.append(tok_e.shape[1])
    assert lengths[3] <= 6  # the one-row greedy case stopped early
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every batch size, prompt length and temperature


def test_a_prompt_that_does_not_fit_the_compiled_cache_is_refused(ckpt):
    vlm = compile_decode(VLM.from_pretrained(ckpt), batch_size=2, max_len=40)
    ids, mask = left_pad(prompt_ids((6,)), tiny.PAD_TOKEN)
    with pytest.raises(InputError, match="compiled KV cache of 2 rows x 40 positions"):
        vlm.generate(ids, mask, pixel_values=pixels(1), max_new_tokens=20)


@pytest.fixture
def strict():
    """strict_compile for one test, then dynamo's own limits again."""
    c = torch._dynamo.config
    saved = c.recompile_limit, c.fail_on_recompile_limit_hit, c.error_on_recompile
    strict_compile()
    yield
    c.recompile_limit, c.fail_on_recompile_limit_hit, c.error_on_recompile = saved


def lppo_rollout(n_text, n, seed):
    """A rollout of len(n_text) prompts (16 image tokens each, left-padded) and n-token responses of varied length."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad(prompt_ids(n_text, seed=seed), tiny.PAD_TOKEN)
    B = len(n_text)
    lengths = torch.randint(1, n + 1, (B,), generator=g)
    lengths[0] = n
    resp_mask = (torch.arange(n) < lengths[:, None]).long()
    tokens = torch.randint(3, 100, (B, n), generator=g).masked_fill(resp_mask == 0, tiny.PAD_TOKEN)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(B, seed=seed),
            "layers": torch.tensor([1, 2, -2, 2][:B]), "tokens": tokens, "mask": resp_mask,
            "advantages": torch.randn(B, n, generator=g), "returns": torch.randn(B, n, generator=g)}


def lppo_iteration(vlm, opt, ro):
    """Score a rollout (policy and reference), then one PPO epoch on it: what one L-PPO iteration asks of the model."""
    from lppo import ppo_update, score_rollout
    ro = dict(ro)
    ro["old_logprobs"], ro["old_values"], ref = score_rollout(vlm, ro, 0.7, 2)
    ppo_update(vlm, opt, ro, ppo_epochs=1, minibatch_size=4, micro_batch_size=2, clip_eps=0.2, clip_eps_v=0.2,
               vf_coef=0.1, grad_clip=1.0, temperature=0.7, generator=torch.Generator().manual_seed(0))
    return [ro["old_logprobs"], ro["old_values"], ref] + [p.detach().clone() for p in opt.param_groups[0]["params"]]


def test_lppo_compiled_forward_gives_the_eager_numbers_and_never_recompiles_after_warm_up(ckpt, strict):
    from model import compile_scoring, round_up
    eager, compiled = policy(ckpt), compile_scoring(policy(ckpt), backend="aot_eager", bucket=16)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, compiled)]
    warm_up = [((3, 7, 2, 5), 5), ((6, 2, 1, 4), 17), ((2, 3, 7, 6), 32)]  # prompts of 24 to 27 tokens
    after = [((1, 8, 4, 4), 12), ((5, 5, 5, 3), 20), ((8, 1, 2, 2), 3), ((7, 1, 3, 2), 33)]
    rollouts = [lppo_rollout(n_text, n, seed=i) for i, (n_text, n) in enumerate(warm_up + after)]
    bucket = [round_up(ro["input_ids"].shape[1] + ro["tokens"].shape[1], 16) for ro in rollouts]
    assert sorted(bucket[:3]) == [32, 48, 64] and set(bucket[3:]) == set(bucket[:3])  # after warm-up: its buckets
    for i, ro in enumerate(rollouts):
        if i == len(warm_up):
            graphs = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True  # from here on a recompile raises
        want = lppo_iteration(eager, opts[0], ro)
        got = lppo_iteration(compiled, opts[1], ro)
        for a, b in zip(want, got):
            assert (a - b).abs().max().item() <= 2e-5  # float32 rounding: the padded lengths reorder sums
    # the policy and reference scoring (no grad; adapters on, off) and the training forward, for each of three buckets
    assert graphs == 9 and counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def sft_batch(tok, cfg, seed, B=3):
    """B (image, prompt, response) examples of random lengths, as sft.py batches them: ids, labels, mask, pixels."""
    import sft
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, 99, (n,), generator=g))
    examples = [dict(zip(("input_ids", "labels"), sft.build_example(tok, cfg, words(int(a)), words(int(b)), 256)))
                for a, b in torch.randint(1, 12, (B, 2), generator=g)]
    return examples, pixels(B, seed=seed)


def test_sft_compiled_forward_has_no_graph_break_gives_the_eager_loss_and_never_recompiles_after_warm_up(ckpt, strict):
    import sft
    from model import load_tokenizer
    tok = load_tokenizer(ckpt)
    eager, compiled = policy(ckpt).train(), policy(ckpt).train()
    net = torch.compile(compiled, backend="aot_eager", fullgraph=True, dynamic=False)  # fullgraph: a break raises
    layers = [2, 2, 2]
    for step in range(6):
        if step == 2:  # warm-up: the first two batches' buckets hold every batch after them
            graphs = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True
        examples, pv = sft_batch(tok, eager.config, seed=step)
        n_target = sft.count_targets(examples)
        ids, labels, mask = sft.collate(examples, tiny.PAD_TOKEN)
        want = sft.sft_loss(eager(ids, pv, layers, mask, logits_at=sft.target_positions(labels)), labels, n_target)
        ids, labels, mask = sft.collate(examples, tiny.PAD_TOKEN, multiple=32)
        got = sft.bucketed_sft_loss(net, ids, {"pixel_values": pv}, layers, mask, labels, n_target, bucket=32)
        want.backward()
        got.backward()
        assert abs(got.item() - want.item()) <= 1e-5
        for m_e, m_c in zip(lora_modules(eager), lora_modules(compiled)):
            assert (m_e.lora_A.grad - m_c.lora_A.grad).abs().max().item() <= 1e-5
            m_e.lora_A.grad = m_e.lora_B.grad = m_c.lora_A.grad = m_c.lora_B.grad = None
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def close(got, want, rel=1e-5):
    """Whether got equals want to float32 rounding, relative to want's largest entry (at least 1): padding to a bucket
    changes the order of the sums, by an amount that grows with the size of what is summed and that differs between
    CPU kernels (AVX2, AVX-512)."""
    return (got - want).abs().max().item() <= rel * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reward_compiled_forward_gives_the_eager_scores_and_never_recompiles_after_warm_up(kind, tmp_path, strict):
    from reward import RewardModel, bradley_terry_loss, right_pad
    from test_reward import make_tiny_gpt2, make_tiny_llama_rm, ragged
    (make_tiny_gpt2 if kind == "gpt2" else make_tiny_llama_rm)(tmp_path)
    eager, compiled = RewardModel.from_pretrained(tmp_path).train(), RewardModel.from_pretrained(tmp_path).train()
    net = torch.compile(compiled, backend="aot_eager", fullgraph=True, dynamic=False)
    pad = eager.pad_token_id
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 2:  # warm-up: lengths up to 32 and up to 64, the two buckets every later batch falls in
            graphs = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True
        top = [30, 60][step % 2]
        seqs = ragged(torch.randint(3, top, (3,), generator=g).tolist() + [top], 3, 100, seed=step)
        want, got = eager(*right_pad(seqs, pad)), net(*right_pad(seqs, pad, multiple=32))
        assert close(got, want)
        bradley_terry_loss(want[:2], want[2:])[0].backward()
        bradley_terry_loss(got[:2], got[2:])[0].backward()
        for p_e, p_c in zip(eager.parameters(), compiled.parameters()):
            assert close(p_c.grad, p_e.grad), (p_c.grad - p_e.grad).abs().max().item()
            p_e.grad = p_c.grad = None
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


def test_strict_compile_makes_the_recompile_limit_an_error_not_a_silent_fall_back_to_eager(strict):
    strict_compile(recompile_limit=1)
    f = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    f(torch.ones(2))
    with pytest.raises(Exception, match="recompile_limit|cache_size_limit"):
        f(torch.ones(3))  # a second shape is a second graph: past the limit of one


def test_sft_refuses_compile_with_a_list_of_image_layers(tmp_path, monkeypatch):
    import sft
    from test_sft import use_config
    use_config(monkeypatch, compile=True, image_layer=[1, 2], out_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match=r"compile=True with image_layer=\[1, 2\]: .* expected an int or None"):
        sft.main()


def test_a_process_capped_to_avx2_keeps_its_own_compiled_code():
    """Inductor's cache is not keyed by ATEN_CPU_CAPABILITY: a capped process must not load code compiled uncapped
    (it gave NaN logits or a crash), so importing model gives it a cache of its own, unless the user chose one."""
    import os
    import subprocess
    import sys
    code = "import os, model; print(os.environ.get('TORCHINDUCTOR_CACHE_DIR', ''))"
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    assert run({"ATEN_CPU_CAPABILITY": "avx2"}).strip().endswith("_avx2")
    assert run({}).strip() == ""
    assert run({"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": "/x"}).strip() == "/x"
    assert run({"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": model.INDUCTOR_CACHE}).strip().endswith("_avx2")
