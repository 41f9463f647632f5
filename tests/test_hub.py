"""miva.hub through the real huggingface_hub client, against a local Hub stand-in (tests/hub_standin.py).

Nothing of miva is mocked: huggingface_hub's endpoint, cache, token and offline settings are pointed at
the stand-in and at tmp_path, and every call goes over HTTP on loopback.
"""

import pickle
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from hub_standin import READ_TOKEN, USER, WRITE_TOKEN, HubStandIn
from huggingface_hub import constants
from safetensors.numpy import save_file

from miva import hub as mivahub
from miva.config import CONFIG_NAME, WEIGHTS_NAME, MivaConfig

SLUG = f"{USER}/miva-adapters-0123456789abcdef01234567"
REPO = f"{USER}/zoom-in"
# One tensor per part, named as MivaAdapters.state_dict names them: 16 CFA + 8 implicit + 8 LoRA = 32.
TENSORS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.adapters.to_q.weight": (4, 4),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.adapters.down.weight": (2, 4),
    "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (2, 4),
}


def _isolate(monkeypatch, tmp_path: Path, endpoint: str) -> None:
    """Point huggingface_hub (which reads its settings into `constants` at import) at `endpoint` and tmp_path."""
    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_XET_CACHE", str(home / "xet"))  # hf_xet (used by upload_folder) logs there
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", mivahub.COLLECTION_ENV):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    standin = HubStandIn().start()
    _isolate(monkeypatch, tmp_path, standin.url)
    yield standin
    standin.stop()


@pytest.fixture
def down(monkeypatch, tmp_path):
    """An endpoint nobody listens on (a port just closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _isolate(monkeypatch, tmp_path, f"http://127.0.0.1:{port}")
    return constants.ENDPOINT


def make_adapter(folder: Path, base="toy-v4", motion="zoom in", card=True) -> Path:
    folder.mkdir(parents=True)
    config = MivaConfig(base=base, motion=motion)
    config.save(folder)
    save_file({name: np.ones(shape, np.float32) for name, shape in TENSORS.items()}, str(folder / WEIGHTS_NAME))
    (folder / "preview.gif").write_bytes(b"GIF89a" + bytes(range(32)))
    if card:
        (folder / "README.md").write_text(f"---\nlibrary_name: miva\n---\n\n# MIVA: {motion}\n")
    # Training leftovers that must never be pushed.
    (folder / "optimizer.pt").write_bytes(pickle.dumps({"step": 3}))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step_50.safetensors").write_bytes(b"x")
    return folder


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when unpickled."""

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil())


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path / "zoom-in")


def test_push_list_fetch_and_offline_round_trip(hub, adapter, monkeypatch):
    url = mivahub.push_adapter(adapter, REPO, token=WRITE_TOKEN)
    assert url == f"{hub.url}/{REPO}"
    assert sorted(hub.repos[REPO].files) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md", "preview.gif"])
    assert hub.repos[REPO].files[WEIGHTS_NAME] == (adapter / WEIGHTS_NAME).read_bytes()

    hub.put_repo(f"{USER}/not-an-adapter", {"README.md": b"# hello\n"})
    for repo_id in (REPO, f"{USER}/not-an-adapter"):
        hub.add_to_collection(SLUG, repo_id)
    hub.add_to_collection(SLUG, f"{USER}/some-dataset", item_type="dataset")

    listing = mivahub.list_hub_adapters(SLUG)
    assert listing.offline is None
    assert listing.adapters == [mivahub.HubAdapter(REPO, "zoom in", "toy-v4", None)]
    assert list(listing.skipped) == [f"{USER}/not-an-adapter"] and "not a MIVA adapter" in listing.skipped[f"{USER}/not-an-adapter"]
    assert mivahub.list_hub_adapters(SLUG, base="animatediff-v3").adapters == []

    folder = mivahub.fetch_adapter(REPO, base="toy-v4")
    assert folder.is_relative_to(Path(constants.HF_HUB_CACHE))
    assert MivaConfig.load(folder) == MivaConfig.load(adapter)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "preview.gif"):
        assert (folder / name).read_bytes() == (adapter / name).read_bytes()
    assert mivahub.list_hub_adapters(SLUG).adapters[0].folder == folder  # now known to be cached

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.requests)
    assert mivahub.fetch_adapter(REPO, base="toy-v4") == folder
    offline = mivahub.list_hub_adapters(SLUG)
    assert len(hub.requests) == seen  # offline means no request at all
    assert offline.adapters == [] and "HF_HUB_OFFLINE" in offline.offline


