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
from miva.adapter import attach, detach  # noqa: E402
from miva.adapter_files import save_adapter  # noqa: E402
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


def mask_file(root, box=(4, 4, 20, 20), size=(48, 40), name=None):
    """A mask image (white = region over `box`, x0, y0, x1, y1) as gradio_client uploads it."""
    mask = np.zeros(size[::-1], np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path = root / (name or f"mask-{x0}-{y0}-{size[0]}x{size[1]}.png")
    Image.fromarray(mask).save(path)
    return handle_file(str(path))


def mix(client, image, mix, masks=None, api_name="/mix", **settings):
    """/mix (or /preview_regions) with named values, as a script calls it."""
    if api_name == "/mix":
        settings = {"frames": 4, "steps": 2, "seed": 1, **settings}
    return client.predict(image=handle_file(str(image)), mix=mix, masks=masks, api_name=api_name, **settings)


def test_every_endpoint_has_named_parameters(served):
    client, *_ = served
    api = client.view_api(return_format="dict", print_info=False)
    assert api["unnamed_endpoints"] == {}
    endpoints = api["named_endpoints"]
    assert {"/animate", "/mix", "/preview_regions", "/segment", "/train", "/list_adapters"} <= set(endpoints)
    for name, endpoint in endpoints.items():
        for parameter in endpoint["parameters"]:
            assert not re.fullmatch(r"param_?\d+|parameter_\d+|args?|rows?", parameter["parameter_name"]), (name, parameter)
    assert [p["parameter_name"] for p in endpoints["/mix"]["parameters"]] == ["image", "mix", "masks", "frames", "steps", "seed"]
    assert [p["parameter_name"] for p in endpoints["/preview_regions"]["parameters"]] == ["image", "mix", "masks"]


def test_mix(served):
    client, _, image, _ = served
    assert video_frames(mix(client, image, [{"adapter": "move-left", "weight": 0.5}, {"adapter": "zoom-in"}])) == 4


def test_mix_as_json_text_with_a_mask_and_its_preview(served):
    client, root, image, _ = served
    spec = '[{"adapter": "move-left", "weight": 1.0, "mask": 0}, {"adapter": "zoom-in", "weight": 1.0}]'
    preview = mix(client, image, spec, [mask_file(root)], api_name="/preview_regions")
    pixels = np.asarray(Image.open(preview).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (32, 32)
    tinted = np.abs(pixels - 90).sum(axis=-1) > 30  # the grey first frame, coloured where the region is
    assert 0.05 < tinted.mean() < 0.6
    assert video_frames(mix(client, image, spec, [mask_file(root)])) == 4


@pytest.mark.parametrize("spec, masks, message", [
    ({"adapter": "move-left"}, None, "the mix is a dict; give a list of motions"),
    ("[{adapter: move-left}]", None, "the mix is not valid JSON"),
    ([], None, "choose at least one motion to mix"),
    ([{"adapter": "no-such-motion"}], None, "known adapters: move-left, zoom-in"),
    ([{"weight": 1.0}], None, "motion 1 names no adapter"),
    ([{"adapter": "move-left", "region": 0}], None, "unknown field"),
    ([{"adapter": "move-left"}, {"adapter": "move-left"}], None, "chosen twice"),
    ([{"adapter": "move-left", "weight": -0.5}], None, "the weight of 'move-left' is -0.5; use a number from 0 to 2"),
    ([{"adapter": "move-left", "weight": 3.0}], None, "use a number from 0 to 2"),
    ([{"adapter": "move-left", "mask": 0, "phrase": "the square"}], "MASK", "both a mask .a drawn region. and a phrase"),
    ([{"adapter": "move-left", "mask": 1}], "MASK", "asks for mask 1 but 1 mask was given; use an index from 0 to 0"),
    ([{"adapter": "move-left", "mask": 0}], None, "upload the mask image in masks"),
    ([{"adapter": "move-left", "mask": 0}], "SMALL", "mask 0 is 10x10 pixels but the first frame is 48x40"),
    ([{"adapter": "move-left", "mask": 0}], "CORRUPT", "could not read 'corrupt.png' as a mask image"),
])
def test_mix_mistakes_are_one_readable_sentence(served, spec, masks, message):
    client, root, image, _ = served
    (root / "corrupt.png").write_bytes(b"not a png" * 50)
    masks = {None: None, "MASK": [mask_file(root)], "SMALL": [mask_file(root, (0, 0, 5, 5), (10, 10))],
             "CORRUPT": [handle_file(str(root / "corrupt.png"))]}[masks]
    for api_name in ("/mix", "/preview_regions"):
        with pytest.raises(Exception, match=message):
            mix(client, image, spec, masks, api_name=api_name)


def test_mix_with_a_corrupt_first_frame_or_no_region(served):
    client, root, image, _ = served
    broken = root / "broken.png"
    broken.write_bytes(b"not a png" * 50)
    with pytest.raises(Exception, match="could not read 'broken.png' as an image"):
        mix(client, broken, [{"adapter": "move-left"}])
    with pytest.raises(Exception, match="no region was drawn or described"):
        mix(client, image, [{"adapter": "move-left"}], api_name="/preview_regions")


def test_the_mix_tab_rows_become_the_api_form():
    from app import mix_from_rows

    frame = np.full((40, 48, 3), 90, np.uint8)
    layer = np.zeros((40, 48, 4), np.uint8)
    layer[4:20, 4:20] = (230, 60, 60, 255)
    painted = {"background": frame, "layers": [layer], "composite": None}
    unpainted = {"background": frame, "layers": [np.zeros_like(layer)], "composite": None}
    rows = ["move-left", 0.5, painted, "", None, 1.0, None, "", "zoom-in", 1.0, unpainted, " the square ",
            "", 1.0, None, ""]
    spec, masks = mix_from_rows(rows)
    assert spec == [{"adapter": "move-left", "weight": 0.5, "mask": 0},
                    {"adapter": "zoom-in", "weight": 1.0, "phrase": " the square "}]
    assert len(masks) == 1 and masks[0].shape == (40, 48) and masks[0][10, 10] == 255 and masks[0][30, 30] == 0


def test_the_mix_tab_buttons_still_work(served):
    """The page's Mix and Preview buttons call hidden events with the rows; call them as the page does
    (by fn_index over the queue: gradio_client refuses private events)."""
    import json

    import httpx

    client, root, image, _ = served
    api, deps = client.src.rstrip("/") + "/gradio_api", client.config["dependencies"]

    def upload(path):
        stored = httpx.post(api + "/upload", files=[("files", (path.name, path.read_bytes()))]).json()[0]
        return {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def press(inputs, data):
        index = next(i for i, d in enumerate(deps) if len(d["inputs"]) == inputs and d["api_visibility"] == "private")
        trigger = deps[index]["targets"][0][0]
        httpx.post(api + "/queue/join", json={"data": data, "fn_index": index, "session_hash": "page",
                                              "trigger_id": trigger, "event_data": None}).raise_for_status()
        with httpx.stream("GET", api + "/queue/data", params={"session_hash": "page"}, timeout=120) as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed":
                    return message["success"], message["output"]

    layer = np.zeros((40, 48, 4), np.uint8)
    layer[4:20, 4:20] = (230, 60, 60, 255)
    Image.fromarray(layer, "RGBA").save(root / "brush.png")
    first = upload(image)
    editor = {"background": first, "layers": [upload(root / "brush.png")], "composite": None}
    rows = ["move-left", 1.0, editor, "", "zoom-in", 1.0, None, "", None, 1.0, None, "", None, 1.0, None, ""]
    assert press(17, [first, *rows])[0]  # Preview regions
    done, output = press(20, [first, 4, 2, 1, *rows])  # Mix
    assert done and output["data"][0]["path"].endswith(".mp4")
    done, output = press(20, [first, 4, 2, 1, "move-left", 1.0, editor, "the square", *rows[4:]])
    assert not done and "both a mask (a drawn region) and a phrase" in output["error"]


def test_text_regions_without_the_models_say_so(served, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    client, _, image, _ = served
    with pytest.raises(Exception, match="not available offline"):
        client.predict(handle_file(str(image)), "the square", api_name="/segment")
    with pytest.raises(Exception, match="not available offline"):
        mix(client, image, [{"adapter": "move-left", "weight": 1.0, "phrase": "the square"}])


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
