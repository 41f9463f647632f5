"""The Space as a person (or a script) uses it: a launched app on loopback, driven by gradio_client."""

import concurrent.futures
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from app import MAX_UPLOAD_MB, build_app, serve  # noqa: E402
from miva.adapter import attach, detach, save_adapter  # noqa: E402
from miva.config import MivaConfig  # noqa: E402
from miva.media import save_video  # noqa: E402
from miva.studio import Studio  # noqa: E402
from miva.toy.world import WorldConfig, make_clip  # noqa: E402

from conftest import randomize  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on the tiny base with two shipped adapters, launched on 127.0.0.1."""
    from miva.backends import load_base
    from miva.pipeline import MivaPipeline

    root = tmp_path_factory.mktemp("app")
    pipe = MivaPipeline(load_base("tiny"))
    for seed, motion in enumerate(["move-left", "zoom-in"], start=1):
        manager = attach(pipe.base.unet, MivaConfig(base="tiny", motion=motion), motion)
        randomize(manager.parameters(motion), seed=seed, scale=0.1)
        save_adapter(pipe.base.unet, motion, root / "shipped" / motion)
        detach(pipe.base.unet)
    studio = Studio(pipe, shipped=root / "shipped", workdir=root / "work")
    demo = build_app(studio)
    serve(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)  # main()'s bounds
    image = root / "first.png"
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(image)
    clips = []
    for seed in range(2):
        clips.append(save_video(make_clip("move-left", seed, WorldConfig(size=32, frames=16)).frames,
                                root / f"clip{seed}.mp4"))
    yield Client(demo.local_url, verbose=False), root, image, clips
    demo.close()


def video_frames(result) -> int:
    import imageio.v2 as imageio

    path = result["video"] if isinstance(result, dict) else result
    return len(imageio.mimread(path))


def test_list_adapters(served):
    client, *_ = served
    names = {a["name"] for a in client.predict(api_name="/list_adapters")}
    assert names == {"move-left", "zoom-in"}


def test_animate(served):
    client, _, image, _ = served
    out = client.predict(handle_file(str(image)), "move-left", 4, 2, 7, 0.05, True, True, 1.0, api_name="/animate")
    assert video_frames(out) == 4


def test_animate_with_the_base_alone(served):
    client, _, image, _ = served
    assert video_frames(client.predict(handle_file(str(image)), "", 3, 1, 0, 0.05, True, True, 1.0,
                                       api_name="/animate")) == 3


def row(name=None, weight=1.0, region=None, phrase=""):
    """One Mix row as the API takes it: motion, weight, painted region (image editor value), phrase."""
    return [name, weight, region, phrase]


def EMPTY():
    return row() * 3


def painted(root, image, box=(4, 4, 20, 20)):
    """An image-editor value: the first frame with one brush layer painted over `box` (x0, y0, x1, y1)."""
    layer = np.zeros((40, 48, 4), np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (230, 60, 60, 255)
    path = root / f"layer-{x0}-{y0}.png"
    Image.fromarray(layer, "RGBA").save(path)
    return {"background": handle_file(str(image)), "layers": [handle_file(str(path))], "composite": None}


def test_mix(served):
    client, _, image, _ = served
    rows = row("move-left", 0.5) + row("zoom-in") + row() + row()
    assert video_frames(client.predict(handle_file(str(image)), 4, 2, 1, *rows, api_name="/mix")) == 4


def test_mix_with_a_painted_region_and_its_preview(served):
    client, root, image, _ = served
    rows = row("move-left", 1.0, painted(root, image)) + row("zoom-in") + row() + row()
    preview = client.predict(handle_file(str(image)), *rows, api_name="/preview_regions")
    pixels = np.asarray(Image.open(preview).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (32, 32)
    tinted = np.abs(pixels - 90).sum(axis=-1) > 30  # the grey first frame, coloured where the region is
    assert 0.05 < tinted.mean() < 0.6
    assert video_frames(client.predict(handle_file(str(image)), 4, 2, 1, *rows, api_name="/mix")) == 4


def test_mix_region_mistakes_are_readable(served):
    client, root, image, _ = served
    both = row("move-left", 1.0, painted(root, image), "the square") + EMPTY()
    with pytest.raises(Exception, match="both a drawn region and a phrase"):
        client.predict(handle_file(str(image)), 4, 2, 1, *both, api_name="/mix")
    twice = row("move-left") + row("move-left") + row() + row()
    with pytest.raises(Exception, match="chosen twice"):
        client.predict(handle_file(str(image)), 4, 2, 1, *twice, api_name="/mix")
    with pytest.raises(Exception, match="no region was drawn or described"):
        client.predict(handle_file(str(image)), *row("move-left"), *EMPTY(), api_name="/preview_regions")


def test_text_regions_without_the_models_say_so(served, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    client, _, image, _ = served
    with pytest.raises(Exception, match="not available offline"):
        client.predict(handle_file(str(image)), "the square", api_name="/segment")
    with pytest.raises(Exception, match="not available offline"):
        client.predict(handle_file(str(image)), 4, 2, 1, *row("move-left", 1.0, None, "the square"), *EMPTY(),
                       api_name="/mix")


def test_push_needs_an_adapter_trained_here_and_a_token(served):
    client, *_ = served
    with pytest.raises(Exception, match="not trained here|was not found"):
        client.predict("move-left", "someone/miva-move-left", "", api_name="/push")


@pytest.mark.parametrize("args, message", [
    ((None, "move-left"), "upload a first frame"),
    (("IMAGE", "../../etc"), "was not found"),
    (("IMAGE", "no-such-motion"), "known adapters: move-left, zoom-in"),
])
def test_animate_bad_input_is_a_readable_error(served, args, message):
    client, _, image, _ = served
    first = handle_file(str(image)) if args[0] == "IMAGE" else None
    with pytest.raises(Exception, match=message):
        client.predict(first, args[1], 4, 2, 0, 0.05, True, True, 1.0, api_name="/animate")


def test_mix_needs_a_motion(served):
    client, _, image, _ = served
    with pytest.raises(Exception, match="choose at least one motion"):
        client.predict(handle_file(str(image)), 4, 2, 1, *row(), *EMPTY(), api_name="/mix")


def test_mix_weight_out_of_range(served):
    client, _, image, _ = served
    rows = row("move-left", 3.0) + EMPTY()
    with pytest.raises(Exception, match="greater than maximum value 2"):  # the slider refuses it
        client.predict(handle_file(str(image)), 4, 2, 1, *rows, api_name="/mix")


def test_train_then_animate_with_the_new_adapter(served):
    client, _, image, clips = served
    status, plot, *_ = client.predict([handle_file(str(c)) for c in clips], "wiggle", 10, api_name="/train")
    assert "Trained 'wiggle'" in status
    names = {a["name"] for a in client.predict(api_name="/list_adapters")}
    assert "wiggle" in names
    out = client.predict(handle_file(str(image)), "wiggle", 4, 2, 0, 0.05, True, True, 1.0, api_name="/animate")
    assert video_frames(out) == 4


def test_train_rejects_non_video_uploads(served):
    client, root, *_ = served
    text = root / "notes.txt"
    text.write_text("hello")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict([handle_file(str(text))], "nothing", 10, api_name="/train")
    corrupt = root / "broken.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(Exception, match="no usable clips"):
        client.predict([handle_file(str(corrupt))], "nothing", 10, api_name="/train")


def wait_for_step(job, step: int, timeout: float = 30) -> int:
    """Poll a submitted /train job until its progress reports `step` or more; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not job.done(), f"the run ended before step {step}: {job.result()}"
        for unit in job.status().progress_data or []:
            seen = re.match(r"step (\d+)/", unit.desc or "")
            if seen and int(seen[1]) >= step:
                return int(seen[1])
        time.sleep(0.05)
    raise AssertionError(f"no progress to step {step} in {timeout} s")