def test_fetch_a_revision(hub, tmp_path):
    mivahub.push_adapter(make_adapter(tmp_path / "v1", motion="zoom in"), REPO, token=WRITE_TOKEN)
    first = hub.repos[REPO].sha
    mivahub.push_adapter(make_adapter(tmp_path / "v2", motion="zoom in faster"), REPO, token=WRITE_TOKEN)
    assert MivaConfig.load(mivahub.fetch_adapter(REPO)).motion == "zoom in faster"
    old = mivahub.fetch_adapter(REPO, revision=first)
    assert old.name == first and MivaConfig.load(old).motion == "zoom in"


def test_push_writes_the_model_card_when_missing(hub, tmp_path):
    folder = make_adapter(tmp_path / "pan-left", motion="pan left", card=False)
    mivahub.push_adapter(folder, f"{USER}/pan-left", token=WRITE_TOKEN)
    card = hub.repos[f"{USER}/pan-left"].files["README.md"].decode()
    assert card == (folder / "README.md").read_text()
    assert "# MIVA: pan left" in card and "| **total** | **32** |" in card and "![preview](preview.gif)" in card
    assert "| Cross-frame attention (CFA, §3.3.1) | 16 |" in card


def test_wrong_base_names_both_bases(hub, adapter):
    mivahub.push_adapter(adapter, REPO, token=WRITE_TOKEN)
    with pytest.raises(ValueError, match="made for base 'toy-v4' but the loaded base is 'animatediff-v3'"):
        mivahub.fetch_adapter(REPO, base="animatediff-v3")


def test_pickle_weights_are_never_downloaded_or_unpickled(hub, tmp_path):
    marker = tmp_path / "unpickled"
    config = MivaConfig(base="toy-v4").save(tmp_path).read_bytes()
    hub.put_repo(f"{USER}/old-style", {CONFIG_NAME: config, "pytorch_model.bin": evil_pickle(marker),
                                       "adapter_model.pt": evil_pickle(marker)})
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME} \\(it has adapter_model.pt, pytorch_model.bin\\)"):
        mivahub.fetch_adapter(f"{USER}/old-style")
    # A pickle under the safetensors name is refused by the safetensors reader, not unpickled.
    hub.put_repo(f"{USER}/disguised", {CONFIG_NAME: config, WEIGHTS_NAME: evil_pickle(marker)})
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        mivahub.fetch_adapter(f"{USER}/disguised")
    assert not marker.exists()
    assert not [p for p in hub.paths() if p.endswith((".bin", ".pt"))]
    assert not [p for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.name.endswith((".bin", ".pt"))]


def test_missing_repo_and_not_an_adapter(hub):
    with pytest.raises(FileNotFoundError, match=f"'{USER}/nothing' was not found"):
        mivahub.fetch_adapter(f"{USER}/nothing")
    hub.put_repo(f"{USER}/readme-only", {"README.md": b"# hi\n"})
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}, so it is not a MIVA adapter"):
        mivahub.fetch_adapter(f"{USER}/readme-only")


def test_offline_with_only_the_config_cached(hub, adapter, monkeypatch):
    mivahub.push_adapter(adapter, REPO, token=WRITE_TOKEN)
    hub.add_to_collection(SLUG, REPO)
    assert mivahub.list_hub_adapters(SLUG).adapters[0].folder is None  # listing caches the config only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=f"only partly in the cache .*no {WEIGHTS_NAME}.* HF_HUB_OFFLINE is set"):
        mivahub.fetch_adapter(REPO)
    with pytest.raises(FileNotFoundError, match="'miva-tester/other' is not in the cache .* HF_HUB_OFFLINE is set"):
        mivahub.fetch_adapter(f"{USER}/other")


def test_hub_down_gives_offline_listing_and_clear_fetch_error(down):
    listing = mivahub.list_hub_adapters(SLUG)
    assert listing.adapters == []
    assert listing.offline.startswith(f"the Hub at {down} cannot be reached (ConnectError")
    with pytest.raises(FileNotFoundError, match=f"'{REPO}' is not in the cache .* the Hub at {down} cannot be reached"):
        mivahub.fetch_adapter(REPO)
    with pytest.raises(ConnectionError, match=f"pushing to '{REPO}' failed: the Hub at {down} cannot be reached"):
        mivahub.push_adapter(make_adapter(Path(constants.HF_HOME).parent / "a"), REPO, token=WRITE_TOKEN)


