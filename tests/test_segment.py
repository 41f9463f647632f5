"""Text -> masks through the real loading and inference code, offline.

Tiny random Grounding DINO and SAM 2 (video) models of the transformers classes are built in code,
saved with `save_pretrained` in the Hub folder layout (safetensors), and loaded by `TextSegmenter`
through the same `from_pretrained` calls it uses for the Hub checkpoints. Random weights give random
boxes, so the plumbing is checked with box_threshold=0 (every query is a detection).
"""

import http.server
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from miva.masks import fit_mask
from miva.segment import (
    NothingFound,
    SegmentationUnavailable,
    TextSegmenter,
    save_mask,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "the", "red", "square", "blue", "circle", "a"]
SAM_SIZE = 64  # SAM 2's square input side in the tiny model (1024 in the real one)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.rstrip().endswith(".") and not re.search(r"[.;!?]\s+[A-Z]", message)


def save_tiny_grounding_dino(folder):
    """Grounding DINO with a tiny Swin backbone and a tiny BERT text encoder (built from a config, no
    download); at least 2 decoder layers, and num_feature_levels >= the backbone's 3 outputs."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=32)
    (folder / "vocab.txt").unlink()  # save_pretrained writes the tokenizer's own files
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=8, max_position_embeddings=32),
        d_model=32,  # GroupNorm(32, d_model) in the input projections
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=8, decoder_ffn_dim=8, num_queries=4, num_feature_levels=3,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 48, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def save_tiny_sam2(folder, side: int = SAM_SIZE):
    """A SAM 2 video checkpoint, as on the Hub (`Sam2Model` loads the same folder): hidden size 128 > 64,
    memory_encoder_output_channels=64; Hiera windows >= 2 after pooling and no global-attention block
    at a stage's first block."""
    from transformers import (
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
    )

    hidden = 128
    hiera = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[side, side],
                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                 num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
                 global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    vision = dict(model_type="sam2_vision_model", backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                  backbone_feature_sizes=[[side // 4] * 2, [side // 8] * 2, [side // 16] * 2], fpn_hidden_size=hidden)
    config = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=hidden, image_size=side, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=hidden, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
        image_size=side, num_maskmem=3, memory_attention_hidden_size=hidden, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32, memory_attention_rope_feat_sizes=[side // 16] * 2,
        memory_encoder_hidden_size=hidden, memory_encoder_output_channels=64, mask_downsampler_embed_dim=hidden,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=hidden, memory_fuser_intermediate_dim=32,
    )
    Sam2VideoModel(config).save_pretrained(folder)
    Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": side, "width": side},
                                           mask_size={"height": side // 4, "width": side // 4}),
        video_processor=Sam2VideoVideoProcessor(size={"height": side, "width": side}),
    ).save_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment-models")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_tiny_grounding_dino(root / "gdino")
        save_tiny_sam2(root / "sam2")
    assert (root / "gdino" / "model.safetensors").is_file() and (root / "sam2" / "model.safetensors").is_file()
    return root


@pytest.fixture(scope="module")
def segmenter(models):
    return TextSegmenter(detector=models / "gdino", segmenter=models / "sam2", box_threshold=0.0)


@pytest.fixture
def frames():
    """5 non-square frames (40 x 56): a red square moving right on grey."""
    clip = np.full((5, 40, 56, 3), 128, np.uint8)
    for t in range(5):
        clip[t, 10:22, 8 + 3 * t:20 + 3 * t] = (220, 30, 30)
    return clip


def test_segment_image_and_video_at_frame_size(segmenter, frames):
    mask = segmenter.segment_image(frames[0], "the red square")
    assert mask.shape == (40, 56) and mask.dtype == np.bool_ and mask.any()
    mask_pil = segmenter.segment_image(Image.fromarray(frames[0]), "The red square.")
    np.testing.assert_array_equal(mask_pil, mask)  # PIL and array input, phrase case/full stop normalised

    boxes = segmenter.boxes(frames[0], "the red square")
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and 1 <= len(boxes) <= 4  # 4 queries in the tiny model
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 56).all() and (boxes[:, 1::2] <= 40).all()

    masks = segmenter.segment_video(frames, "the red square")
    assert masks.shape == (5, 40, 56) and masks.dtype == np.bool_ and masks[0].any()


def test_phrase_that_finds_nothing(models, frames):
    strict = TextSegmenter(detector=models / "gdino", segmenter=models / "sam2", box_threshold=1.01)
    for run in (strict.segment_image, strict.segment_video):
        with pytest.raises(NothingFound, match="blue circle") as info:
            run(frames if run == strict.segment_video else frames[0], "blue circle")
        assert isinstance(info.value, ValueError) and one_sentence(str(info.value))
        assert "draw the mask" in str(info.value)


def test_empty_phrase_and_bad_frames(segmenter, frames):
    for text in ("", "   "):
        with pytest.raises(ValueError, match="phrase is empty") as info:
            segmenter.segment_image(frames[0], text)
        assert not isinstance(info.value, NothingFound) and one_sentence(str(info.value))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\) uint8") as info:
        segmenter.segment_video(frames.astype(np.float32), "the red square")
    assert one_sentence(str(info.value))


def test_missing_models_offline(tmp_path, models, frames, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time; set both
    missing_folder = TextSegmenter(detector=tmp_path / "no-such-folder", segmenter=models / "sam2")
    not_cached = TextSegmenter(detector="miva-tests/no-such-detector", segmenter=models / "sam2")
    for segmenter in (missing_folder, not_cached):  # constructing is free: models load on first use
        with pytest.raises(SegmentationUnavailable, match="not available offline") as info:
            segmenter.segment_image(frames[0], "the red square")
        assert isinstance(info.value, RuntimeError) and one_sentence(str(info.value))
        assert "network" in str(info.value) and segmenter.detector in str(info.value)

    (tmp_path / "empty").mkdir()
    no_sam = TextSegmenter(detector=models / "gdino", segmenter=tmp_path / "empty", box_threshold=0.0)
    with pytest.raises(SegmentationUnavailable, match="lacks files") as info:
        no_sam.segment_video(frames, "the red square")
    assert one_sentence(str(info.value))


@pytest.fixture
def hub_without_repos(monkeypatch):
    """A loopback stand-in for the Hub that answers every file request 'repository not found'."""
    import transformers.utils.hub
    from huggingface_hub import constants

    class NoRepos(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoRepos)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    # transformers shares one lazily made HfApi that read ENDPOINT when it was created: make a fresh one
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    yield endpoint
    server.shutdown()
    server.server_close()
    thread.join()


def test_unknown_hub_id_online(hub_without_repos, models, frames):
    segmenter = TextSegmenter(detector=models / "gdino", segmenter="miva-tests/no-such-sam2")
    with pytest.raises(SegmentationUnavailable, match="nor a model on the Hugging Face Hub") as info:
        segmenter.segment_image(frames[0], "the red square")
    assert one_sentence(str(info.value)) and "offline" not in str(info.value)


def test_saved_masks_read_back_through_fit_mask(tmp_path):
    mask = np.zeros((6, 10), bool)
    mask[1:4, 2:7] = True
    path = save_mask(mask, tmp_path / "sub" / "mask.png")
    stored = np.asarray(Image.open(path))
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 255}  # white = region
    np.testing.assert_array_equal(fit_mask(path, 1, 6, 10)[0].numpy() > 0.5, mask)
    save_mask(torch.tensor(mask, dtype=torch.float32), tmp_path / "t.png")  # 0-1 float and torch masks save too
    np.testing.assert_array_equal(fit_mask(tmp_path / "t.png", 1, 6, 10)[0].numpy() > 0.5, mask)


def test_mask_file_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not read 'broken.png' as a mask image") as info:
        fit_mask(tmp_path / "broken.png", 1, 4, 4)
    assert one_sentence(str(info.value))
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        fit_mask(tmp_path / "missing.png", 1, 4, 4)
    assert one_sentence(str(info.value))
    with pytest.raises(ValueError, match=r"\.png file name"):
        save_mask(np.ones((2, 2), bool), tmp_path / "mask.jpg")
    with pytest.raises(ValueError, match=r"one \(H, W\) array"):
        save_mask(np.ones((2, 2, 2), bool), tmp_path / "mask.png")


def test_an_m_miva_trains_from_masks_found_by_a_phrase(segmenter, frames, tmp_path):
    """The masks `train --mask-text` uses: one (F, H, W) sequence per clip, from the same segmenter."""
    from miva.backends import load_base
    from miva.config import MivaConfig
    from miva.pipeline import MivaPipeline
    from miva.train import train_adapter

    clips = [np.stack([np.asarray(Image.fromarray(f).resize((32, 32))) for f in frames[:4]])]
    masks = [segmenter.segment_video(clip, "the red square").astype(np.float32) for clip in clips]
    assert masks[0].shape == (4, 32, 32) and masks[0][0].any()
    folder = train_adapter(MivaPipeline(load_base("tiny")), clips, tmp_path / "m", "slide", steps=2, preview_steps=1,
                           masks=masks)
    assert MivaConfig.load(folder).masked