def test_stop_a_training_run_then_resume_it(served):
    client, root, _, clips = served
    uploads = [handle_file(str(c)) for c in clips]
    job = client.submit(uploads, "sway", 10, api_name="/train")  # ~0.4 s a step on the tiny base
    wait_for_step(job, 1)
    other = Client(client.src, verbose=False).predict(api_name="/stop_training")  # another page's Stop: not this run
    assert other.startswith("No training run of yours is under way")
    reached = wait_for_step(job, 3)
    assert client.predict(api_name="/stop_training").startswith("Stopping")  # at once: not queued behind the run
    status, *_ = job.result(timeout=30)
    stopped = re.fullmatch(r"Stopped at step (\d+) of 10; press Resume to continue\.", status)
    assert stopped and reached <= int(stopped[1]) < 10, status
    checkpoint = root / "work" / "adapters" / "sway" / "checkpoint"
    assert (checkpoint / "state.json").is_file()
    assert "sway" not in {a["name"] for a in client.predict(api_name="/list_adapters")}

    status, plot, *_ = client.predict(uploads, "sway", 10, api_name="/resume_training")
    assert status.startswith("Trained 'sway'"), status
    # one loss a step: the checkpoint's, then only the steps after it (a fresh run would add 10 more)
    assert [step for step, _ in plot["data"]] == list(range(1, 11))
    assert not checkpoint.exists() and "sway" in {a["name"] for a in client.predict(api_name="/list_adapters")}


