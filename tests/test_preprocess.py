"""runtime.preprocess: every image mode to RGB, EXIF orientation, bombs, truncation, resize rules, input kinds."""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemap.errors import ImageError
from edgemap.runtime.preprocess import PreprocessContract, open_image, preprocess, preprocess_batch, to_rgb


def decode(path: Path, **kw) -> np.ndarray:
    return np.asarray(open_image(path, **kw))


def decode_twice(path: Path) -> np.ndarray:
    a, b = decode(path), decode(path)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    np.testing.assert_array_equal(a, b)  # deterministic
    return a


# ---- modes → RGB ------------------------------------------------------------------------------


def test_grayscale_L(tmp_path: Path) -> None:
    g = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = decode_twice(tmp_path / "g.png")
    np.testing.assert_array_equal(out, np.repeat(g[:, :, None], 3, axis=2))


def test_palette_P_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    im.putdata([0, 1, 2, 3, 3, 2, 1, 0])
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" not in check.info
    out = decode_twice(tmp_path / "p.png")
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    np.testing.assert_array_equal(out, pal[np.array([[0, 1, 2, 3], [3, 2, 1, 0]])])


def test_palette_P_with_transparency_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 255, 7, 7, 7] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    im.save(tmp_path / "pt.png", transparency=2)  # index 2 is fully transparent
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and check.info.get("transparency") is not None
    out = decode_twice(tmp_path / "pt.png")
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 255], [255, 255, 255]])


