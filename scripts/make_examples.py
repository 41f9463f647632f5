"""Regenerate the example first frames in assets/ from the toy world (deterministic)."""

from pathlib import Path

from PIL import Image

from miva.toy import WorldConfig, make_still

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    for name, seed, config in [
        ("example.png", 7, WorldConfig(size=128, background="texture", object_texture=True)),
        ("example-two-objects.png", 11, WorldConfig(size=128, num_objects=2, background="texture")),
    ]:
        Image.fromarray(make_still(seed, config)).save(ASSETS / name)
        print(ASSETS / name)


if __name__ == "__main__":
    main()
