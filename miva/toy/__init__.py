"""Toy world: synthetic clips of simple shapes with known motions (see `miva.toy.world`)."""

from .world import (
    CAMERA_MOTIONS,
    DIRECTIONS,
    MOTIONS,
    OBJECT_MOTIONS,
    Clip,
    WorldConfig,
    heldout_stills,
    make_clip,
    make_dataset,
    make_still,
)

__all__ = [
    "CAMERA_MOTIONS", "DIRECTIONS", "MOTIONS", "OBJECT_MOTIONS", "Clip", "WorldConfig",
    "heldout_stills", "make_clip", "make_dataset", "make_still",
]