def _expected_over_white(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgb = np.array([[[0, 0, 0], [200, 100, 50], [10, 20, 30], [0, 0, 0]]], dtype=np.uint8)
    a = np.array([[0, 255, 128, 64]], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, a]), mode="RGBA").save(tmp_path / "a.png")
    out = decode_twice(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # fully transparent → white, not black
    np.testing.assert_array_equal(out[0, 1], [200, 100, 50])  # opaque → unchanged
    assert np.abs(out.astype(np.float64) - _expected_over_white(rgb, a)).max() <= 1.0


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255], [100, 128]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as check:
        assert check.mode == "LA"
    out = decode_twice(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    gray = np.repeat(la[..., :1], 3, axis=2)
    assert np.abs(out.astype(np.float64) - _expected_over_white(gray, la[..., 1])).max() <= 1.0
    assert out[0, 2, 0] == out[0, 2, 1] == out[0, 2, 2]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_png_colour_key_transparency_is_composited_like_alpha(tmp_path: Path, mode: str) -> None:
    """optipng/oxipng store on/off alpha as a tRNS colour key in RGB or L PNGs: it must read as the RGBA original."""
    px = np.array([[0, 200, 0, 90]], dtype=np.uint8)
    a = np.where(px == 0, 0, 255).astype(np.uint8)
    keyed = Image.fromarray(px if mode == "L" else np.repeat(px[..., None], 3, axis=2), mode=mode)
    keyed.save(tmp_path / "keyed.png", transparency=0 if mode == "L" else (0, 0, 0))
    Image.fromarray(np.dstack([np.repeat(px[..., None], 3, axis=2), a]), mode="RGBA").save(tmp_path / "rgba.png")
    with Image.open(tmp_path / "keyed.png") as check:
        assert check.mode == mode and "transparency" in check.info
    out = decode_twice(tmp_path / "keyed.png")
    np.testing.assert_array_equal(out, decode_twice(tmp_path / "rgba.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [200, 200, 200])


def test_16bit_png_keeps_the_top_8_bits(tmp_path: Path) -> None:
    v = np.array([[0x0000, 0x00FF, 0x0100, 0xABCD], [0x7FFF, 0x8000, 0xFF00, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as check:
        assert check.mode in ("I;16", "I")  # Pillow versions differ in how they open 16-bit PNGs
    out = decode_twice(tmp_path / "i16.png")
    expected = (v >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[:, :, None], 3, axis=2))


def test_in_memory_I16_and_I32_and_F(tmp_path: Path) -> None:
    v = np.array([[0x1234, 0xFFFF]], dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(v)))[0, :, 0], [0x12, 0xFF])
    i32 = Image.fromarray(np.array([[-5, 0x3456, 70000]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(i32))[0, :, 0], [0, 0x34, 0xFF])  # clipped to 16 bits first
    f = Image.fromarray(np.array([[-5.0, 100.7, 300.0, np.nan]], dtype=np.float32), mode="F")
    f.save(tmp_path / "f.tif")
    np.testing.assert_array_equal(decode_twice(tmp_path / "f.tif")[0, :, 0], [0, 100, 255, 0])


def test_1bit(tmp_path: Path) -> None:
    bits = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as check:
        assert check.mode == "1"
    out = decode_twice(tmp_path / "b.png")
    np.testing.assert_array_equal(out, np.repeat((bits * 255).astype(np.uint8)[:, :, None], 3, axis=2))


CMYK_COLOURS = {  # CMYK → expected RGB, by Pillow's rule (since 4.3): R = round((255 - C) * (255 - K) / 255) ...
    (0, 0, 0, 0): (255, 255, 255),
    (0, 255, 255, 0): (255, 0, 0),
    (255, 0, 255, 0): (0, 255, 0),
    (0, 0, 0, 255): (0, 0, 0),
    (0, 0, 0, 100): (155, 155, 155),
}


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path: Path, fmt: str) -> None:
    """CMYK JPEG (Adobe, stored inverted) and lossless CMYK TIFF decode to the same colours."""
    p = tmp_path / ("c.jpg" if fmt == "JPEG" else "c.tif")
    blocks = [Image.new("CMYK", (16, 16), c) for c in CMYK_COLOURS]
    im = Image.new("CMYK", (16 * len(blocks), 16))
    for i, b in enumerate(blocks):
        im.paste(b, (16 * i, 0))
    im.save(p, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = decode_twice(p).astype(int)
    tol = 3 if fmt == "JPEG" else 0
    for i, rgb in enumerate(CMYK_COLOURS.values()):
        centre = out[8, 16 * i + 8]
        assert np.abs(centre - np.array(rgb)).max() <= tol, (i, centre, rgb)


def _ycck_jpeg(cmyk: np.ndarray) -> bytes:
    """A YCCK JPEG (Adobe transform 2) of a CMYK array: Pillow cannot write one, so build it.

    YCCK stores Y/Cb/Cr of the inverted CMY (i.e. of an RGB) plus K. Pillow writes the four
    planes as given; flipping the Adobe marker's transform byte to 2 makes libjpeg decode
    them as YCCK.
    """
    rgb = (255 - cmyk[..., :3]).astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ycc = np.stack(
        [0.299 * r + 0.587 * g + 0.114 * b, -0.168736 * r - 0.331264 * g + 0.5 * b + 128, 0.5 * r - 0.418688 * g - 0.081312 * b + 128],
        -1,
    )
    planes = np.dstack([np.clip(np.round(ycc), 0, 255).astype(np.uint8), cmyk[..., 3]])
    buf = io.BytesIO()
    Image.fromarray(planes, mode="CMYK").save(buf, format="JPEG", quality=100)
    data = bytearray(buf.getvalue())
    at = data.find(b"Adobe")
    assert at > 0 and data[at + 11] == 0  # transform 0: plain CMYK as written by Pillow
    data[at + 11] = 2
    return bytes(data)


def test_ycck_jpeg(tmp_path: Path) -> None:
    colours = list(CMYK_COLOURS)
    cmyk = np.concatenate([np.full((16, 16, 4), c, dtype=np.uint8) for c in colours], axis=1)
    p = tmp_path / "ycck.jpg"
    p.write_bytes(_ycck_jpeg(cmyk))
    with Image.open(p) as check:
        assert check.mode == "CMYK"
        check.load()
        assert np.abs(np.asarray(check).astype(int) - cmyk).max() <= 4  # really decoded as YCCK
    out = decode_twice(p).astype(int)
    for i, rgb in enumerate(CMYK_COLOURS.values()):
        assert np.abs(out[8, 16 * i + 8] - np.array(rgb)).max() <= 4, (i, out[8, 16 * i + 8], rgb)


def test_cmyk_decodes_like_pillow_convert(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(arr, mode="CMYK").save(tmp_path / "c.tif")
    with Image.open(tmp_path / "c.tif") as im:
        ref = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode(tmp_path / "c.tif"), ref)
    # and the rule, by hand (Pillow >= 4.3, python-pillow/Pillow#2699), so a Pillow change would show here
    c, m, y, k = (arr[..., i].astype(np.float64) for i in range(4))
    by_hand = np.stack([np.round((255 - v) * (255 - k) / 255) for v in (c, m, y)], -1).astype(np.uint8)
    np.testing.assert_array_equal(ref, by_hand)


# ---- EXIF orientation ---------------------------------------------------------------------------


def _quadrants(w: int = 32, h: int = 16) -> np.ndarray:
    """An asymmetric picture: four flat coloured quadrants (survives JPEG almost exactly)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 0)
    return a


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied(tmp_path: Path, fmt: str) -> None:
    src = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    p = tmp_path / ("o.jpg" if fmt == "JPEG" else "o.png")
    Image.fromarray(src).save(p, format=fmt, exif=exif, **({"quality": 98} if fmt == "JPEG" else {}))
    with Image.open(p) as check:
        assert check.getexif().get(0x0112) == 6 and check.size == (32, 16)
    out = decode_twice(p)
    expected = np.rot90(src, k=-1)  # clockwise
    assert out.shape == (32, 16, 3)
    if fmt == "PNG":
        np.testing.assert_array_equal(out, expected)
    else:  # compare block centres away from JPEG's edge ringing
        for y, x in ((4, 4), (4, 12), (28, 4), (28, 12)):
            assert np.abs(out[y, x].astype(int) - expected[y, x]).max() <= 8


def test_exif_orientation_is_the_same_for_every_input_kind(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    p = tmp_path / "o8.jpg"
    Image.fromarray(_quadrants()).save(p, exif=exif, quality=95)
    c = PreprocessContract(20, 12, resize="stretch")
    from_path = preprocess(p, c)
    with Image.open(p) as im:
        from_pil = preprocess(im, c)
    np.testing.assert_array_equal(preprocess(p.read_bytes(), c), from_path)
    np.testing.assert_array_equal(from_pil, from_path)


def _corrupt_exif_jpeg(path: Path, seed: int) -> None:
    """A JPEG whose EXIF orientation entry claims 1,000 bytes of data: Pillow warns "Tag data larger than file"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
        buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    tiff = data.find(b"Exif\x00\x00") + 6
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    entry = tiff + 10  # IFD0 at offset 8: a 2-byte count, then 12-byte entries (tag, type, count, value)
    data[entry + 2:entry + 8] = struct.pack(order + "HI", 2, 1000)
    path.write_bytes(bytes(data))


def test_pillow_warnings_name_the_image_once_each(tmp_path: Path) -> None:
    """Pillow's "Tag data larger than file" warning named no file and was shown once per process (for the first
    such image only); each image with one is now named, once, whichever decode meets it (scan, then training),
    and a -W filter the user set still silences them. In a subprocess: pytest records warnings itself."""
    import subprocess
    import sys

    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (cls == "b") * 120, np.uint8)).save(tmp_path / "d" / cls / f"{i}.png")
    _corrupt_exif_jpeg(tmp_path / "d" / "a" / "bad one.jpg", 1)
    _corrupt_exif_jpeg(tmp_path / "d" / "b" / "bad two.jpg", 2)
    code = ("import sys; from edgemap.runtime.preprocess import open_image\n"
            "for p in sys.argv[1:] * 2: open_image(p)\n")
    files = [str(tmp_path / "d" / "a" / "bad one.jpg"), str(tmp_path / "d" / "b" / "bad two.jpg")]
    r = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    for f, line in zip(files, lines):
        assert line.startswith(f + ": Tag data larger than file") and "used as decoded" in line, r.stderr
    r = subprocess.run([sys.executable, "-m", "edgemap", "datasets", "scan", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.count("bad one.jpg: Tag data") == 1, r.stdout + r.stderr
    assert "TiffImagePlugin" not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code, *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # an image refused anyway (a cut TIFF: Pillow warns "Corrupt EXIF data" first) is not said to be "used"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, "TIFF", compression="tiff_adobe_deflate")
    (tmp_path / "cut.tif").write_bytes(buf.getvalue()[:200])
    refuse = ("import sys; from edgemap.runtime.preprocess import open_image\n"
              "try:\n    open_image(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", refuse, str(tmp_path / "cut.tif")], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ImageError" and "used as decoded" not in r.stderr, r.stdout + r.stderr


def test_a_flood_of_pillow_warnings_is_bounded(tmp_path: Path) -> None:
    """A 16x16 PNG whose EXIF holds 2,000 bad tags: every tag warned; de-duplicating them in a list was quadratic
    (65,535 tags: 14 s per decode) and the image's line grew to megabytes. At most a few, each cut short."""
    import subprocess
    import sys

    n = 2000
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHLL", t, 4, 100000, 8) for t in range(1, n + 1))
    exif = b"II*\x00" + struct.pack("<L", 8) + ifd + struct.pack("<L", 0)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (tmp_path / "flood.png").write_bytes(png[:33] + chunk(b"eXIf", exif) + png[33:])
    code = "import sys; from edgemap.runtime.preprocess import open_image\nopen_image(sys.argv[1])\n"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "flood.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 2000 and "… (more warnings)" in lines[0], r.stderr[:500]


# ---- refusals ----------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_refused_by_default(tmp_path: Path) -> None:
    p = tmp_path / "bomb é.png"
    _png_header_only(p, 50_000, 50_000)
    assert p.stat().st_size < 200
    # over 2x Pillow's limit: Pillow's own guard (kept on) refuses it at open, before edgemap's check
    with pytest.raises(ImageError, match=r"bomb é\.png: over 178,956,970 pixels exceeds the limit of 89,478,485 "):
        open_image(p)
    with pytest.raises(ImageError, match=r"bomb é\.png: over 178,956,970 pixels exceeds the limit of 89,478,485 "):
        open_image(p, max_pixels=None)
    # a --max-pixels above Pillow's own refusal is honoured (was refused whatever it said); this header-only file
    # then fails as truncated, and Pillow's global limit is back as it was
    _png_header_only(p, 20_000, 20_000)
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(p, max_pixels=500_000_000)
    with pytest.raises(ImageError, match=r"20000x20000 = 400,000,000 pixels exceeds the limit of 300,000,000"):
        open_image(p, max_pixels=300_000_000)
    _png_header_only(p, 50_000, 50_000)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    # between 1x and 2x Pillow's limit Pillow only warns: edgemap's own check refuses it
    _png_header_only(p, 10_000, 10_000)
    with pytest.raises(ImageError, match=r"bomb é\.png: 10000x10000 = 100,000,000 pixels exceeds the limit of 89,478,485"):
        open_image(p)
    with pytest.raises(ImageError, match=r"bomb é\.png: 10000x10000 .* exceeds the limit of 89,478,485"):
        open_image(p, max_pixels=None)  # None = Pillow's global limit, still on
    # a genuine 100 Mpx photo is let through by raising the limit (this one then fails as truncated)
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(p, max_pixels=120_000_000)
    with pytest.raises(ImageError, match="decompression|exceeds"):
        preprocess(p.read_bytes(), PreprocessContract(8, 8))
    assert Image.MAX_IMAGE_PIXELS is not None


def test_decompression_limit_configurable(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ImageError, match="3,000 pixels exceeds the limit of 2,999"):
        open_image(tmp_path / "x.png", max_pixels=2_999)
    assert open_image(tmp_path / "x.png", max_pixels=3_000).size == (60, 50)



def test_max_pixels_above_pillows_refusal_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses over 2 x its global limit before edgemap looks: a larger --max-pixels still decodes the image."""
    Image.fromarray(np.full((50, 60, 3), 7, dtype=np.uint8)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 3,000 pixels: over twice Pillow's limit
    with pytest.raises(ImageError, match="over 2,000 pixels exceeds the limit of 1,000"):
        open_image(tmp_path / "x.png", max_pixels=None)
    with pytest.raises(ImageError, match="over 2,000 pixels exceeds the limit of 1,500"):
        open_image(tmp_path / "x.png", max_pixels=1_500)
    assert np.asarray(open_image(tmp_path / "x.png", max_pixels=3_000)).max() == 7
    assert Image.MAX_IMAGE_PIXELS == 1_000

    # threads: a raised limit in one thread never lets another thread's bomb through, nor refuses its good images
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bool:
        if i % 2:
            return np.asarray(open_image(tmp_path / "x.png", max_pixels=3_000)).max() == 7
        try:
            open_image(tmp_path / "x.png", max_pixels=None)
        except ImageError:
            return True
        return False

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(one, range(400)))
    finally:
        sys.setswitchinterval(old_interval)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, format=fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"t\.{fmt.lower()}: not a readable image"):
        open_image(p)
    with pytest.raises(ImageError, match="<bytes>: not a readable image"):
        open_image(data[: len(data) // 2])


@pytest.mark.parametrize("content", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "fake.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match="fake.jpg: " + ("empty file" if not content else "not a readable image")):
        open_image(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nope.png: file not found"):
        open_image(tmp_path / "nope.png")


# ---- resize rules ------------------------------------------------------------------------------


def _ramp(w: int, h: int) -> np.ndarray:
    """Red = column index, green = row index: resized pixels tell where they came from."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    a[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    return a


@pytest.mark.parametrize("size", [(40, 20), (20, 40), (7, 3), (1, 1), (300, 299)])
@pytest.mark.parametrize("rule", ["stretch", "shorter_center_crop"])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_resize_shapes(size: tuple[int, int], rule: str, crop_pct: float) -> None:
    im = Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    for h, w in ((32, 32), (24, 40)):
        out = preprocess(im, PreprocessContract(h, w, resize=rule, crop_pct=crop_pct))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_centre_crop_without_resize_is_exact() -> None:
    # 20x20 with crop_pct 0.5 for a 10x10 input: scale = (10/20)/0.5 = 1, so a pure centre crop
    src = _ramp(20, 20)
    out = preprocess(src, PreprocessContract(10, 10, crop_pct=0.5))
    np.testing.assert_array_equal(out, src[5:15, 5:15])


def test_shorter_side_then_centre_crop_by_hand() -> None:
    # 40x20 → shorter side to 10 → 20x10 (nearest picks source column 2x+1) → centre 10 columns from x=5
    out = preprocess(_ramp(40, 20), PreprocessContract(10, 10, interpolation="nearest"))
    np.testing.assert_array_equal(out[0, :, 0], [2 * x + 1 for x in range(5, 15)])
    np.testing.assert_array_equal(out[:, 0, 1], [2 * y + 1 for y in range(10)])


@pytest.mark.parametrize("shape", [(1, 200_000), (200_000, 1), (3, 50_000)])
def test_a_strip_image_is_preprocessed_in_bounded_memory(tmp_path: Path, shape: tuple[int, int]) -> None:
    """A few hundred bytes of PNG, 200000x1: resizing it whole to 224 high would take ~30 GB."""
    import subprocess
    import sys

    Image.fromarray(np.full((*shape, 3), 128, np.uint8)).save(tmp_path / "strip.png")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from edgemap.runtime.preprocess import preprocess, PreprocessContract; "
            "x = preprocess(sys.argv[1], PreprocessContract(224, 224)); print(x.shape, int(x.min()), int(x.max()))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "strip.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(224,", "224,", "3)", "128", "128"]


def test_ordinary_images_are_resized_whole_then_cropped() -> None:
    """The window-only resize of strips must not change any ordinary image (trained runs keep their inputs)."""
    rng = np.random.default_rng(0)
    for h, w in ((37, 300), (500, 61), (224, 224), (20, 9)):
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for interp in ("nearest", "bilinear", "bicubic", "lanczos"):
            c = PreprocessContract(32, 32, crop_pct=0.875, interpolation=interp)
            scale = max(32 / h, 32 / w) / 0.875
            nw, nh = max(32, round(w * scale)), max(32, round(h * scale))
            whole = np.asarray(Image.fromarray(src).resize((nw, nh), resample=getattr(Image.Resampling, interp.upper()),
                                                           reducing_gap=None))
            left, top = (nw - 32) // 2, (nh - 32) // 2
            np.testing.assert_array_equal(preprocess(src, c), whole[top:top + 32, left:left + 32])


def test_stretch_by_hand() -> None:
    # 40x20 → 10x10 ignoring aspect: columns every 4 (nearest picks 4x+2), rows every 2 (2y+1)
    out = preprocess(_ramp(40, 20), PreprocessContract(10, 10, resize="stretch", interpolation="nearest"))
    np.testing.assert_array_equal(out[0, :, 0], [4 * x + 2 for x in range(10)])
    np.testing.assert_array_equal(out[:, 0, 1], [2 * y + 1 for y in range(10)])


def test_crop_pct_keeps_the_centre() -> None:
    # 256x256 with crop_pct 0.875 for 224: resized to 256 (unchanged), centre 224 crop at offset 16
    src = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = preprocess(Image.fromarray(src), PreprocessContract(224, 224, crop_pct=0.875))
    np.testing.assert_array_equal(out, src[16:240, 16:240])


def test_same_size_array_passes_through_unchanged() -> None:
    a = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(a, PreprocessContract(12, 16)), a)


# ---- input kinds -------------------------------------------------------------------------------


def test_path_bytes_pil_and_array_give_the_same_array(odd_tmp: Path) -> None:
    src = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    p = odd_tmp / "photo é 日本.png"
    Image.fromarray(src).save(p)
    c = PreprocessContract(16, 24, crop_pct=0.875)
    ref = preprocess(p, c)
    np.testing.assert_array_equal(preprocess(str(p), c), ref)
    np.testing.assert_array_equal(preprocess(p.read_bytes(), c), ref)
    with Image.open(p) as im:
        np.testing.assert_array_equal(preprocess(im, c), ref)
    np.testing.assert_array_equal(preprocess(src, c), ref)


def test_gray_and_rgba_arrays_match_their_pil_decoding(tmp_path: Path) -> None:
    c = PreprocessContract(8, 8, resize="stretch")
    g = np.random.default_rng(4).integers(0, 256, (11, 13), dtype=np.uint8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(preprocess(g, c), preprocess(tmp_path / "g.png", c))
    rgba = np.random.default_rng(5).integers(0, 256, (11, 13, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess(rgba, c), preprocess(tmp_path / "a.png", c))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((4,), dtype=np.uint8)])
def test_bad_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ImageError):
        preprocess(bad, PreprocessContract(4, 4))


def test_preprocess_batch(tmp_path: Path) -> None:
    c = PreprocessContract(8, 8)
    buf = io.BytesIO()
    Image.fromarray(_quadrants()).save(buf, format="PNG")
    batch = preprocess_batch([buf.getvalue(), _quadrants(), Image.fromarray(_quadrants())], c)
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], batch[1])
    np.testing.assert_array_equal(batch[0], batch[2])
    assert preprocess_batch([], c).shape == (0, 8, 8, 3)


