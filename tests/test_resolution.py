"""Loading a checkpoint at another image resolution: position-embedding interpolation and every load path."""

import math

import numpy as np
import pytest
import torch
from blip_hf_testing import build_hf, make_tokenizer
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from blip_core import build_model, load_model_dir, model_preset
from blip_core.checkpoint_io import save_model_dir
from blip_core.convert import load_hf, load_official, save_official
from blip_core.errors import UserError
from blip_core.models import FeatureQueue, MomentumEncoders, interpolate_pos_embed
from components.cli import main as cli

# --------------------------------------------------------------------------------------------------
# A reference for the official ``interpolate_pos_embed``, written from its documented behaviour: the class
# token is kept, the patch tokens form a square grid (row-major) that is resized with PyTorch's bicubic
# interpolation (Keys kernel a = -0.75, align_corners=False: source x = (x' + 0.5) * in / out - 0.5, taps
# outside the grid clamped to its border), then flattened back after the class token. Computed here in
# float64 numpy with explicit resampling matrices, independently of torch.nn.functional.interpolate.
# --------------------------------------------------------------------------------------------------

A = -0.75


def _keys(s: float) -> float:
    s = abs(s)
    if s <= 1:
        return (A + 2) * s**3 - (A + 3) * s**2 + 1
    if s < 2:
        return A * s**3 - 5 * A * s**2 + 8 * A * s - 4 * A
    return 0.0


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(x)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += _keys(x - tap)
    return m


def reference_interpolate(pos_embed: torch.Tensor, num_patches: int) -> np.ndarray:
    pe = pos_embed.double().numpy()[0]  # (1 + N, D)
    g_in, g_out = math.isqrt(pe.shape[0] - 1), math.isqrt(num_patches)
    grid = pe[1:].reshape(g_in, g_in, -1)  # (row, col, D)
    m = _resample_matrix(g_in, g_out)
    out = np.einsum("ij,jkd,lk->ild", m, grid, m)  # rows and columns resampled separately
    return np.concatenate([pe[:1], out.reshape(g_out * g_out, -1)])[None]


@pytest.mark.parametrize("dtype, std", [(torch.float64, 1.0), (torch.float32, 0.02)])
@pytest.mark.parametrize("g_in, g_out", [(14, 24), (14, 30), (4, 6), (24, 14), (3, 8)])
def test_interpolation_equals_the_official_algorithm(g_in, g_out, dtype, std):
    """197 -> 577 and 197 -> 901 positions (ViT-B/16 at 224 -> 384 / 480), a tiny grid, a smaller one."""
    torch.manual_seed(g_in * 100 + g_out)
    pos = std * torch.randn(1, 1 + g_in * g_in, 8, dtype=dtype)  # float32 at the std of a ViT's position embedding
    out = interpolate_pos_embed(pos, g_out * g_out)
    assert out.shape == (1, 1 + g_out * g_out, 8) and out.dtype == pos.dtype
    assert torch.equal(out[:, 0], pos[:, 0])  # the class position is untouched
    err = np.abs(out.double().numpy() - reference_interpolate(pos, g_out * g_out)).max()
    assert err <= 1e-6, err
    assert interpolate_pos_embed(pos, g_in * g_in) is pos  # same grid: unchanged


def test_the_reference_is_not_bilinear_or_corner_aligned():
    """The comparison above can fail: other resampling rules differ from the reference by far more."""
    pos = torch.randn(1, 1 + 16, 4)
    ref = reference_interpolate(pos, 36)
    grid = pos[:, 1:].reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
    for kwargs in ({"mode": "bilinear", "align_corners": False}, {"mode": "bicubic", "align_corners": True}):
        other = torch.nn.functional.interpolate(grid, size=(6, 6), **kwargs).permute(0, 2, 3, 1).reshape(1, 36, 4)
        assert np.abs(other.double().numpy() - ref[:, 1:]).max() > 1e-2


# --------------------------------------------------------------------------------------------------
# Load paths
# --------------------------------------------------------------------------------------------------


def _tiny_with_momentum(seed: int = 0):
    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))  # 32 px, patch 8: a 4x4 grid
    enc, queue = MomentumEncoders(model), FeatureQueue(16, 64, with_ids=False)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01 * torch.randn_like(p))  # momentum copies differ from the student
    return model, tok, {**enc.state_dict(), **queue.state_dict()}


