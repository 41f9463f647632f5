"""MIVA Studio: animate a still image with learned motions, mix them, teach new ones.

    python app.py [--backend toy|animatediff-v3|tiny] [--port 7860] [--share]

Layout and wiring only; the work happens in `miva.studio.Studio`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr

from miva.studio import MAX_MIX, Studio

GPU_JOB = "model"
EXAMPLES = Path(__file__).resolve().parent / "assets"  # one concurrency group: one model job at a time, the rest queue


def build_studio(backend: str) -> Studio:
    import torch

    from miva.pipeline import MivaPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" and backend == "animatediff-v3" else torch.float32
    return Studio(MivaPipeline.from_base(backend, device=device, dtype=dtype))


def build_app(studio: Studio) -> gr.Blocks:
    def choices():
        return [(f"{a.motion}" + (" (yours)" if a.trained else ""), a.name) for a in studio.catalogue()]

    def animate_choices():
        return choices() + [("none: the base alone", "")]

    def gallery():
        return [(str(a.preview), a.motion) for a in studio.catalogue() if a.preview]

    def run(fn, *args):
        try:
            return fn(*args)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise gr.Error(str(err.args[0] if isinstance(err, KeyError) else err)) from None

    def animate(image, adapter, frames, steps, seed, shared_noise, dct_init, adain, guidance,
                progress=gr.Progress()):
        return str(run(studio.animate, image, {adapter: 1.0} if adapter else {}, frames, steps, seed, shared_noise,
                       dct_init, adain, guidance, lambda f, m: progress(f, desc=m)))

    def mix(image, frames, steps, seed, *rows, progress=gr.Progress()):
        weights = {}
        for name, weight in zip(rows[0::2], rows[1::2]):
            if name:
                weights[name] = weights.get(name, 0.0) + float(weight)
        if not weights:
            raise gr.Error("choose at least one motion to mix.")
        return str(run(studio.animate, image, weights, frames, steps, seed, 0.05, True, True, 1.0,
                       lambda f, m: progress(f, desc=m)))

    def train(files, motion, steps, resume, progress=gr.Progress()):
        paths = [getattr(f, "name", f) for f in files or []]

        def report(step, total, loss, eta):
            progress(step / total, desc=f"step {step}/{total}, loss {loss:.4f}")

        folder, status = run(studio.train, paths, motion, steps, resume, None, report)
        plot = {"step": list(range(1, len(status["losses"]) + 1)), "loss": status["losses"]}
        note = " ".join(status["warnings"])
        message = (f"Trained '{status['name']}': it is in the catalogue now. {note}" if folder
                   else f"Stopped at step {status['step']} of {status['steps']}; press Resume to continue. {note}")
        mix_rows = [gr.update(choices=choices()) for _ in range(MAX_MIX)]
        return (message.strip(), _loss_frame(plot), gr.update(choices=animate_choices()), *mix_rows, gallery())

    with gr.Blocks(title="MIVA Studio") as demo:
        gr.Markdown("# MIVA Studio\nAnimate a still image with a learned motion, mix motions, or teach a new one "
                    f"from a few clips. Base: `{studio.pipe.base.id}` ({studio.pipe.base.description}).")
        with gr.Tab("Animate"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="First frame", type="pil", image_mode="RGB")
                    adapter = gr.Dropdown(animate_choices(), label="Motion", value=animate_choices()[0][1],
                                          allow_custom_value=True)  # names are checked by the Studio
                    with gr.Row():
                        frames = gr.Slider(2, 32, value=studio.pipe.base.frames, step=1, label="Frames")
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        seed = gr.Number(0, precision=0, label="Seed")
                    with gr.Accordion("Advanced", open=False):
                        shared_noise = gr.Slider(0, 1, value=0.05, step=0.01, label="Shared-noise ratio")
                        dct_init = gr.Checkbox(True, label="DCTInit (start from the first frame's low frequencies)")
                        adain = gr.Checkbox(True, label="AdaIN to the first frame")
                        guidance = gr.Slider(0, 5, value=1.0, step=0.1, label="Motion guidance (1 = off)")
                    go = gr.Button("Animate", variant="primary")
                    gr.Examples([[str(EXAMPLES / "example.png")], [str(EXAMPLES / "example-two-objects.png")]],
                                inputs=[image], label="Example first frames")
                with gr.Column():
                    video = gr.Video(label="Video")
                    previews = gr.Gallery(gallery(), label="Motions", columns=4, height=220)
            go.click(animate, [image, adapter, frames, steps, seed, shared_noise, dct_init, adain, guidance], video,
                     api_name="animate", concurrency_id=GPU_JOB, concurrency_limit=1)
        with gr.Tab("Mix"):
            with gr.Row():
                with gr.Column():
                    mix_image = gr.Image(label="First frame", type="pil", image_mode="RGB")
                    rows = []
                    for i in range(MAX_MIX):
                        with gr.Row():
                            rows.append(gr.Dropdown(choices(), label=f"Motion {i + 1}", value=None, allow_custom_value=True))
                            rows.append(gr.Slider(0, 2, value=1.0, step=0.05, label="Weight"))
                    with gr.Row():
                        mix_frames = gr.Slider(2, 32, value=studio.pipe.base.frames, step=1, label="Frames")
                        mix_steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        mix_seed = gr.Number(0, precision=0, label="Seed")
                    mix_go = gr.Button("Mix", variant="primary")
                mix_video = gr.Video(label="Video")
            mix_go.click(mix, [mix_image, mix_frames, mix_steps, mix_seed, *rows], mix_video, api_name="mix",
                         concurrency_id=GPU_JOB, concurrency_limit=1)
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(file_count="multiple", label="Clips of one motion (mp4, webm, gif)",
                                    file_types=[".mp4", ".webm", ".mov", ".gif"])
                    motion = gr.Textbox(label="Motion name", placeholder="e.g. move-left")
                    train_steps = gr.Slider(10, 2000, value=300, step=10, label="Steps")
                    with gr.Row():
                        start = gr.Button("Start", variant="primary")
                        resume = gr.Button("Resume")
                        stop = gr.Button("Stop")
                with gr.Column():
                    status = gr.Textbox(label="Status", interactive=False)
                    plot = gr.LinePlot(x="step", y="loss", label="Loss")
            outputs = [status, plot, adapter, *rows[0::2], previews]

            def train_start(files, motion, steps, progress=gr.Progress()):
                return train(files, motion, steps, False, progress)

            def train_resume(files, motion, steps, progress=gr.Progress()):
                return train(files, motion, steps, True, progress)

            start.click(train_start, [files, motion, train_steps], outputs, api_name="train",
                        concurrency_id=GPU_JOB, concurrency_limit=1)
            resume.click(train_resume, [files, motion, train_steps], outputs, api_name="resume_training",
                         concurrency_id=GPU_JOB, concurrency_limit=1)
            stop.click(studio.request_stop, None, None, api_name="stop_training", queue=False)
        list_button = gr.Button(visible=False)
        catalogue = gr.JSON(visible=False)
        list_button.click(lambda: studio.describe(), None, catalogue, api_name="list_adapters")
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
    args = parser.parse_args()
    demo = build_app(build_studio(args.backend))
    demo.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=args.share,
                                                   max_file_size="200mb")


if __name__ == "__main__":
    main()