def test_contract_round_trip_and_validation() -> None:
    c = PreprocessContract(24, 32, resize="stretch", crop_pct=0.9, interpolation="bicubic", mean=(1.0, 2.0, 3.0))
    assert PreprocessContract.from_dict(c.to_dict()) == c
    for bad in ({"resize": "zoom"}, {"interpolation": "magic"}, {"crop_pct": 0.0}, {"crop_pct": 1.5}):
        with pytest.raises(ValueError):
            PreprocessContract(8, 8, **bad)
    with pytest.raises(ImageError, match="invalid preprocessing contract"):
        PreprocessContract.from_dict({"width": 8})
    # read strictly (a hand-edited model or model.json): each was accepted, and fed the model other pixels
    good = c.to_dict()
    for change, message in (
        ({"mean": None}, "missing 'mean'"),  # None: the key removed (below)
        ({"height": 24.9}, "height must be a whole number"),  # was read as 24
        ({"width": "32"}, "width must be a whole number"),
        ({"layout": "NCHW float32 BGR"}, "this runtime feeds 'NHWC uint8 RGB'"),  # was not checked
        ({"pad_color": [0, 0, 0]}, "unknown key(s) 'pad_color': written by a newer edgemap?"),  # was ignored
        ({"crop_pct": True}, "crop_pct must be a number"),
        ({"mean": "127"}, "mean must be a list of 3 numbers"),
        ({"std": [1, 2, 0]}, "std must be positive"),
    ):
        d = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(ImageError, match=re.escape(message)):
            PreprocessContract.from_dict(d)
    assert PreprocessContract.from_dict({**good, "height": 24}).height == 24


