"""`save_video`: the formats chosen by the suffix (animated WebP included), others refused."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from miva.cli import main
from miva.media import save_video
from miva.pipeline import MivaOutput


def frames(count=5, height=24, width=40):
    """Smooth moving gradients: every frame differs from the one before (WebP stores repeats once)."""
    x = np.linspace(0, 200, width)[None, :, None]
    y = np.linspace(0, 50, height)[:, None, None]
    return np.stack([np.broadcast_to((x + y + 9 * i) % 256, (height, width, 3)) for i in range(count)]).astype(np.uint8)


def read_webp(path):
    with Image.open(path) as image:
        assert image.format == "WEBP" and image.info.get("loop") == 0
        pixels, durations = [], []
        for frame in ImageSequence.Iterator(image):
            pixels.append(np.asarray(frame.convert("RGB")))  # decodes the frame, which sets its duration
            durations.append(frame.info["duration"])
    return np.stack(pixels), durations


def test_webp_round_trip(tmp_path):
    clip = frames()
    pixels, durations = read_webp(save_video(clip, tmp_path / "a" / "clip.WEBP", fps=8))
    assert pixels.shape == clip.shape and durations == [125] * len(clip)
    assert np.abs(pixels.astype(int) - clip).mean() < 3


def test_the_api_and_the_cli_write_webp(tmp_path, tiny_base):
    path = MivaOutput(frames=frames(3), fps=4).save(tmp_path / "out.webp")
    assert read_webp(path)[0].shape == (3, 24, 40, 3)
    image = tmp_path / "first.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    out = tmp_path / "cli.webp"
    assert main(["animate", "--base", "tiny", "--image", str(image), "--frames", "3", "--steps", "1", "--out", str(out)]) == 0
    assert read_webp(out)[0].shape == (3, 32, 32, 3)


def test_unknown_suffixes_are_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4, \.webm, \.mov, \.gif, \.webp"):
        save_video(frames(2), tmp_path / "clip.avi")
    assert not list(tmp_path.iterdir())


def test_the_cli_refuses_a_bad_suffix_before_loading(tmp_path, capsys, monkeypatch):
    import miva.cli

    monkeypatch.setattr(miva.cli, "load_pipeline", lambda args: pytest.fail("the base was loaded"))
    assert main(["animate", "--base", "tiny", "--image", "x.png", "--out", str(tmp_path / "o.avi")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write video 'o.avi'" in err and ".webp" in err and len(err.splitlines()) == 1