def test_checkpoint_dir_loads_at_another_size(tmp_path):
    model, tok, momentum = _tiny_with_momentum()
    save_model_dir(tmp_path / "ck", model, tok, momentum)
    ck = load_model_dir(tmp_path / "ck", image_size=48)
    assert ck.model.cfg.vision.image_size == 48
    want = reference_interpolate(model.visual_encoder.pos_embed.detach(), 36)
    assert np.abs(ck.model.visual_encoder.pos_embed.detach().double().numpy() - want).max() <= 1e-6
    want_m = reference_interpolate(momentum["visual_encoder_m.pos_embed"], 36)
    assert np.abs(ck.momentum_state["visual_encoder_m.pos_embed"].double().numpy() - want_m).max() <= 1e-6
    assert ck.notes == ["visual_encoder.pos_embed interpolated from 4x4 to 6x6 patches",
                        "visual_encoder_m.pos_embed interpolated from 4x4 to 6x6 patches"]
    # Every other tensor is copied as it is, and the model runs at 48 px.
    src, dst = model.state_dict(), ck.model.state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src if k != "visual_encoder.pos_embed")
    with torch.no_grad():
        assert ck.model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 37, 32)
    # The momentum state fits the momentum encoders of the 48 px model.
    MomentumEncoders(ck.model).load_state_dict(
        {k: v for k, v in ck.momentum_state.items() if "queue" not in k})
    # The stored size (or 0 / None) loads without any change; a size off the patch grid is a user error.
    assert load_model_dir(tmp_path / "ck", image_size=32).notes == []
    with pytest.raises(UserError, match="image size 50 is not a positive multiple of the model's patch size 8"):
        load_model_dir(tmp_path / "ck", image_size=50)


def test_official_file_loads_at_another_size(tmp_path):
    """An official retrieval file at one resolution (here 48 px: 6x6) into models of smaller and larger size."""
    model, tok, momentum = _tiny_with_momentum(seed=1)
    ck48 = load_model_dir(_saved(tmp_path, model, tok, momentum), image_size=48)
    queue = FeatureQueue(16, 64, with_ids=True).state_dict()
    momentum48 = {**{k: v for k, v in ck48.momentum_state.items() if "queue" not in k}, **queue}
    path = save_official(ck48.model, tmp_path / "model_retrieval.pth", "retrieval", momentum48)
    for size, grid in ((32, 4), (64, 8)):
        ck = load_official(path, "tiny", image_size=size)
        assert ck.model.cfg.vision.image_size == size
        for key, t in (("visual_encoder.pos_embed", ck.model.visual_encoder.pos_embed.detach()),
                       ("visual_encoder_m.pos_embed", ck.momentum_state["visual_encoder_m.pos_embed"])):
            src = ck48.model.visual_encoder.pos_embed if key == "visual_encoder.pos_embed" else momentum48[key]
            want = reference_interpolate(src.detach(), grid * grid)
            assert np.abs(t.double().numpy() - want).max() <= 1e-6, key
            assert f"{key} interpolated from 6x6 to {grid}x{grid} patches" in ck.notes

    with pytest.raises(UserError, match="image size -40 is not a positive multiple of the patch size 8"):
        load_official(path, "tiny", image_size=-40)


def _saved(tmp_path, model, tok, momentum):
    return save_model_dir(tmp_path / "ck32", model, tok, momentum)


@pytest.mark.parametrize("cls", [BlipForConditionalGeneration, BlipForImageTextRetrieval])
def test_hf_and_blip_sources_convert_at_another_size(tmp_path, capsys, cls):
    tok = make_tokenizer()
    hf = build_hf(cls, tok, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    ck = load_hf(tmp_path / "hf", image_size=48)
    assert "visual_encoder.pos_embed interpolated from 4x4 to 6x6 patches" in ck.notes
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # HF's runtime interpolation gives the same image tokens
        ref = hf.vision_model(pixel_values=image, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(ck.model.encode_image(image), ref, rtol=0, atol=1e-5)

    assert cli(["convert", "--from", "hf", str(tmp_path / "hf"), "--to", str(tmp_path / "blip48"),
                "--image-size", "48"]) == 0
    assert "interpolated from 4x4 to 6x6" in capsys.readouterr().out
    assert cli(["convert", "--from", "blip", str(tmp_path / "blip48"), "--to", str(tmp_path / "blip64"),
                "--image-size", "64"]) == 0
    assert "interpolated from 6x6 to 8x8" in capsys.readouterr().out
    assert load_model_dir(tmp_path / "blip64").model.visual_encoder.pos_embed.shape == (1, 65, 32)