def test_not_an_image_type_is_an_image_error() -> None:
    """predict(5) / predict(None) said "'int' object has no attribute 'read'"; a dict was read as a list of paths."""
    from edgemap.runtime import Classifier  # importable from the package, as the device wheel has it
    from edgemap.runtime.classifier import _as_list

    assert Classifier.__name__ == "Classifier"
    for bad in (5, None, 2.5):
        with pytest.raises(ImageError, match="is not an image"):
            preprocess(bad, PreprocessContract(8, 8))  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="a dict is not an image"):
        _as_list({"a.jpg": 1})  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="a set is not an image"):  # no order: results could not follow the inputs
        _as_list({"a.jpg", "b.jpg"})  # type: ignore[arg-type]
    assert _as_list(frozenset({"a.jpg"})) == ["a.jpg"]  # one item has its order


def test_an_empty_file_is_called_empty(tmp_path: Path) -> None:
    """A copy cut short at 0 bytes was "not a readable image (UnidentifiedImageError: cannot identify image file)"."""
    (tmp_path / "cut.jpg").write_bytes(b"")
    for source in (tmp_path / "cut.jpg", str(tmp_path / "cut.jpg"), b""):
        with pytest.raises(ImageError, match=r"empty file \(0 bytes\)"):
            open_image(source)
    (tmp_path / "junk.jpg").write_bytes(b"x")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(tmp_path / "junk.jpg")