def test_uploads_past_the_bound_are_refused(served, tmp_path):
    import httpx
    from gradio.utils import get_upload_folder

    client, *_ = served
    limit = MAX_UPLOAD_MB * 2**20
    huge, over = tmp_path / "huge.mp4", tmp_path / "over.mp4"
    for path, size in ((huge, 2 * 2**30), (over, limit + 1)):
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: no disk is written
    # gradio_client checks the app's bound before sending anything
    with pytest.raises(ValueError, match=f"huge.mp4 exceeds the maximum file size of {limit} bytes"):
        client.predict([handle_file(str(huge))], "huge", 10, api_name="/train")
    # a browser or any other client meets the server's bound, and nothing of the upload is kept
    with open(over, "rb") as f:
        answer = httpx.post(client.upload_url, files=[("files", ("over.mp4", f))], timeout=60)
    assert answer.status_code == 413 and f"maximum allowed size of {limit} bytes" in answer.text
    kept = [p for p in Path(get_upload_folder()).rglob("*") if p.is_file() and p.stat().st_size > limit // 2]
    assert kept == []
    assert {a["name"] for a in client.predict(api_name="/list_adapters")} >= {"move-left", "zoom-in"}


def test_a_ten_minute_clip_is_refused(served, tmp_path):
    client, *_ = served
    long = save_video(np.zeros((1200, 16, 16, 3), np.uint8), tmp_path / "long.mp4", fps=2)  # 600 s
    with pytest.raises(Exception, match=r"'long.mp4' lasts 10 min 0 s, longer than 60 s; trim it"):
        client.predict([handle_file(str(long))], "long", 10, api_name="/train")


def test_concurrent_requests_do_not_cross_talk(served):
    client, _, image, _ = served

    def call(seed):
        return client.predict(handle_file(str(image)), "move-left", 4, 2, seed, 0.05, True, True, 1.0,
                              api_name="/animate")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(call, [1, 2, 1]))
    paths = [o["video"] if isinstance(o, dict) else o for o in outs]
    import imageio.v2 as imageio

    a, b, c = (np.stack(imageio.mimread(p)) for p in paths)
    assert np.array_equal(a, c) and not np.array_equal(a, b)  # same seed, same video; no shared state


@pytest.mark.skipif(__import__("miva.browser", fromlist=["x"]).chromium() is None, reason="chromium not installed")
def test_page_renders_in_a_browser(served, tmp_path):
    from miva import browser

    client, *_ = served
    url = client.src if isinstance(client.src, str) else str(client.src)
    dom = browser.dump_dom(url)
    assert "MIVA Studio" in dom and "Animate" in dom and "Train" in dom
    assert "Traceback" not in dom and 'class="toast-body error' not in dom
    shot = browser.screenshot(url, tmp_path / "page.png")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank page
