"""MIVA Studio: animate a still image with learned motions, mix them, teach new ones.

    python app.py [--backend toy|animatediff-v3|wan2.1-1.3b|tiny|tiny-wan] [--collection OWNER/SLUG] [--port 7860] [--share]

Layout and wiring only; the work happens in `miva.studio.Studio`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr
import numpy as np

from miva.studio import MAX_MIX, USER_ERRORS, Studio

GPU_JOB = "model"  # one concurrency group: one model job at a time, the rest queue
EXAMPLES = Path(__file__).resolve().parent / "assets"
TABS = ("animate", "mix", "train")
ON_ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
TRAIN_CHUNK = int(os.environ.get("MIVA_TRAIN_CHUNK", 150 if ON_ZERO_GPU else 0)) or None  # steps per GPU call
# Per uploaded file (clip, first frame, brush layer). The server refuses a larger one while it streams
# in (HTTP 413; gradio_client refuses before sending) and deletes what had arrived. 200 MB is minutes of
# phone video, while a clip of one motion lasts seconds (miva.data.MAX_CLIP_SECONDS) and gives 16 frames.
MAX_UPLOAD_MB = 200


def on_gpu(duration):
    """`spaces.GPU` with a duration computed from the call's arguments on a ZeroGPU Space; elsewhere a no-op."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def drawn_region(editor) -> np.ndarray | None:
    """The brush strokes of an image editor as one (H, W) mask (any painted pixel of any layer), or None."""
    if not isinstance(editor, dict):
        return None
    layers = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
    alpha = [layer[..., 3] for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not alpha or max(int(a.max()) for a in alpha) == 0:
        return None
    if editor.get("background") is None:
        raise gr.Error("upload the first frame before drawing a region on it.")
    return np.maximum.reduce(alpha)


def frames_slider(base) -> gr.Slider:
    """Frame counts the base takes (Wan: 4k + 1)."""
    low, high = base.frame_limits()
    return gr.Slider(low, high, value=base.frames, step=base.frame_step, label="Frames")


def mix_from_rows(rows) -> tuple[list[dict], list[np.ndarray]]:
    """The Mix tab's rows, (motion, weight, painted region, phrase) x MAX_MIX -> the `/mix` endpoint's
    (mix, masks): one {"adapter", "weight", "mask" or "phrase"} per chosen motion, painted regions as masks."""
    mix, masks = [], []
    for i in range(0, len(rows), 4):
        name, weight, editor, phrase = rows[i : i + 4]
        if not name:
            continue
        entry, drawn = {"adapter": name, "weight": float(weight)}, drawn_region(editor)
        if drawn is not None:
            entry["mask"] = len(masks)
            masks.append(drawn)
        if (phrase or "").strip():
            entry["phrase"] = phrase
        mix.append(entry)
    return mix, masks


def serve(demo: gr.Blocks, **launch_kwargs):
    """Queue and launch the app with its bounds; `main()` and the tests both start it here."""
    return demo.queue(default_concurrency_limit=1).launch(max_file_size=f"{MAX_UPLOAD_MB}mb", **launch_kwargs)


def build_app(studio: Studio) -> gr.Blocks:
    def choices():
        return [(a.label + (" (yours)" if a.trained else ""), a.name) for a in studio.catalogue()]

    def animate_choices():
        return choices() + [("none: the base alone", "")]

    def gallery():
        return [(str(a.preview), a.label) for a in studio.catalogue() if a.preview]

    def run(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(str(err.args[0] if isinstance(err, KeyError) else err)) from None

    def animate_seconds(image, adapter, frames, steps, seed, shared_noise, dct_init, adain, guidance, *_, **__):
        return studio.gpu_seconds(frames, steps, 1 if adapter else 0, guidance)

    @on_gpu(animate_seconds)
    def animate(image, adapter, frames, steps, seed, shared_noise, dct_init, adain, guidance,
                progress=gr.Progress()):
        return str(run(studio.animate, image, {adapter: 1.0} if adapter else {}, frames, steps, seed, shared_noise,
                       dct_init, adain, guidance, lambda f, m: progress(f, desc=m)))

    def mix_seconds(image, mix, masks=None, frames=16, steps=25, seed=0, *_, **__):
        return studio.gpu_seconds(frames, steps, MAX_MIX, masked=MAX_MIX) + 30  # + masks from text

    @on_gpu(mix_seconds)
    def mix(image, mix, masks=None, frames=16, steps=25, seed=0, progress=gr.Progress()):
        """Animate a first frame with up to 4 motions mixed. `mix`: a JSON list of {"adapter": name,
        "weight": 0-2, "phrase": text naming its region, or "mask": index into `masks`}; `masks`: mask
        images at the first frame's size (white = region)."""
        return str(run(studio.mix, image, mix, masks, frames, steps, seed, lambda f, m: progress(f, desc=m)))

    def preview_regions(image, mix, masks=None):
        """The first frame with the regions of a mix (as `/mix` takes it) laid over it."""
        return run(studio.preview_mix, image, mix, masks)

    def mix_rows(image, frames, steps, seed, *rows, progress=gr.Progress()):
        return mix(image, *mix_from_rows(rows), frames, steps, seed, progress=progress)

    def preview_rows(image, *rows):
        return preview_regions(image, *mix_from_rows(rows))

    def segment(image, text):
        return str(run(studio.segment_file, image, text))

    def train_seconds(files, motion, steps, *_, **__):
        return studio.train_seconds(min(int(steps), TRAIN_CHUNK or int(steps))) + 60

    def train(files, motion, steps, resume, progress, request):
        paths = [getattr(f, "name", f) for f in files or []]

        def report(step, total, loss, eta):
            progress(step / total, desc=f"step {step}/{total}, loss {loss:.4f}")

        # the run belongs to the page (or gradio_client) that started it: only its own Stop stops it
        folder, status = run(studio.train, paths, motion, steps, resume, TRAIN_CHUNK, report,
                             owner=getattr(request, "session_hash", None))
        plot = {"step": list(range(1, len(status["losses"]) + 1)), "loss": status["losses"]}
        note = " ".join(status["warnings"])
        message = (f"Trained '{status['name']}': it is in the catalogue now. {note}" if folder
                   else f"Stopped at step {status['step']} of {status['steps']}; press Resume to continue. {note}")
        mix_choices = [gr.update(choices=choices()) for _ in range(MAX_MIX)]
        return (message.strip(), _loss_frame(plot), gr.update(choices=animate_choices()), *mix_choices, gallery(),
                gr.update(choices=[a.name for a in studio.catalogue() if a.trained]))

    def push(name, repo_id, token):
        url = run(studio.push, name, repo_id, token)
        return f"Pushed '{name}' to {url}"

    with gr.Blocks(title="MIVA Studio") as demo:
        gr.Markdown("# MIVA Studio\nAnimate a still image with a learned motion, mix motions, or teach a new one "
                    f"from a few clips. Base: `{studio.pipe.base.id}` ({studio.pipe.base.description}). "
                    f"Catalogue: {studio.hub_status}")
        with gr.Tabs() as tabs:
            with gr.Tab("Animate", id="animate"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(label="First frame", type="pil", image_mode="RGB")
                        adapter = gr.Dropdown(animate_choices(), label="Motion", value=animate_choices()[0][1],
                                              allow_custom_value=True)  # names are checked by the Studio
                        with gr.Row():
                            frames = frames_slider(studio.pipe.base)
                            steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                            seed = gr.Number(0, precision=0, label="Seed")
                        with gr.Accordion("Advanced", open=False):
                            shared_noise = gr.Slider(0, 1, value=0.05, step=0.01, label="Shared-noise ratio")
                            dct_init = gr.Checkbox(studio.pipe.base.dct_init,  # the base's default: off for the toy base
                                                   label="DCTInit (start from the first frame's low frequencies)")
                            adain = gr.Checkbox(True, label="AdaIN to the first frame")
                            guidance = gr.Slider(0, 5, value=1.0, step=0.1, label="Motion guidance (1 = off)")
                        go = gr.Button("Animate", variant="primary")
                        gr.Examples([[str(EXAMPLES / "example.png")], [str(EXAMPLES / "example-two-objects.png")]],
                                    inputs=[image], label="Example first frames")
                    with gr.Column():
                        video = gr.Video(label="Video")
                        previews = gr.Gallery(gallery(), label="Motions", columns=4, height=220)
                go.click(animate, [image, adapter, frames, steps, seed, shared_noise, dct_init, adain, guidance],
                         video, api_name="animate", concurrency_id=GPU_JOB, concurrency_limit=1)
            with gr.Tab("Mix", id="mix"):
                with gr.Row():
                    with gr.Column():
                        mix_image = gr.Image(label="First frame", type="pil", image_mode="RGB")
                        rows, editors = [], []
                        for i in range(MAX_MIX):
                            with gr.Group():
                                with gr.Row():
                                    name = gr.Dropdown(choices(), label=f"Motion {i + 1}", value=None,
                                                       allow_custom_value=True)
                                    weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight")
                                with gr.Accordion(f"Region of motion {i + 1} (optional: everywhere)", open=False):
                                    editor = gr.ImageEditor(label="Paint the region on the first frame", type="numpy",
                                                            sources=(), transforms=(), format="png", height=280,
                                                            brush=gr.Brush(colors=["#e63c3c"], color_mode="fixed"))
                                    phrase = gr.Textbox(label="…or describe it", max_length=200,
                                                        placeholder="e.g. the red square")
                            rows += [name, weight, editor, phrase]
                            editors.append(editor)
                        with gr.Row():
                            mix_frames = frames_slider(studio.pipe.base)
                            mix_steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                            mix_seed = gr.Number(0, precision=0, label="Seed")
                        with gr.Row():
                            preview_go = gr.Button("Preview regions")
                            mix_go = gr.Button("Mix", variant="primary")
                    with gr.Column():
                        regions_view = gr.Image(label="Regions: colour j = motion j's region, plain = background",
                                                interactive=False)
                        mix_video = gr.Video(label="Video")
                # the painted regions sit on the first frame: a new first frame clears them
                mix_image.change(lambda im: [{"background": im, "layers": [], "composite": im}] * MAX_MIX,
                                 mix_image, editors, queue=False, api_name=False)
                # the rows are the page's; clients call /mix and /preview_regions with named values
                preview_go.click(preview_rows, [mix_image, *rows], regions_view, api_name=False)
                mix_go.click(mix_rows, [mix_image, mix_frames, mix_steps, mix_seed, *rows], mix_video, api_name=False,
                             concurrency_id=GPU_JOB, concurrency_limit=1)
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column():
                        files = gr.File(file_count="multiple", file_types=[".mp4", ".webm", ".mov", ".gif"],
                                        label=f"Clips of one motion (mp4, webm, mov, gif; up to {MAX_UPLOAD_MB} MB each)")
                        motion = gr.Textbox(label="Motion name", placeholder="e.g. move-left", max_length=64)
                        train_steps = gr.Slider(10, 2000, value=300, step=10, label="Steps")
                        with gr.Row():
                            start = gr.Button("Start", variant="primary")
                            resume = gr.Button("Resume")
                            stop = gr.Button("Stop")
                    with gr.Column():
                        status = gr.Textbox(label="Status", interactive=False)
                        plot = gr.LinePlot(x="step", y="loss", label="Loss")
                        with gr.Accordion("Share on the Hugging Face Hub", open=False):
                            pushable = gr.Dropdown([a.name for a in studio.catalogue() if a.trained],
                                                   label="Adapter trained here", allow_custom_value=True)
                            repo = gr.Textbox(label="Model repo", placeholder="your-name/miva-move-left")
                            token = gr.Textbox(label="Write token", type="password")
                            push_go = gr.Button("Push to Hub")
                            pushed = gr.Textbox(label="Result", interactive=False)
                outputs = [status, plot, adapter, *rows[0::4], previews, pushable]

                @on_gpu(train_seconds)
                def train_start(files, motion, steps, request: gr.Request, progress=gr.Progress()):
                    return train(files, motion, steps, False, progress, request)

                @on_gpu(train_seconds)
                def train_resume(files, motion, steps, request: gr.Request, progress=gr.Progress()):
                    return train(files, motion, steps, True, progress, request)

                def stop_training(request: gr.Request):
                    if studio.request_stop(owner=getattr(request, "session_hash", None)):
                        return "Stopping after the current step; press Resume to continue later."
                    return "No training run of yours is under way; press Start to begin one."

                start.click(train_start, [files, motion, train_steps], outputs, api_name="train",
                            concurrency_id=GPU_JOB, concurrency_limit=1)
                resume.click(train_resume, [files, motion, train_steps], outputs, api_name="resume_training",
                             concurrency_id=GPU_JOB, concurrency_limit=1)
                # outside the queue: a Stop must not wait behind the run it stops
                stop.click(stop_training, None, status, api_name="stop_training", queue=False)
                push_go.click(push, [pushable, repo, token], pushed, api_name="push")
        with gr.Row(visible=False):  # API-only endpoints
            list_button, catalogue = gr.Button(), gr.JSON()
            segment_image, segment_text, segment_mask = gr.Image(type="pil"), gr.Textbox(), gr.Image(type="filepath")
            segment_button = gr.Button()
            api_image = gr.File(type="filepath", label="First frame (an image file)")  # read by the Studio: a corrupt file gets its sentence
            api_mix = gr.JSON(label="Mix: [{adapter, weight, phrase or mask}]")
            api_masks = gr.File(file_count="multiple", type="filepath", label="Mask images (white = region)")
            api_frames = gr.Number(studio.pipe.base.frames, precision=0, label="Frames")
            api_steps, api_seed = gr.Number(25, precision=0, label="Steps"), gr.Number(0, precision=0, label="Seed")
            mix_button, preview_button = gr.Button(), gr.Button()
        mix_button.click(mix, [api_image, api_mix, api_masks, api_frames, api_steps, api_seed], mix_video,
                         api_name="mix", concurrency_id=GPU_JOB, concurrency_limit=1)
        preview_button.click(preview_regions, [api_image, api_mix, api_masks], regions_view, api_name="preview_regions")
        list_button.click(lambda: studio.describe(), None, catalogue, api_name="list_adapters")
        segment_button.click(segment, [segment_image, segment_text], segment_mask, api_name="segment",
                             concurrency_id=GPU_JOB, concurrency_limit=1)

        def open_tab(request: gr.Request):
            """`?tab=mix` opens that tab: links and screenshots can point at one."""
            tab = (request.query_params.get("tab") or "animate") if request else "animate"
            return gr.Tabs(selected=tab if tab in TABS else "animate")

        demo.load(open_tab, None, tabs, api_name=False, queue=False)
    return demo


def _loss_frame(plot: dict):
    import pandas as pd

    return pd.DataFrame(plot)


def main() -> None:
    parser = argparse.ArgumentParser(description="MIVA Studio")
    parser.add_argument("--backend", default=os.environ.get("MIVA_BACKEND", "toy"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("MIVA_HOST", "127.0.0.1"))
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--collection", default=None,
                        help="Hub collection of adapters (owner/slug; default: $MIVA_COLLECTION)")
    args = parser.parse_args()
    demo = build_app(Studio.from_base(args.backend, args.collection))
    serve(demo, server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
