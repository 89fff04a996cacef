"""bench.py's GPU code path at tiny shapes on the CPU, run as a script: for LLaVA-NeXT and Llama 3.2 Vision our logits
equal transformers' and greedy generation gives the same tokens as transformers' generate (dynamic and static cache)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_capability():
    import torch
    return torch.backends.cpu.get_cpu_capability()


def run_bench(*args):
    """(return code, the JSON lines bench.py printed, stderr), on the CPU (float32) with one thread."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return p.returncode, lines, p.stderr


@pytest.mark.parametrize("family,n_layers", [("llava_next", 2), ("mllama", 1)])
def test_tiny_family_matches_transformers_logits_and_tokens(family, n_layers):
    # 16 rows of 128 tokens: long enough that transformers, unless told, would generate the image placeholder
    rc, lines, err = run_bench("--shape=tiny", f"--family={family}", "--batch_size=16", "--max_new_tokens=128")
    assert rc == 0, err[-2000:]
    assert all(line["family"] == family and line["gpu"] is None and line["transformers"] for line in lines)
    assert all(line["isa"]["aten"] == torch_capability() for line in lines)  # each line names its ISA
    logits = [line for line in lines if line["what"] == "logits_float32"]
    assert len(logits) == n_layers
    for line in logits:
        assert line["max_abs_diff"] <= 1e-4 and line["argmax_agree"] == 1.0 and line["logit_scale"] > 1e-2, line
    gen = [line for line in lines if line["what"] == "generate"]
    assert len(gen) == 1 and gen[0]["batch"] == 16 and gen[0]["new_tokens"] == 128
    assert gen[0]["same_tokens_frac"] == 1.0 and gen[0]["same_tokens_frac_static"] == 1.0, gen[0]
    assert gen[0]["ours_tok_per_s"] > 0 and gen[0]["transformers_static_tok_per_s"] > 0


def test_an_unknown_family_or_one_with_the_smol_shape_is_a_one_line_error():
    rc, lines, err = run_bench("--shape=tiny", "--family=qwen")
    assert rc != 0 and not lines and "family='qwen'; expected one of 'llava', 'llava_next'" in err
    rc, lines, err = run_bench("--shape=smol", "--family=mllama")
    assert rc != 0 and not lines and "InputError: --family=mllama runs at --shape=7b or --shape=tiny" in err
