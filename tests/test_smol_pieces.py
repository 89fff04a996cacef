"""data/smol/pieces.py: the shipped pieces rebuild a trained folder from the base, to int8 rounding."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from data.smol import pieces  # noqa: E402
from common import InputError  # noqa: E402


def trained_and_base():
    g = torch.Generator().manual_seed(0)
    base = {"lm.q.weight": torch.randn(24, 16, generator=g), "lm.norm.weight": torch.ones(16),
            "lm.embed.weight": torch.randn(40, 16, generator=g), "proj.weight": torch.randn(8, 16, generator=g)}
    lora = torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g) * 0.01  # a merged rank-3 adapter
    trained = {"lm.q.weight": base["lm.q.weight"] + lora,       # LoRA-merged: stored as rank-3 factors
               "lm.norm.weight": torch.ones(16),                # unchanged: not stored
               "lm.embed.weight": base["lm.embed.weight"],      # unchanged: not stored
               "proj.weight": torch.randn(8, 16, generator=g),  # retrained whole: stored whole
               "head.weight": torch.randn(1, 16, generator=g)}  # new (not in the base): stored whole
    return trained, base


def test_a_piece_stores_only_what_changed_and_merged_adapters_as_their_low_rank_factors():
    trained, base = trained_and_base()
    piece = pieces.encode(trained, base, lambda k: k)
    assert piece["lm.q.weight::U"].shape == (24, 3) and piece["lm.q.weight::V"].shape == (3, 16)
    assert piece["lm.q.weight::U"].dtype == torch.int8
    assert {"proj.weight::W", "head.weight::W"} <= set(piece)
    assert not any(k.startswith(("lm.norm", "lm.embed")) for k in piece)


def test_a_decoded_piece_equals_the_trained_weights_to_int8_rounding():
    trained, base = trained_and_base()
    sd = pieces.decode(pieces.encode(trained, base, lambda k: k), base, lambda k: k, list(trained))
    assert list(sd) == list(trained)
    for k, t in trained.items():
        # int8 with a per-row absmax scale: each entry within half a step of 1/127 of its row's largest entry
        err = (sd[k] - t).abs().max().item()
        assert err <= 0.006 * t.abs().max().item(), k
    assert torch.equal(sd["lm.embed.weight"], base["lm.embed.weight"])


def test_export_then_assemble_rebuilds_the_folder_with_its_config(tmp_path, monkeypatch):
    trained, base = trained_and_base()
    for folder, sd in (("base", base), ("trained", trained)):
        os.makedirs(tmp_path / folder)
        save_file(sd, str(tmp_path / folder / "model.safetensors"))
    (tmp_path / "trained" / "config.json").write_text(json.dumps({"model_type": "llama", "n": 3}))
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(pieces, "root", str(tmp_path))
    monkeypatch.setattr(pieces, "base_dir", "base")
    monkeypatch.setattr(pieces, "pieces_dir", "pieces")
    monkeypatch.setattr(pieces, "PIECES", {"t.safetensors": ("trained", lambda k: k)})
    pieces.export("t.safetensors")
    os.rename(tmp_path / "trained", tmp_path / "trained-old")
    pieces.assemble("t.safetensors")
    sd = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert torch.allclose(sd["lm.q.weight"], trained["lm.q.weight"], atol=1e-3)
    assert json.loads((tmp_path / "trained" / "config.json").read_text()) == {"model_type": "llama", "n": 3}
    assert (tmp_path / "trained" / "tokenizer.json").is_file()
    os.remove(tmp_path / "pieces" / "t.safetensors")
    with pytest.raises(InputError, match="--from_scratch"):
        pieces.assemble("t.safetensors")


def test_the_world_assembles_the_shipped_pieces_and_trains_only_from_scratch(tmp_path, monkeypatch):
    from data.smol import build_preferences, build_sft, prepare, pretrain_vision, vqa, world
    calls = []
    monkeypatch.setattr(world, "root", str(tmp_path))
    monkeypatch.setattr(prepare, "prepare", lambda: calls.append("base"))
    monkeypatch.setattr(vqa, "write_split", lambda *a: calls.append("vqa"))
    monkeypatch.setattr(pieces, "assemble", lambda name: calls.append(f"assemble {name}"))
    monkeypatch.setattr(pretrain_vision, "main", lambda: calls.append("tower"))
    monkeypatch.setattr(world, "run_with_config", lambda stage, config: calls.append(config))
    monkeypatch.setattr(build_sft, "build_smol_sft", lambda: calls.append("safety data"))
    monkeypatch.setattr(build_preferences, "build_preferences", lambda: calls.append("preferences"))
    os.makedirs(tmp_path / pieces.pieces_dir)
    for name in pieces.PIECES:
        (tmp_path / pieces.pieces_dir / name).write_bytes(b"")
    world.build()
    assert calls[-2:] == ["assemble smol-llava.safetensors", "assemble smol-rm.safetensors"]
    assert not {"tower", "smol_vision", "smol_sft", "smol_rm"} & set(calls)
    calls.clear()
    world.build(from_scratch=True)
    assert {"tower", "smol_vision", "smol_sft", "smol_rm"} <= set(calls)
    assert not any(c.startswith("assemble") for c in calls)
