"""Adapters on the Hugging Face Hub: list a collection, fetch one into the cache, push one.

Everything goes through `huggingface_hub` (no HTTP of our own), so `HF_ENDPOINT`, `HF_HUB_OFFLINE`,
`HF_HOME` / `HF_HUB_CACHE` and `HF_TOKEN` work as they do for every other Hub library:

- `list_hub_adapters` reads a collection (`HfApi.get_collection`) and each model repo's
  `adapter_config.json`; it never raises for network trouble but says why in `HubListing.offline`,
  so the UI can show "offline: local adapters only".
- `fetch_adapter` downloads only the adapter files (`ADAPTER_FILES`) into the normal HF cache with
  `snapshot_download`, which also serves them from the cache when offline. Pickled weights
  (`.bin`, `.pt`, ...) are never downloaded, let alone loaded.
- `push_adapter` creates the model repo and uploads only the adapter files, writing the model card
  first if the folder has none.

Errors are one sentence: `ValueError` for a bad id, token, config or base; `FileNotFoundError` for a
repo, file or cached copy that is not there; `ConnectionError` when a push cannot reach the Hub.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client; imported only for its exception types
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .config import CONFIG_NAME, WEIGHTS_NAME, MivaConfig

COLLECTION_ENV = "MIVA_COLLECTION"  # env var holding the collection slug the Space lists by default
CARD_NAME = "README.md"
PREVIEW_NAME = "preview.gif"
LOSS_NAME = "loss.png"
# The only files fetched from or pushed to an adapter repo: exact names, so no pickle ever matches.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PREVIEW_NAME, LOSS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # named in errors, never fetched
LIST_TIMEOUT_S = 20.0  # the default HTTP client has no timeout; a listing must not hang the UI
TOKENS_URL = "https://huggingface.co/settings/tokens"

# "owner/title-slug-<24 hex object id>", as in https://huggingface.co/collections/<slug>.
_COLLECTION_SLUG = re.compile(r"(?P<owner>[A-Za-z0-9][\w.-]*)/(?:[\w.-]*-)?[0-9a-f]{24}", re.ASCII)
_COLLECTION_EXAMPLE = "owner/title-0123456789abcdef01234567"


@dataclass
class HubAdapter:
    """One adapter repo of a collection. `folder` is set once the adapter is in the local cache."""

    repo_id: str
    motion: str
    base: str
    folder: Path | None = None


@dataclass
class HubListing:
    """The adapters of a collection; `offline` says in one sentence why the Hub could not be read."""

    collection: str
    adapters: list[HubAdapter] = field(default_factory=list)
    offline: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # repo id -> why it is not listed


def collection_id(override: str | None = None) -> str | None:
    """The collection slug to list: `override` (a CLI/app flag) if given, else $MIVA_COLLECTION, else None."""
    value = override if override is not None else os.environ.get(COLLECTION_ENV)
    value = (value or "").strip()
    return value or None


def check_collection_slug(collection: str) -> str:
    """A collection slug (or its URL, https://huggingface.co/collections/<slug>) -> the slug."""
    if not isinstance(collection, str) or not collection.strip():
        raise ValueError(f"give a Hub collection slug such as '{_COLLECTION_EXAMPLE}' (or set {COLLECTION_ENV}).")
    slug = collection.strip().rstrip("/")
    if "/collections/" in slug and slug.startswith(("http://", "https://")):
        slug = slug.split("/collections/", 1)[1]
    match = _COLLECTION_SLUG.fullmatch(slug)
    if match is None or len(slug) > 200:
        raise ValueError(
            f"'{collection}' is not a Hub collection slug; copy it from the collection's address, "
            f"it looks like '{_COLLECTION_EXAMPLE}'."
        )
    try:
        validate_repo_id(match["owner"])
    except HFValidationError as err:
        raise ValueError(f"'{collection}' is not a Hub collection slug: its owner is not a valid name ({_sentence(err)}).") from None
    return slug


def check_repo_id(repo_id: str, namespace: bool = False) -> str:
    """Validate a model repo id with huggingface_hub's rules; `namespace`: require 'owner/name'."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"'{repo_id}' is not a valid Hub repo id ({_sentence(err)}).") from None
    if namespace and "/" not in repo_id:
        raise ValueError(f"'{repo_id}' needs its owner: give the repo id as 'user-or-org/{repo_id}'.")
    return repo_id


# -- listing ---------------------------------------------------------------------------------------
def list_hub_adapters(collection: str, base: str | None = None, token: str | bool | None = None,
                      timeout: float = LIST_TIMEOUT_S) -> HubListing:
    """The model repos of a Hub collection that hold MIVA adapters (for `base` only, if given).

    Reads each repo's adapter_config.json (a small file, cached) to learn its base and motion. Never
    raises for network trouble: the listing then has `offline` set and holds what was read so far.
    Raises ValueError for a malformed collection slug.
    """
    slug = check_collection_slug(collection)
    listing = HubListing(slug)
    worker = threading.Thread(target=_fill_listing_safely, args=(listing, base, token), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # left to finish (or fail) on its own; it is a daemon, so exit does not wait
        return HubListing(slug, offline=f"the Hub at {constants.ENDPOINT} did not answer within {timeout:g} s.")
    return listing


def _fill_listing_safely(listing: HubListing, base: str | None, token) -> None:
    try:
        _fill_listing(listing, base, token)
    except Exception as err:  # noqa: BLE001 - whatever happens, the UI gets a listing and a reason
        listing.offline = f"listing collection '{listing.collection}' failed ({type(err).__name__}: {_sentence(err)})."


def _fill_listing(listing: HubListing, base: str | None, token) -> None:
    slug = listing.collection
    try:
        items = HfApi(token=token).get_collection(slug).items
    except Exception as err:  # noqa: BLE001 - the listing must never raise; every cause becomes a sentence
        listing.offline = _offline_reason(err, f"collection '{slug}'")
        return
    for item in sorted(items, key=lambda item: item.position):
        if item.item_type != "model":
            continue
        repo_id = item.item_id
        try:
            check_repo_id(repo_id)
            config_path = hf_hub_download(repo_id, CONFIG_NAME, token=token)
        except (RepositoryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError) as err:
            listing.skipped[repo_id] = _not_found_reason(err, repo_id)
            continue
        except HfHubHTTPError as err:
            if not 400 <= _code(err) < 500:  # 5xx: the Hub is in trouble, not this repo
                listing.offline = _offline_reason(err, f"adapter '{repo_id}'")
                return
            listing.skipped[repo_id] = f"the Hub refused to send its {CONFIG_NAME} ({_status(err)})."
            continue
        except ValueError as err:
            listing.skipped[repo_id] = _sentence(err) + "."
            continue
        except Exception as err:  # noqa: BLE001 - network trouble half-way: keep what was read
            listing.offline = _offline_reason(err, f"adapter '{repo_id}'")
            return
        try:
            config = MivaConfig.load(Path(config_path).parent)
        except (ValueError, TypeError) as err:
            listing.skipped[repo_id] = f"its {CONFIG_NAME} is not a MIVA config ({_sentence(err)})."
            continue
        if base is not None and config.base != base:
            continue
        listing.adapters.append(HubAdapter(repo_id, config.motion or repo_id.split("/")[-1], config.base,
                                           cached_adapter(repo_id)))


def cached_adapter(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of an adapter repo if all of its adapter files are there (no network)."""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES),
                                        local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file() else None


