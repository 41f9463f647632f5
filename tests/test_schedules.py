import math

import numpy as np
import pytest
import scipy.fft
import torch

from miva.schedules import (
    adain,
    dct,
    dct3d,
    dct_init,
    idct,
    idct3d,
    mask_dropout_probability,
    shared_noise,
    spatial_lowpass_mask,
)


def _dct2(x: torch.Tensor) -> torch.Tensor:
    return dct(dct(x, -2), -1)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape,dim", [((3, 7, 5), 1), ((4, 8), -1), ((9, 2, 6), 0), ((1, 1, 16), 2)])
def test_dct_matches_scipy(dtype, tol, shape, dim):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    x = torch.from_numpy(a)
    ref = scipy.fft.dct(a, type=2, norm="ortho", axis=dim)
    np.testing.assert_allclose(dct(x, dim).numpy(), ref, atol=tol, rtol=0)
    np.testing.assert_allclose(idct(torch.from_numpy(ref), dim).numpy(), a, atol=tol, rtol=0)
    assert dct(x, dim).dtype == x.dtype


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_dct3d_matches_scipy_dctn_and_round_trips(dtype, tol):
    a = np.random.default_rng(1).standard_normal((2, 3, 5, 8, 7)).astype(dtype)
    x = torch.from_numpy(a)
    y = dct3d(x)
    np.testing.assert_allclose(y.numpy(), scipy.fft.dctn(a, type=2, norm="ortho", axes=(-3, -2, -1)), atol=tol, rtol=0)
    torch.testing.assert_close(idct3d(y), x, atol=tol, rtol=0)
    # orthonormal: energy preserved
    assert y.pow(2).sum().item() == pytest.approx(x.pow(2).sum().item(), rel=1e-5)


def test_dct_single_dim_round_trip_and_energy():
    x = torch.randn(4, 11, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(idct(dct(x, 1), 1), x, atol=1e-5, rtol=0)
    assert dct(x, 1).norm().item() == pytest.approx(x.norm().item(), rel=1e-5)


def test_spatial_lowpass_mask():
    m = spatial_lowpass_mask(4, 64, 64, cutoff=0.23)
    assert m.shape == (4, 64, 64) and m.dtype == torch.float32
    assert m[:, 0, 0].eq(1).all()  # DC kept
    assert m[:, -1, -1].eq(0).all()  # highest frequency removed
    assert m[:, 14, 0].eq(1).all() and m[:, 15, 0].eq(0).all()  # 14/64 = 0.219 <= 0.23 < 15/64
    assert (m == m[:1]).all()  # constant along F
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0].mean().item() == pytest.approx(math.pi * 0.23**2 / 4, rel=0.1)
    only_dc = spatial_lowpass_mask(2, 8, 8, cutoff=1e-6)
    assert only_dc.sum().item() == 2 and only_dc[:, 0, 0].eq(1).all()
    assert spatial_lowpass_mask(1, 5, 6, cutoff=math.sqrt(2)).eq(1).all()


@pytest.mark.parametrize("cutoff", [0.0, -0.1, 1.5])
def test_spatial_lowpass_mask_validates_cutoff(cutoff):
    with pytest.raises(ValueError):
        spatial_lowpass_mask(2, 8, 8, cutoff=cutoff)