def test_importing_the_runtime_leaves_an_apps_bomb_policy_alone(tmp_path: Path) -> None:
    """Importing edgemap.runtime (or a device wheel) put an "ignore" filter for Pillow's DecompressionBombWarning in
    front of the app's own: an app that had set "error" for it opened over-limit images without a word. Inside
    edgemap's own decode the warning is still not shown (open_image enforces the limit itself)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import io, sys, warnings
        import numpy as np
        from PIL import Image
        if sys.argv[1] == "error":
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = 1000
        buf = io.BytesIO()
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG")
        from edgemap.runtime.preprocess import open_image
        try:
            Image.open(io.BytesIO(buf.getvalue())).load()
            print("app: opened")
        except Image.DecompressionBombWarning:
            print("app: refused")
        open_image(buf.getvalue(), max_pixels=5000)  # a raised limit: decoded, silently
        print("edgemap: opened")
    """)
    env = {**os.environ, "PYTHONWARNINGS": ""}
    strict = subprocess.run([sys.executable, "-c", script, "error"], capture_output=True, text=True, env=env)
    assert strict.returncode == 0 and strict.stdout.split("\n")[:2] == ["app: refused", "edgemap: opened"], strict
    lax = subprocess.run([sys.executable, "-c", script, "default"], capture_output=True, text=True, env=env)
    assert lax.stdout.split("\n")[:2] == ["app: opened", "edgemap: opened"], lax
    assert lax.stderr.count("DecompressionBombWarning") == 1, lax.stderr  # the app's own open warned; edgemap's did not