# -- fetch -----------------------------------------------------------------------------------------
def fetch_adapter(repo_id: str, base: str | None = None, token: str | bool | None = None,
                  revision: str | None = None) -> Path:
    """Download an adapter repo's files into the HF cache (or find them there offline); the snapshot folder.

    Only `ADAPTER_FILES` are downloaded. The folder is checked: a MIVA config, a readable
    safetensors file, and, if `base` is given, the same base.
    """
    check_repo_id(repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES), token=token))
    except LocalEntryNotFoundError as err:  # offline or unreachable, and not (fully) in the cache
        if isinstance(err.__cause__, HfHubHTTPError):  # reached, but refused (e.g. 403) or in trouble (5xx)
            raise FileNotFoundError(
                f"adapter '{repo_id}' is not in the cache and the Hub refused to send it ({_status(err.__cause__)})."
            ) from None
        raise FileNotFoundError(
            f"adapter '{repo_id}' is not in the cache ({constants.HF_HUB_CACHE}) and {_unreachable()}; "
            "connect once to download it."
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise FileNotFoundError(_not_found_reason(err, repo_id, revision)) from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"the Hub refused to send adapter '{repo_id}' ({_status(err)}).") from None
    except (httpx2.HTTPError, OfflineModeIsEnabled) as err:
        raise FileNotFoundError(f"downloading adapter '{repo_id}' failed: {_sentence(err)}.") from None
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        _explain_missing(repo_id, folder, missing)
    config = MivaConfig.load(folder)
    _weights_header(folder / WEIGHTS_NAME)
    if base is not None and config.base != base:
        raise ValueError(f"adapter '{repo_id}' was made for base '{config.base}' but the loaded base is '{base}'.")
    return folder


def _explain_missing(repo_id: str, folder: Path, missing: list[str]) -> None:
    """Raise why a fetched snapshot lacks adapter files: the repo lacks them, or only part is cached."""
    try:  # written by snapshot_download whenever it reached the Hub; keyed by the snapshot's commit
        files = sorted(f.path for f in get_cached_repo_tree(repo_id, revision=folder.name))
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        files = None
    if files is None or all(name in files for name in missing):
        raise FileNotFoundError(
            f"adapter '{repo_id}' is only partly in the cache ({constants.HF_HUB_CACHE}, no {missing[0]}) and "
            f"{_unreachable()}; connect once to download it."
        )
    if CONFIG_NAME in missing:
        raise FileNotFoundError(f"Hub repo '{repo_id}' has no {CONFIG_NAME}, so it is not a MIVA adapter.")
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    has = f" (it has {', '.join(pickles[:3])})" if pickles else ""
    raise FileNotFoundError(
        f"Hub repo '{repo_id}' has no {WEIGHTS_NAME}{has}; MIVA loads safetensors weights only and never "
        "downloads pickled files."
    )


