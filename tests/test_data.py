"""miva.data: few-shot clips from real files (mp4/webm/gif/frame folders) written into tmp_path."""

import numpy as np
import pytest
import torch
from PIL import Image

from miva import data
from miva.data import (CAMERA_MOTIONS, ClipError, ClipSet, camera_clips, camera_clips_from_still, clips_to_tensor,
                       load_clip, load_clips)
from miva.media import save_video
from miva.toy.world import WorldConfig, make_clip, make_still


@pytest.fixture(scope="module")
def toy():
    """20 frames of an object moving right, 32x32."""
    return make_clip("move-right", 0, WorldConfig(size=32, frames=20)).frames


def _frame_folder(folder, levels, size=(8, 8), names=None):
    """One flat grey frame per level, so a decoded frame tells which source frame it was."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, level in enumerate(levels):
        name = names[i] if names else f"frame{i}.png"
        Image.fromarray(np.full(size + (3,), level, np.uint8)).save(folder / name)
    return folder


@pytest.mark.parametrize("suffix, tolerance", [(".mp4", 8), (".webm", 8), (".gif", 0.5)])
def test_video_round_trip(tmp_path, toy, suffix, tolerance):
    path = save_video(toy, tmp_path / f"clip{suffix}")
    clip = load_clip(path, frames=20)
    assert clip.shape == (20, 32, 32, 3) and clip.dtype == np.uint8
    assert np.abs(clip.astype(float) - toy).mean() < tolerance
    # frames come back in order: the object's column of mass moves right
    mass = [np.abs(f.astype(float) - f[0, 0]).sum(-1) for f in clip[::6]]
    xs = [(m * np.arange(32)).sum() / m.sum() for m in mass]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 8


def test_stride_picks_frames_and_natural_sort(tmp_path):
    # names frame0..frame11: a plain string sort would put frame10 before frame2
    folder = _frame_folder(tmp_path / "greys", [10 * i for i in range(12)])
    (folder / "notes.txt").write_text("not a frame")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / ".hidden.png")
    clip = load_clip(folder, frames=4, stride=3, size=(8, 8))
    assert clip.shape == (4, 8, 8, 3)
    assert [int(f.mean()) for f in clip] == [0, 30, 60, 90]
    assert [int(f.mean()) for f in load_clip(folder, frames=12, size=(8, 8))] == [10 * i for i in range(12)]


def test_grayscale_and_rgba_frames_become_rgb(tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(folder / "a1.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent -> white
    Image.fromarray(rgba, mode="RGBA").save(folder / "a2.png")
    clip = load_clip(folder, frames=2, size=(8, 8))
    assert clip.shape == (2, 8, 8, 3) and clip.dtype == np.uint8
    assert np.all(clip[0] == 77)
    assert np.all(clip[1, :3] == (200, 0, 0)) and np.all(clip[1, 5:] == 255)


def test_mixed_sizes_come_out_uniform(tmp_path, toy):
    wide = make_clip("move-right", 1, WorldConfig(size=64, frames=16)).frames[:, 8:56]  # 48 x 64
    save_video(wide, tmp_path / "clips" / "wide.mp4")
    save_video(toy, tmp_path / "clips" / "square.gif")
    clipset = load_clips(tmp_path / "clips", frames=16, size=(24, 40))
    assert isinstance(clipset, ClipSet) and clipset.names == ["square.gif", "wide.mp4"]
    assert [c.shape for c in clipset.clips] == [(16, 24, 40, 3)] * 2 and clipset.warnings == []


def test_too_few_frames_states_needed_count(tmp_path, toy):
    path = save_video(toy[:9], tmp_path / "short.gif")
    with pytest.raises(ClipError, match=r"'short.gif' has 9 frames but 16 frames at stride 2 need 31"):
        load_clip(path, frames=16, stride=2)
    assert load_clip(path, frames=5, stride=2).shape == (5, 32, 32, 3)  # exactly 9 needed


@pytest.fixture
def mixed_folder(tmp_path, toy):
    folder = tmp_path / "uploads"
    save_video(toy, folder / "good.gif")
    (folder / "readme.txt").write_text("hello")
    (folder / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


def test_bad_files_are_skipped_with_warnings(mixed_folder):
    with pytest.warns(UserWarning) as record:
        clipset = load_clips(mixed_folder, frames=8)
    assert clipset.names == ["good.gif"] and clipset.clips[0].shape == (8, 32, 32, 3)
    assert any("broken.mp4" in w and "could not decode" in w for w in clipset.warnings)
    assert any("readme.txt" in w for w in clipset.warnings)
    assert not any(".DS_Store" in w for w in clipset.warnings)
    assert {str(r.message) for r in record if r.category is UserWarning} == set(clipset.warnings)


def test_uploaded_list_skip_and_raise(mixed_folder):
    paths = [mixed_folder / n for n in ("good.gif", "readme.txt", "broken.mp4")]
    with pytest.warns(UserWarning):
        clipset = load_clips(paths, frames=8)
    assert clipset.names == ["good.gif"] and len(clipset.warnings) == 2
    assert "readme.txt" in clipset.warnings[0] and "broken.mp4" in clipset.warnings[1]
    with pytest.raises(ClipError, match=r"could not decode 'readme.txt'.*use mp4, webm, mov, gif"):
        load_clips(paths, frames=8, on_error="raise")
    with pytest.raises(ClipError, match="broken.mp4"):
        load_clips(paths[::2][::-1], frames=8, on_error="raise")


def test_zero_usable_clips_raises(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.mp4").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.warns(UserWarning), pytest.raises(ClipError, match=r"no usable clips in 'bad'; .*broken.mp4"):
        load_clips(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipError, match="no usable clips"):
        load_clips(tmp_path / "empty")


def test_missing_paths_and_bad_arguments(tmp_path, toy):
    with pytest.raises((ClipError, FileNotFoundError), match="nowhere.mp4"):
        load_clip(tmp_path / "nowhere.mp4")
    with pytest.raises((ClipError, FileNotFoundError), match="no_such_folder"):
        load_clips(tmp_path / "no_such_folder")
    with pytest.warns(UserWarning, match="gone.gif"):
        assert load_clips([save_video(toy, tmp_path / "ok.gif"), tmp_path / "gone.gif"]).names == ["ok.gif"]
    (tmp_path / "empty_frames").mkdir()
    with pytest.raises(ClipError, match="'empty_frames' holds no .png"):
        load_clip(tmp_path / "empty_frames")
    for kwargs in (dict(frames=0), dict(stride=0)):
        with pytest.raises(ClipError, match="at least 1"):
            load_clip(tmp_path / "ok.gif", **kwargs)
    with pytest.raises(ClipError, match="on_error"):
        load_clips(tmp_path, on_error="ignore")


def test_caps_on_size_and_count(tmp_path, toy, monkeypatch):
    path = save_video(toy, tmp_path / "big.gif")
    monkeypatch.setattr(data, "MAX_CLIP_BYTES", 100)
    with pytest.raises(ClipError, match="'big.gif' is larger than"):
        load_clip(path)
    monkeypatch.setattr(data, "MAX_CLIPS", 2)
    for i in range(3):
        _frame_folder(tmp_path / "many" / f"c{i}", [0, 1])
    with pytest.raises(ClipError, match="3 clips but at most 2"):
        load_clips(tmp_path / "many", frames=2)


def test_decoding_is_lazy(tmp_path, monkeypatch):
    """A (fake) endless video: load_clip must stop after the frames it needs and close the reader."""
    import imageio.v2

    class Endless:
        closed, served = False, 0

        def __iter__(self):
            while True:
                Endless.served += 1
                yield np.full((4, 4, 3), Endless.served - 1, np.uint8)

        def close(self):
            Endless.closed = True

    monkeypatch.setattr(imageio.v2, "get_reader", lambda *a, **k: Endless())
    (tmp_path / "long.mp4").write_bytes(b"x")
    clip = load_clip(tmp_path / "long.mp4", frames=3, stride=5, size=(4, 4))
    assert [int(f[0, 0, 0]) for f in clip] == [0, 5, 10]
    assert Endless.served == 11 and Endless.closed


def test_a_ten_minute_clip_is_refused_by_its_header(tmp_path, toy, monkeypatch):
    levels = np.arange(1200) * 10 % 250  # frame i is a flat grey of level 10 i (mod 250)
    frames = np.broadcast_to(levels[:, None, None, None].astype(np.uint8), (1200, 16, 16, 3))
    path = save_video(frames, tmp_path / "long.mp4", fps=2)  # 600 s in ~40 KB
    with pytest.raises(ClipError, match=r"^clip 'long.mp4' lasts 10 min 0 s, longer than 60 s; trim it to the few"):
        load_clip(path)
    with pytest.warns(UserWarning, match="long.mp4"):  # among good clips it is skipped, the rest are kept
        clipset = load_clips([save_video(toy, tmp_path / "good.gif"), path], frames=16)
    assert clipset.names == ["good.gif"] and "lasts 10 min" in clipset.warnings[0]
    # under a looser bound the same file gives its first frames, in order (the decoder stops there:
    # test_decoding_is_lazy); GIFs, whose header has no length, are not refused for their frame delay
    monkeypatch.setattr(data, "MAX_CLIP_SECONDS", 3600)
    clip = load_clip(path, frames=16, size=(16, 16))
    assert np.abs(clip.mean(axis=(1, 2, 3)) - levels[:16]).max() < 4
    assert load_clip(save_video(toy, tmp_path / "slow.gif", fps=1 / 90), frames=16).shape == (16, 32, 32, 3)


def test_a_gif_keeps_its_repeated_frames(tmp_path, toy):
    """Pillow writes a run of identical frames as one longer frame; reading it back restores the run."""
    frames = toy.copy()
    frames[5] = frames[4]  # the object pauses for a frame (as a bounce does at its apex)
    frames[9:12] = frames[8]
    clip = load_clip(save_video(frames, tmp_path / "pause.gif"), frames=16, size=(32, 32))
    assert np.array_equal(clip, frames[:16])


def test_camera_clips(tmp_path):
    stills = tmp_path / "stills"
    stills.mkdir()
    rng = np.random.default_rng(0)
    for name in ("s1.png", "s2.jpg"):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(stills / name)
    (stills / "s3.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="s3.png"):
        clipset = camera_clips(stills, "zoom-in", per_still=3, frames=6, size=(24, 40))
    assert len(clipset.clips) == 6 and all(c.shape == (6, 24, 40, 3) and c.dtype == np.uint8 for c in clipset.clips)
    assert clipset.names[:2] == ["s1-crop0", "s1-crop1"] and any("s3.png" in w for w in clipset.warnings)
    square = camera_clips([stills / "s1.png"], "camera-pan-left", per_still=2, frames=4, size=(16, 16))
    assert [c.shape for c in square.clips] == [(4, 16, 16, 3)] * 2
    again = camera_clips([stills / "s1.png"], "pan-left", per_still=2, frames=4, size=(16, 16))
    assert all(np.array_equal(a, b) for a, b in zip(square.clips, again.clips))  # seeded
    with pytest.raises(ClipError, match="camera-pan-left"):
        camera_clips(stills, "move-left")
    with pytest.raises(ClipError, match="no usable clips in the 1 given file; .*s3.png"), pytest.warns(UserWarning):
        camera_clips([stills / "s3.png"], "zoom-out")


def test_clips_to_tensor(toy):
    clips = [toy[:4], np.zeros_like(toy[:4]), np.full_like(toy[:4], 255)]
    x = clips_to_tensor(clips)
    assert x.shape == (3, 3, 4, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x[1].eq(-1).all() and x[2].eq(1).all()
    # channel-first per frame: x[n, c, f, h, w] == pixel [f, h, w, c]
    assert torch.allclose(x[0, :, 2, 5, 7], torch.tensor(toy[2, 5, 7] / 127.5 - 1.0, dtype=torch.float32))
    assert clips_to_tensor(ClipSet(clips=clips[:1], names=["a"])).shape == (1, 3, 4, 32, 32)
    with pytest.raises(ClipError, match="one shape"):
        clips_to_tensor([toy[:4], toy[:5]])


def test_camera_clips_from_still():
    still = make_still(0, WorldConfig(size=96, background="texture", num_objects=3))
    for motion in CAMERA_MOTIONS:
        clips = camera_clips_from_still(still, motion, n=3, seed=1, frames=8, size=32)
        again = camera_clips_from_still(still, motion, n=3, seed=1, frames=8, size=32)
        assert len(clips) == 3 and all(c.frames.shape == (8, 32, 32, 3) for c in clips)
        assert all(np.array_equal(a.frames, b.frames) for a, b in zip(clips, again))
        for c in clips:
            box = c.crop_boxes
            assert (box[:, :2] >= 0).all() and (box[:, 2] <= 96).all() and (box[:, 3] <= 96).all()
            width = box[:, 2] - box[:, 0]
            if "pan" in motion:  # pan-left: window moves left, content slides right
                assert np.allclose(width, width[0])
                assert (np.diff(box[:, 0]) < 0).all() == (motion == "camera-pan-left")
            else:
                assert (np.diff(width) < 0).all() == (motion == "camera-zoom-in")
    assert camera_clips_from_still(still, "camera-zoom-in", 1, 0)[0].frames.shape[1] > 32  # size None
    with pytest.raises(ValueError):
        camera_clips_from_still(still, "move-left", 1, 0)