def test_shared_noise_first_frame_and_formula():
    shape, ratio = (2, 3, 5, 4, 6), 0.3
    out = shared_noise(shape, ratio=ratio, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, 0], eps[:, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(out[:, :, 1:], ratio * eps[:, :, :1] + (1 - ratio) * eps[:, :, 1:])


def test_shared_noise_seeded():
    shape = (1, 4, 3, 8, 8)
    a = shared_noise(shape, generator=torch.Generator().manual_seed(0))
    b = shared_noise(shape, generator=torch.Generator().manual_seed(0))
    c = shared_noise(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert shared_noise(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).dtype == torch.float64


@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_shared_noise_correlation(ratio):
    out = shared_noise((4, 4, 3, 64, 64), ratio=ratio, generator=torch.Generator().manual_seed(3))
    x0, x2 = out[:, :, 0].flatten(), out[:, :, 2].flatten()
    corr = torch.corrcoef(torch.stack([x0, x2]))[0, 1].item()
    assert corr == pytest.approx(ratio / math.sqrt(ratio**2 + (1 - ratio) ** 2), abs=0.02)


@pytest.mark.parametrize("ratio", [-0.01, 1.01])
def test_shared_noise_validates_ratio(ratio):
    with pytest.raises(ValueError):
        shared_noise((1, 1, 2, 2, 2), ratio=ratio)


def _dct_init_inputs(seed=0, shape=(2, 4, 6, 16, 12)):
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = shape
    first = torch.randn(b, c, h, w, generator=g)
    noise = shared_noise(shape, ratio=0.1, generator=g)
    return first, noise


def _x_t(first, noise, alpha_bar):
    f = noise.shape[2]
    static = first[:, :, None].expand(-1, -1, f, -1, -1)
    eps1 = noise[:, :, :1].expand(-1, -1, f, -1, -1)
    return math.sqrt(alpha_bar) * static + math.sqrt(1 - alpha_bar) * eps1


def test_dct_init_shape_dtype_and_first_frame():
    first, noise = _dct_init_inputs()
    z = dct_init(first, noise, alpha_bar_t=0.05)
    assert z.shape == noise.shape and z.dtype == noise.dtype
    assert torch.equal(z[:, :, 0], first)
    z64 = dct_init(first.double(), noise.double(), alpha_bar_t=0.05)
    assert z64.dtype == torch.float64


def test_dct_init_low_frequencies_come_from_x_t():
    first, noise = _dct_init_inputs(1)
    alpha_bar, cutoff = 0.3, 0.23
    z = dct_init(first, noise, alpha_bar_t=alpha_bar, cutoff=cutoff)
    f, h, w = noise.shape[2:]
    mask = spatial_lowpass_mask(f, h, w, cutoff)[1:].bool()  # (f-1, h, w)
    assert 1 < mask[0].sum() < h * w
    zf, xf, nf = _dct2(z[:, :, 1:]), _dct2(_x_t(first, noise, alpha_bar)[:, :, 1:]), _dct2(noise[:, :, 1:])
    torch.testing.assert_close(zf[..., mask], xf[..., mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(zf[..., ~mask], nf[..., ~mask], atol=1e-4, rtol=0)
    assert not torch.allclose(zf[..., mask], nf[..., mask], atol=1e-2)
    # the literal 3-D form of Algorithm 1 gives the same frames >= 1
    full = spatial_lowpass_mask(f, h, w, cutoff)
    x_t = _x_t(first, noise, alpha_bar)
    expected = idct3d(dct3d(x_t) * full + dct3d(noise) * (1 - full))
    torch.testing.assert_close(z[:, :, 1:], expected[:, :, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(dct3d(expected)[..., full.bool()], dct3d(x_t)[..., full.bool()], atol=1e-4, rtol=0)


def test_dct_init_tiny_cutoff_keeps_only_dc():
    first, noise = _dct_init_inputs(2)
    z = dct_init(first, noise, alpha_bar_t=0.5, cutoff=1e-6)
    zf, nf = _dct2(z[:, :, 1:]), _dct2(noise[:, :, 1:])
    xf = _dct2(_x_t(first, noise, 0.5)[:, :, 1:])
    torch.testing.assert_close(zf[..., 0, 0], xf[..., 0, 0], atol=1e-4, rtol=0)
    zf[..., 0, 0] = nf[..., 0, 0]
    torch.testing.assert_close(zf, nf, atol=1e-4, rtol=0)


def test_dct_init_validates_shapes():
    first, noise = _dct_init_inputs()
    with pytest.raises(ValueError):
        dct_init(first[..., :-1], noise, alpha_bar_t=0.1)
    with pytest.raises(ValueError):
        dct_init(first, noise, alpha_bar_t=1.5)


def test_adain_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, 8, generator=g) * torch.rand(1, 1, 5, 1, 1, generator=g) * 3 + torch.randn(2, 3, 5, 1, 1, generator=g)
    out = adain(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    mean, std = out.mean(dim=(-2, -1)), out.std(dim=(-2, -1))  # (b, c, f)
    torch.testing.assert_close(mean, mean[:, :, :1].expand_as(mean), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, std[:, :, :1].expand_as(std), atol=1e-4, rtol=0)
    assert not torch.allclose(x.std(dim=(-2, -1)), x.std(dim=(-2, -1))[:, :, :1].expand(-1, -1, 5), atol=1e-2)


def test_adain_other_reference():
    x = torch.randn(1, 2, 4, 6, 6, generator=torch.Generator().manual_seed(1)) * 2
    out = adain(x, reference_index=2)
    assert torch.equal(out[:, :, 2], x[:, :, 2])
    torch.testing.assert_close(out.mean(dim=(-2, -1)), x[:, :, 2:3].mean(dim=(-2, -1)).expand(-1, -1, 4), atol=1e-4, rtol=0)


def test_mask_dropout_probability():
    assert mask_dropout_probability(0, 1000) == pytest.approx(1.0)
    assert mask_dropout_probability(1000, 1000) == pytest.approx(0.0, abs=1e-12)
    assert mask_dropout_probability(500, 1000) == pytest.approx(0.5)
    assert mask_dropout_probability(250, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    for step, total in [(-1, 10), (11, 10), (0, 0)]:
        with pytest.raises(ValueError):
            mask_dropout_probability(step, total)
