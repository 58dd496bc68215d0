"""Real photographs: every kind of image file a user would call a good photo decodes to upright 8-bit RGB.

Each kind is generated with PIL here; ingest must store it in a shard (nothing rejected) with the pixels
:func:`blip_core.data.images.to_rgb` defines (EXIF orientation applied, transparency on white, 16-bit scaled),
and the inference decode paths must see the same upright pixels.
"""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from PIL import Image, features

from blip_core.config import load_config
from blip_core.data.checks import ImageRules, check_image
from blip_core.data.images import exif_orientation, to_rgb
from blip_core.data.samples import decode_image
from blip_core.data.transforms import EvalTransform, TrainTransform
from blip_core.data.webdataset_io import iter_shard, tar_bytes
from components import infer, ingest, storage

W, H = 48, 32  # stored size of the generated files
LOSSLESS = ImageRules(resolution=0, image_format="png")  # keep size, store PNG: pixels compared exactly


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(int)


def _halves() -> Image.Image:
    """``W x H`` RGB: left half red, right half blue."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 2] = (255, 0, 0)
    arr[:, W // 2:] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def _oriented_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(_halves(), "JPEG", quality=95, exif=exif.tobytes())


def _cmyk_jpeg(cmyk: tuple[int, int, int, int], ycck: bool = False) -> bytes:
    """A uniform CMYK JPEG; with ``ycck`` its colour channels are stored as YCbCr (Adobe transform 2).

    Pillow writes plain Adobe CMYK only, so the YCCK file is made by storing ``(Y, Cb, Cr)`` of
    ``(C, M, Y)`` in the first three channels and setting the transform byte of the Adobe APP14 segment to 2
    (Pillow stores CMYK inverted, as Adobe does; the decoder turns YCC back into CMY).
    """
    arr = np.empty((H, W, 4), np.uint8)
    arr[:] = cmyk
    if ycck:
        ycc = np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB").convert("YCbCr"))
        arr = np.concatenate([255 - ycc, arr[..., 3:]], axis=-1)
    data = _save(Image.fromarray(arr, "CMYK"), "JPEG", quality=95)
    if ycck:
        at = data.find(b"\xff\xee\x00\x0eAdobe")
        assert at > 0, "Pillow wrote no Adobe segment"
        data = data[:at + 15] + b"\x02" + data[at + 16:]  # marker, length, 'Adobe', version, 2 flags, transform
    return data


def _gradient16() -> np.ndarray:
    """``H x W`` 16-bit values over the whole range (including 0 and 65535), not multiples of 257."""
    vals = np.linspace(0, 65535, H * W).round().astype(np.uint16)
    return vals.reshape(H, W)


def _palette_with_trns() -> bytes:
    """A palette PNG: index 0 (red) fully transparent via tRNS on the left half, index 1 (blue) on the right."""
    idx = np.zeros((H, W), np.uint8)
    idx[:, W // 2:] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    return _save(img, "PNG", transparency=0)


def _rgba_red_on_nothing() -> bytes:
    """RGBA: transparent red (alpha 0) everywhere except an opaque green right half."""
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:] = (255, 0, 0, 0)
    arr[:, W // 2:] = (0, 255, 0, 255)
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def _la() -> bytes:
    arr = np.zeros((H, W, 2), np.uint8)  # black, fully transparent on the left
    arr[:, W // 2:] = (50, 255)
    return _save(Image.fromarray(arr, "LA"), "PNG")


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, W)[None, :, None] * np.ones((H, 1, 3))
    return Image.fromarray((base * 0.8 + rng.integers(0, 40, (H, W, 3))).astype(np.uint8), "RGB")


def _expected_halves(left, right) -> np.ndarray:
    out = np.zeros((H, W, 3), int)
    out[:, : W // 2] = left
    out[:, W // 2:] = right
    return out


# kind -> (file bytes, extension in the source, expected stored RGB (H, W, 3) or None, tolerance)
def _kinds() -> dict[str, tuple[bytes, str, np.ndarray | None, int]]:
    grad = _gradient16()
    progressive = _save(_photo(), "JPEG", quality=95, progressive=True)
    kinds = {
        "cmyk": (_cmyk_jpeg((0, 255, 255, 0)), "jpg", _expected_halves((255, 0, 0), (255, 0, 0)), 6),
        "ycck": (_cmyk_jpeg((0, 255, 255, 0), ycck=True), "jpg", _expected_halves((255, 0, 0), (255, 0, 0)), 6),
        "gray": (_save(Image.new("L", (W, H), 100), "PNG"), "png", _expected_halves(100, 100), 0),
        "gray16": (_save(Image.fromarray(grad), "PNG"), "png",
                   np.repeat(np.round(grad / 257.0).astype(int)[..., None], 3, axis=-1), 0),
        "palette_trns": (_palette_with_trns(), "png", _expected_halves((255, 255, 255), (0, 0, 255)), 0),
        "rgba": (_rgba_red_on_nothing(), "png", _expected_halves((255, 255, 255), (0, 255, 0)), 0),
        "la": (_la(), "png", _expected_halves((255, 255, 255), (50, 50, 50)), 0),
        "progressive": (progressive, "jpg", _rgb(progressive), 0),  # the pixels as decoded, kept exactly
    }
    if features.check("webp"):
        kinds["webp"] = (_save(_photo(), "WEBP", lossless=True), "webp", np.asarray(_photo()).astype(int), 0)
    return kinds


@pytest.mark.parametrize("kind", list(_kinds()))
def test_each_kind_is_checked_into_the_expected_rgb(kind):
    data, _, want, tol = _kinds()[kind]
    got = check_image(data, LOSSLESS)
    assert (got.ext, got.width, got.height) == ("png", W, H)
    pixels = _rgb(got.data)
    assert np.abs(pixels - want).max() <= tol, kind


def test_sixteen_bit_png_is_scaled_not_clipped():
    grad = _gradient16()
    with Image.open(io.BytesIO(_save(Image.fromarray(grad), "PNG"))) as im:
        assert im.mode.startswith("I")  # Pillow reads 16-bit grayscale PNG as I;16
        out = np.asarray(to_rgb(im))[..., 0].astype(int)
    assert np.array_equal(out, np.round(grad / 257.0).astype(int))
    assert len(np.unique(out)) > 200  # a full 8-bit gradient, not a white image
    # mode "I" (32-bit container, 16-bit values) is scaled the same way
    as_i = Image.fromarray(grad.astype(np.int32), "I")
    assert np.array_equal(np.asarray(to_rgb(as_i))[..., 0].astype(int), out)


def test_transparent_red_on_nothing_is_white():
    with Image.open(io.BytesIO(_rgba_red_on_nothing())) as im:
        out = np.asarray(to_rgb(im))
    assert (out[:, 0] == 255).all()  # neither red (the hidden colour) nor black


def test_exif_orientation_is_applied_at_ingest():
    data = _oriented_jpeg(6)  # stored 48x32 (red left, blue right); shown rotated 90 degrees clockwise
    with Image.open(io.BytesIO(data)) as im:
        assert exif_orientation(im) == 6
    got = check_image(data, ImageRules(resolution=0))  # JPEG kept at its size: not stored byte for byte
    assert got.data != data and (got.width, got.height) == (H, W)
    with Image.open(io.BytesIO(got.data)) as im:
        assert exif_orientation(im) == 1  # no tag left to rotate it again
        arr = np.asarray(im).astype(int)
    assert arr.shape == (W, H, 3)
    top, bottom = arr[: W // 2 - 4].mean(axis=(0, 1)), arr[W // 2 + 4:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50  # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    # downscaled: the short side of the upright image (its width) becomes the resolution
    small = check_image(data, ImageRules(resolution=16))
    assert (small.width, small.height) == (16, 24)


def _upright_top_is_red(arr: np.ndarray) -> bool:
    arr = np.asarray(arr).astype(int)
    h = arr.shape[0]
    top, bottom = arr[: h // 2 - 2].mean(axis=(0, 1)), arr[h // 2 + 2:].mean(axis=(0, 1))
    return bool(top[0] > 200 > bottom[0] and bottom[2] > 200 > top[2])


def test_exif_orientation_is_applied_at_every_decode(tmp_path):
    data = _oriented_jpeg(6)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert _upright_top_is_red(decode_image(data))  # shard loader
    seen = infer.load_image(path, lambda img, cap: (np.asarray(img), cap))  # blip caption / blip itm
    assert seen.shape == (W, H, 3) and _upright_top_is_red(seen)
    mlflow_model = pytest.importorskip("components.tracking.mlflow_model",
                                       reason="mlflow is not installed (the workflow extra)")
    assert _upright_top_is_red(mlflow_model.decode_image(data))  # MLflow model, raw bytes
    assert _upright_top_is_red(mlflow_model.decode_image(base64.b64encode(data).decode()))  # and base64 text
    with Image.open(io.BytesIO(data)) as im:  # the transforms, given the file as decoded
        x = EvalTransform(32)(im)[0]
        assert x.shape == (3, 32, 32)
        assert x[0, :8].mean() > x[0, -8:].mean() and x[2, -8:].mean() > x[2, :8].mean()
        y = TrainTransform(32, min_scale=1.0, randaugment=False, flip=False)(im, "a photo", random.Random(0))[0]
        assert y[0, :8].mean() > y[0, -8:].mean() and y[2, -8:].mean() > y[2, :8].mean()


def test_to_rgb_is_idempotent_and_returns_a_new_image():
    with Image.open(io.BytesIO(_oriented_jpeg(8))) as im:
        once = to_rgb(im)
    twice = to_rgb(once)
    assert twice is not once and twice.size == once.size == (H, W)
    assert np.array_equal(np.asarray(once), np.asarray(twice))
    rgb = _halves()
    assert to_rgb(rgb) is not rgb


def test_every_kind_passes_ingest_into_a_shard(tmp_path):
    kinds = _kinds()
    kinds["exif6"] = (_oriented_jpeg(6), "jpg", None, 0)
    samples = [{"__key__": k, ext: data, "txt": f"a photo of kind {k}".encode()} for k, (data, ext, _, _) in kinds.items()]
    src = tmp_path / "src"
    src.mkdir()
    (src / "part-00000.tar").write_bytes(tar_bytes(samples))
    out = str(tmp_path / "out")
    cfg = load_config(None, ["ingest.resolution=0", "ingest.image_format=png", "ingest.dedupe=false"])
    m = ingest.run(cfg, str(src), out, progress=False).manifest
    assert m.samples_out == m.samples_in == len(kinds) and not any(m.rejected.values()), m.rejected
    stored = {s["__key__"]: s for u in storage.list_uris(out, ".tar") for s in iter_shard(u)}
    assert sorted(stored) == sorted(kinds), "a good photo was rejected"
    for k, (_, _, want, tol) in kinds.items():
        pixels = _rgb(stored[k]["png"])
        if want is not None:
            assert np.abs(pixels - want).max() <= tol, k
    assert _upright_top_is_red(_rgb(stored["exif6"]["png"]))
