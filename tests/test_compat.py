"""Text encoders are written with the key names transformers 4.x and the released checkpoints use."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from turbokit.compat import legacy_text_encoder_keys
from turbokit.tiny import _text_config, save_tiny_model


def _keys(path):
    with safe_open(path, "pt") as f:
        return list(f.keys())


def test_saved_models_carry_the_text_model_prefix(tmp_path):
    for family in ("sd2", "sdxl"):
        folder = save_tiny_model(tmp_path / family, family)
        for sub in ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",):
            keys = _keys(folder / sub / "model.safetensors")
            assert keys and all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)


def test_renamed_weights_load_to_the_same_model(tmp_path):
    model = CLIPTextModel(_text_config(64, "gelu", 64)).eval()
    model.save_pretrained(tmp_path)
    assert not _keys(tmp_path / "model.safetensors")[0].startswith("text_model.")  # what transformers 5 writes
    assert legacy_text_encoder_keys(tmp_path) == [tmp_path / "model.safetensors"]
    assert legacy_text_encoder_keys(tmp_path) == []  # idempotent
    loaded = CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)


def test_models_with_projection_are_left_alone(tmp_path):
    CLIPTextModelWithProjection(_text_config(64, "gelu", 64)).save_pretrained(tmp_path)
    assert legacy_text_encoder_keys(tmp_path) == []
