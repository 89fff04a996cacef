"""torch.compile paths: the compiled decode step gives the eager tokens, and the compiled training forwards of
lppo.py, sft.py and reward.py give the eager numbers and never recompile once their length buckets are warm.

The decode test runs the real inductor backend (C++ on CPU, ~30 s to compile once); the training-forward tests use
backend="aot_eager", which traces exactly what inductor would be given, with the same guards, without compiling C++.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tiny
from model import (VLM, InputError, add_lora, compile_decode, left_pad, lora_modules, strict_compile)
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
