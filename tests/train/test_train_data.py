"""The dataset folder and the cache: captions, kohya repeats, buckets, skipped files named, bad captions and empty
folders refused, encoders run once and the cache file reused until an input changes."""

from __future__ import annotations

import math
import os

import pytest
import torch
from PIL import Image

from train_helpers import tiny_text_encoder

from comfyui_stablecascade import host
from comfyui_stablecascade.cascade.effnet import EffNetConfig, EfficientNetEncoder
from comfyui_stablecascade.cascade.random_init import randomize_
from comfyui_stablecascade.train import cache as cache_mod
from comfyui_stablecascade.train.cache import build_cache
from comfyui_stablecascade.train.data import buckets, load_pixels, scan_folder
from comfyui_stablecascade.train.errors import TrainingInputError


def _image(path, size=(64, 64), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square [zorb]", encoding="utf-8")
    _image(tmp_path / "b.jpg", (128, 64))
    _image(tmp_path / "3_sks dog" / "c.png", (64, 96))
    _image(tmp_path / "small.png", (20, 20))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.md").write_text("ignored")
    _image(tmp_path / "other" / "d.png")  # not a kohya folder: not read
    return tmp_path


def test_scan_reads_captions_repeats_and_names_what_it_skips(folder):
    ds = scan_folder(str(folder), default_caption="", area=64, min_side=32)
    by_name = {os.path.basename(s.path): s for s in ds.samples}
    assert set(by_name) == {"a.png", "b.jpg", "c.png"}
    assert by_name["a.png"].caption == "a red square [zorb]" and by_name["a.png"].repeats == 1
    assert by_name["c.png"].caption == "sks dog" and by_name["c.png"].repeats == 3  # kohya name, 3 repeats
    assert by_name["b.jpg"].caption == "" and len(ds) == 5
    skipped = {os.path.basename(p): why for p, why in ds.skipped}
    assert set(skipped) == {"small.png", "broken.png"}
    assert "20x20 pixels, smaller than min_side=32" in skipped["small.png"]
    assert "not a readable image" in skipped["broken.png"]
    h, w = by_name["b.jpg"].bucket  # 128 wide x 64 high -> a wide bucket
    assert w > h and h % 32 == 0 and w % 32 == 0
    with_default = scan_folder(str(folder), default_caption="a photo of [zorb]", area=64, min_side=32)
    assert {os.path.basename(s.path): s.caption for s in with_default.samples}["b.jpg"] == "a photo of [zorb]"
    assert with_default.trigger == "a photo of [zorb]"


def test_buckets_are_32_pixel_multiples_around_the_area():
    found = buckets(768)
    assert (768, 768) in found and len(found) >= 20
    for h, w in found:
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h * w / 768**2 - 1) < 0.1, (h, w)
    assert {(h, w) for h, w in found} == {(w, h) for h, w in found}  # every ratio and its inverse


def test_load_pixels_fills_the_bucket(folder):
    ds = scan_folder(str(folder), area=64, min_side=32)
    for s in ds.samples:
        x = load_pixels(s)
        assert x.shape == (3, *s.bucket) and x.dtype == torch.float32
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        assert abs(float(x[0].mean()) - 200 / 255) < 0.02  # the colour survives resize + crop


def test_non_utf8_caption_empty_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(TrainingInputError, match="does not exist"):
        scan_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInputError, match=r"empty.* holds no usable images"):
        scan_folder(str(tmp_path / "empty"))
    _image(tmp_path / "tiny" / "x.png", (16, 16))
    with pytest.raises(TrainingInputError, match=r"no usable images.*x\.png \(16x16 pixels"):
        scan_folder(str(tmp_path / "tiny"), min_side=32)
    _image(tmp_path / "bad" / "x.png")
    (tmp_path / "bad" / "x.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TrainingInputError, match=r"x\.txt' is not UTF-8 .*save it as UTF-8"):
        scan_folder(str(tmp_path / "bad"), min_side=32)
    with pytest.raises(TrainingInputError, match="area=100 is not a multiple"):
        scan_folder(str(tmp_path / "bad"), area=100)


def test_cache_encodes_once_and_is_reused_until_an_input_changes(folder, monkeypatch):
    effnet = host.wrap(randomize_(EfficientNetEncoder(EffNetConfig.tiny()), 0).eval(), "effnet")
    te = host.wrap(tiny_text_encoder(), "text_encoder")
    ds = scan_folder(str(folder), area=64, min_side=32)
    calls = []
    real = cache_mod.effnet_encode
    monkeypatch.setattr(cache_mod, "effnet_encode", lambda h, x: calls.append(1) or real(h, x))
    first = build_cache(ds, effnet, te)
    assert len(calls) == 3 and len(first) == 5 and first.has_text
    s = next(x for x in first.samples if x.caption == "a red square [zorb]")  # a.png, 64 x 64
    assert s.latent.shape == (16, 2, 2) and s.clip_text.shape == (77, 32) and s.clip_pooled.shape == (1, 32)
    files = os.listdir(folder / ".scw_cache")
    assert len(files) == 1 and files[0].endswith(".safetensors")
    again = build_cache(scan_folder(str(folder), area=64, min_side=32), effnet, te)
    assert len(calls) == 3, "an unchanged dataset must come from the cache file"
    for a, b in zip(first.samples, again.samples):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.clip_text, b.clip_text) and a.caption == b.caption
    assert again.repeats == first.repeats and torch.equal(again.empty_text[0], first.empty_text[0])
    (folder / "a.txt").write_text("another caption", encoding="utf-8")
    (folder / "b.txt").write_text("another caption", encoding="utf-8")  # two images, one caption
    changed = build_cache(scan_folder(str(folder), area=64, min_side=32), effnet, te)
    assert len(calls) == 6, "a changed caption must encode again"
    assert len(os.listdir(folder / ".scw_cache")) == 2  # written (shared caption tensors included)
    same = [s for s in changed.samples if s.caption == "another caption"]
    assert len(same) == 2 and torch.equal(same[0].clip_text, same[1].clip_text)
    no_text = build_cache(ds, effnet)  # tokens being learned: captions are not encoded
    assert not no_text.has_text and no_text.samples[0].clip_text is None
    with pytest.raises(TrainingInputError, match="needs the EffNet"):
        build_cache(ds, None)


def test_batches_keep_one_bucket_per_batch_and_expand_repeats(folder):
    from train_helpers import tiny_cache

    cache = tiny_cache(3, repeats=[2, 1, 3])
    cache.samples[1].latent = torch.zeros(16, 2, 4)
    epoch = list(cache.batches(2, torch.Generator().manual_seed(0)))
    flat = sorted(i for b in epoch for i in b)
    assert flat == [0, 0, 1, 2, 2, 2]
    assert all(len({tuple(cache.samples[i].latent.shape) for i in b}) == 1 for b in epoch)
    assert math.isclose(len(cache), 6)