# -- push ------------------------------------------------------------------------------------------
def push_adapter(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an adapter folder to the model repo `repo_id` (created if needed); the repo's URL.

    `token` must be allowed to write (default: HF_TOKEN or the token saved by `hf auth login`).
    Only `ADAPTER_FILES` are uploaded; a README.md model card is written first if it is missing.
    """
    folder = Path(folder)
    check_repo_id(repo_id, namespace=True)
    token = (token or "").strip() or get_token()
    if not token:
        raise ValueError(
            f"pushing to the Hub needs a Hugging Face write token: create one at {TOKENS_URL} and pass it "
            "(--token) or set HF_TOKEN."
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder '{folder}' does not exist; give a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
    config = MivaConfig.load(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_NAME} is missing; an adapter is pushed with its safetensors weights.")
    shapes = _weights_header(folder / WEIGHTS_NAME)
    if not (folder / CARD_NAME).is_file():
        from .card import write_model_card

        write_model_card(folder, config, _parameter_counts(shapes))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder, allow_patterns=list(ADAPTER_FILES),
                          commit_message=f"Upload MIVA adapter: {config.motion or folder.name} (base {config.base})")
    except HfHubHTTPError as err:
        status = _code(err)
        if status == 401:
            raise ValueError(f"the Hub did not accept the token (401); give a Hugging Face write token from {TOKENS_URL}.") from None
        if status == 403:
            raise ValueError(
                f"the token may not write to '{repo_id}' (403); give a Hugging Face write token for "
                f"'{repo_id.split('/')[0]}' from {TOKENS_URL}."
            ) from None
        raise ValueError(f"the Hub refused the upload to '{repo_id}' ({_status(err)}).") from None
    except (httpx2.HTTPError, OfflineModeIsEnabled) as err:
        detail = "" if isinstance(err, OfflineModeIsEnabled) else f" ({type(err).__name__}: {_sentence(err)})"
        raise ConnectionError(f"pushing to '{repo_id}' failed: {_unreachable()}{detail}.") from None
    except ValueError as err:  # huggingface_hub's own checks, e.g. "Invalid metadata in README.md."
        raise ValueError(f"the Hub refused the upload to '{repo_id}': {_sentence(err)}.") from None
    return str(url)


# -- helpers ---------------------------------------------------------------------------------------
def _weights_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (memory-mapped, nothing unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({_sentence(err)}); re-save or re-download the adapter.") from None


def _parameter_counts(shapes: dict[str, list[int]]) -> dict[str, int]:
    """Parameter counts per part, by the tensor names `MivaAdapters.parameter_report` uses."""
    from .card import PART_NAMES, part_of

    counts = dict.fromkeys(PART_NAMES, 0)
    for key, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        counts[part_of(key)] += numel
    counts["total"] = sum(counts.values())
    return counts


def _offline_reason(err: BaseException, what: str) -> str:
    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        err = err.__cause__  # hf_hub_download wraps the network error it fell back from
    if isinstance(err, OfflineModeIsEnabled) or constants.is_offline_mode():
        return f"HF_HUB_OFFLINE is set, so {what} was not read from the Hub."
    if isinstance(err, HfHubHTTPError):
        status = _code(err)
        if status == 404:
            return f"{what} was not found on the Hub at {constants.ENDPOINT}."
        if status in (401, 403):
            return f"{what} is private or the token may not read it ({status})."
        return f"the Hub at {constants.ENDPOINT} answered {_status(err)} for {what}."
    if isinstance(err, httpx2.HTTPError):
        return f"the Hub at {constants.ENDPOINT} cannot be reached ({type(err).__name__}: {_sentence(err)})."
    return f"the Hub's answer for {what} could not be read ({type(err).__name__}: {_sentence(err)})."


def _unreachable() -> str:
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return f"the Hub at {constants.ENDPOINT} cannot be reached"


def _not_found_reason(err: BaseException, repo_id: str, revision: str | None = None) -> str:
    if isinstance(err, RevisionNotFoundError):
        return f"Hub repo '{repo_id}' has no revision '{revision or constants.DEFAULT_REVISION}'."
    if isinstance(err, RemoteEntryNotFoundError):
        return f"Hub repo '{repo_id}' has no {CONFIG_NAME}, so it is not a MIVA adapter."
    return f"Hub repo '{repo_id}' was not found, or it is private or gated and the token may not read it."


def _code(err: HfHubHTTPError) -> int:
    return err.response.status_code if err.response is not None else 0


def _status(err: HfHubHTTPError) -> str:
    return f"HTTP {_code(err)}" if _code(err) else "no response"


def _sentence(err: BaseException) -> str:
    """The first sentence of an exception's message, without its period (to embed in ours)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.split(r"(?<=\.)\s+(?=[A-Z(])", text, maxsplit=1)[0].rstrip(".")
