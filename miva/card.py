"""The README.md model card written beside every saved adapter (Hub-style front matter)."""

from __future__ import annotations

from pathlib import Path

from .config import MivaConfig

# Hub ids of the components behind each base id, for the card's `base_model` field.
BASE_MODELS = {
    "animatediff-v3": ["stable-diffusion-v1-5/stable-diffusion-v1-5", "guoyww/animatediff-motion-adapter-v1-5-3"],
    "wan2.1-1.3b": ["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"],
}
BACKENDS = {"toy-v4": "toy"}  # base ids whose backend (`--base`, `from_base`) has another name
PART_NAMES = {
    "cross_frame_attention": "Cross-frame attention (CFA, §3.3.1)",
    "implicit_prompt": "Implicit prompt (§3.3.2)",
    "temporal_lora": "Temporal LoRA (§3.3.3)",
    "mask_stream": "M-MIVA mask stream (§3.4)",
}


def part_of(key: str) -> str:
    """The part of a MIVA a tensor belongs to, from its canonical name (adapter name removed)."""
    if ".lora_" in key:
        return "temporal_lora"
    if ".mask_adapters." in key:
        return "mask_stream"
    if ".attn1.processor." in key:
        return "cross_frame_attention"
    return "implicit_prompt"


def model_card(name: str, config: MivaConfig, counts: dict[str, int], preview: bool = False) -> str:
    motion = config.motion or name
    slug = "-".join(motion.lower().split())
    front = ["---", "library_name: miva", "pipeline_tag: image-to-video", "tags:", "- miva", "- motion-adapter",
             "- image-to-video", f"- motion-{slug}"]
    if config.base in BASE_MODELS:
        front += ["base_model:"] + [f"- {model}" for model in BASE_MODELS[config.base]]
    front.append("---")
    rows = [f"| {PART_NAMES[part]} | {counts[part]:,} |" for part in PART_NAMES if counts.get(part)]
    cfa = "full-rank" if config.cfa_rank is None else f"rank {config.cfa_rank}"
    lora = (f"temporal LoRA rank {config.temporal_lora_rank} on {', '.join(config.temporal_lora_targets)}"
            if config.temporal_lora_rank else "no temporal LoRA")
    backend = BACKENDS.get(config.base, config.base)
    kind, mask_cli, mask_py, subject = "MIVA", "", "", ""
    if config.masked:
        kind, mask_cli, mask_py = "M-MIVA", f" --mask {name}=subject.png", f', masks={{"{name}": "subject.png"}}'
        subject = (" It also generates its subject's mask sequence and keeps the motion on the subject: give it "
                   "the subject's mask on the first frame (white on black).")
    lines = front + [
        "",
        f"# {kind}: {motion}",
        "",
        f"A Modular Image-to-Video Adapter that animates a still image with the motion **{motion}**, "
        f"for the base model `{config.base}`.{subject}",
        "",
        *(["![preview](preview.gif)", ""] if preview else []),
        "| part | parameters |",
        "|---|---:|",
        *rows,
        f"| **total** | **{counts.get('total', 0):,}** |",
        "",
        f"CFA projections: {cfa}, φ temperature {config.cfa_temperature}; implicit prompt width "
        f"{config.implicit_prompt_rank}; {lora}.",
        "",
        "## Use",
        "",
        "```bash",
        f"python -m miva animate --base {backend} --image first_frame.png --adapter path/to/{name}:1.0{mask_cli} --out out.mp4",
        "```",
        "",
        "```python",
        "from miva.pipeline import MivaPipeline",
        f'pipe = MivaPipeline.from_base("{backend}")',
        f'pipe.load_adapter("path/to/{name}")',
        f'pipe("first_frame.png", adapters={{"{name}": 1.0}}{mask_py}, seed=0).save("out.mp4")',
        "```",
    ]
    if config.training:
        lines += ["", "## Training", ""] + [f"- {key}: {value}" for key, value in sorted(config.training.items())]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config: MivaConfig, counts: dict[str, int]) -> Path:
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(model_card(folder.name, config, counts, preview=(folder / "preview.gif").is_file()))
    return path