def test_private_or_broken_repos_are_skipped_not_offline(hub, tmp_path):
    config = MivaConfig(base="toy-v4").save(tmp_path).read_bytes()
    hub.put_repo(f"{USER}/private", {CONFIG_NAME: config}, private=True)
    hub.put_repo(f"{USER}/newer", {CONFIG_NAME: b'{"base": "toy-v4", "format_version": 99}'})
    hub.put_repo(f"{USER}/fine", {CONFIG_NAME: config})
    for repo_id in ("private", "gone", "newer", "fine"):
        hub.add_to_collection(SLUG, f"{USER}/{repo_id}")
    listing = mivahub.list_hub_adapters(SLUG)
    assert listing.offline is None
    assert [a.repo_id for a in listing.adapters] == [f"{USER}/fine"]
    assert list(listing.skipped) == [f"{USER}/private", f"{USER}/gone", f"{USER}/newer"]
    assert "private or gated" in listing.skipped[f"{USER}/private"]
    assert "upgrade miva" in listing.skipped[f"{USER}/newer"]


def test_stalled_hub_listing_gives_up(hub):
    hub.stall["/api/collections/"] = threading.Event()
    listing = mivahub.list_hub_adapters(SLUG, timeout=0.3)
    assert listing.offline == f"the Hub at {hub.url} did not answer within 0.3 s."


def test_collection_not_found_or_malformed(hub):
    assert mivahub.list_hub_adapters(SLUG).offline == f"collection '{SLUG}' was not found on the Hub at {hub.url}."
    hub.add_to_collection(SLUG, REPO)
    assert mivahub.list_hub_adapters(f"https://huggingface.co/collections/{SLUG}").collection == SLUG
    seen = len(hub.requests)
    for bad in ("", "   ", "adapters", f"{USER}/miva-adapters", "../../api/whoami-0123456789abcdef01234567",
                f"{USER}/x/0123456789abcdef01234567", f"{USER}/miva adapters-0123456789abcdef01234567"):
        with pytest.raises(ValueError, match="collection slug"):
            mivahub.list_hub_adapters(bad)
    assert len(hub.requests) == seen


def test_collection_id_setting(monkeypatch):
    monkeypatch.delenv(mivahub.COLLECTION_ENV, raising=False)
    assert mivahub.collection_id() is None
    monkeypatch.setenv(mivahub.COLLECTION_ENV, f" {SLUG} ")
    assert mivahub.collection_id() == SLUG
    assert mivahub.collection_id("other/x-0123456789abcdef01234567") == "other/x-0123456789abcdef01234567"


def test_push_needs_a_write_token(hub, adapter):
    with pytest.raises(ValueError, match="needs a Hugging Face write token"):
        mivahub.push_adapter(adapter, REPO, token=None)
    assert hub.requests == []
    with pytest.raises(ValueError, match=r"may not write to 'miva-tester/zoom-in' \(403\); give a Hugging Face write token"):
        mivahub.push_adapter(adapter, REPO, token=READ_TOKEN)
    with pytest.raises(ValueError, match=r"did not accept the token \(401\); give a Hugging Face write token"):
        mivahub.push_adapter(adapter, REPO, token="hf_wrong")
    assert REPO not in hub.repos


def test_push_uses_the_logged_in_token(hub, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert mivahub.push_adapter(adapter, REPO) == f"{hub.url}/{REPO}"


def test_bad_repo_ids_are_refused_before_any_request(hub, adapter):
    seen = len(hub.requests)
    for bad in ("a/b/c", "bad..name/x", f"{USER}/-dash", f"{USER}/ünï", "", f"{USER}/x.git"):
        with pytest.raises(ValueError, match="is not a valid Hub repo id"):
            mivahub.push_adapter(adapter, bad, token=WRITE_TOKEN)
        with pytest.raises(ValueError, match="is not a valid Hub repo id"):
            mivahub.fetch_adapter(bad)
    with pytest.raises(ValueError, match="needs its owner"):
        mivahub.push_adapter(adapter, "zoom-in", token=WRITE_TOKEN)
    assert len(hub.requests) == seen


def test_push_checks_the_folder(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mivahub.push_adapter(tmp_path / "nope", REPO, token=WRITE_TOKEN)
    folder = make_adapter(tmp_path / "broken")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} is missing"):
        mivahub.push_adapter(folder, REPO, token=WRITE_TOKEN)
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mivahub.push_adapter(folder, REPO, token=WRITE_TOKEN)
    assert REPO not in hub.repos
