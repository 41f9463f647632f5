"""Where adapters are found by name: the shipped `adapters/` folder (and, for the app, its own folders).

A name never becomes a path outside those folders.
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parent.parent / "adapters"


def resolve_adapter(spec: str | Path, search: tuple[Path, ...] = (ADAPTERS_DIR,), allow_paths: bool = True) -> Path:
    """An adapter folder from a path (if `allow_paths`), or a name looked up in the adapters folder(s).

    A name never becomes a path outside those folders: it must be a plain folder name. Callers that
    take names from other people (the app, the API) pass allow_paths=False.
    """
    path = Path(spec)
    if allow_paths and path.is_dir():
        return path
    name = str(spec)
    if name in ("", ".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise FileNotFoundError(f"adapter '{spec}' was not found; give an adapter folder or the name of one in {search[0]}.")
    for folder in search:
        candidate = (folder / name).resolve()
        if candidate.parent == folder.resolve() and candidate.is_dir():
            return candidate
    known = sorted(p.name for folder in search if folder.is_dir() for p in folder.iterdir() if p.is_dir())
    raise FileNotFoundError(f"adapter '{spec}' was not found; known adapters: {', '.join(known) or 'none'}.")
