"""Studio behaviour that the app relies on but a single process cannot show."""

from miva.media import save_video
from miva.studio import Studio
from miva.toy.world import WorldConfig, make_clip


def test_a_stop_from_another_process_reaches_the_run(pipe, tmp_path):
    """On ZeroGPU the run executes in a forked process: Stop must travel through files, not memory.
    A second Studio on the same folder shares nothing else with the first."""
    clips = []
    for seed in range(2):
        clips.append(save_video(make_clip("move-left", seed, WorldConfig(size=32, frames=16)).frames,
                                tmp_path / f"c{seed}.mp4"))
    studio = Studio(pipe, shipped=tmp_path / "none", workdir=tmp_path / "work")
    elsewhere = Studio(pipe, shipped=tmp_path / "none", workdir=tmp_path / "work")
    asked = []

    def progress(step, total, loss, eta):
        if step == 2:
            asked.append(elsewhere.request_stop(owner="another-page"))
            asked.append(elsewhere.request_stop(owner="page"))

    folder, status = studio.train(clips, "wiggle", steps=8, progress=progress, owner="page")
    assert asked == [False, True]  # only the page that started the run stops it
    assert folder is None and status["step"] == 2
    assert (tmp_path / "work" / "adapters" / "wiggle" / "checkpoint" / "state.json").is_file()
    assert not elsewhere.request_stop(owner="page")  # the run is over: nothing left to stop
    folder, status = studio.train(clips, "wiggle", steps=8, resume=True, owner="page")
    assert folder is not None and status["step"] == 8


def test_an_m_miva_without_its_subject_says_where_to_give_it(pipe, tmp_path, first_frame):
    from miva.adapter import attach
    from miva.adapter_files import save_adapter
    from miva.config import MivaConfig

    shipped = tmp_path / "adapters"
    attach(pipe.base.unet, MivaConfig(base="tiny", masked=True, motion="wave"), "wave")
    save_adapter(pipe.base.unet, "wave", shipped / "wave")
    pipe.unload_adapter()
    studio = Studio(pipe, shipped=shipped, workdir=tmp_path / "work")
    assert [a.label for a in studio.catalogue()] == ["wave · M-MIVA"]
    import pytest

    with pytest.raises(ValueError, match="'wave' is an M-MIVA and moves only its subject: in the Mix tab"):
        studio.animate(first_frame, {"wave": 1.0}, frames=4, steps=1)
    subject = first_frame.copy()
    subject[:] = 0
    subject[8:24, 8:24] = 255
    studio.animate(first_frame, {"wave": 1.0}, frames=4, steps=1, regions={"wave": subject})
