"""The U-Net and its preconditioned denoiser: shapes, finite values, gradients, conditioning, configs."""

import pytest
import torch

from augsvhn.models import (
    MODEL_SIZES,
    NULL_LABEL,
    build_denoiser,
    count_parameters,
    denoiser_from_config,
    forward_gflops,
)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_denoiser_gradients_reach_every_parameter(size):
    torch.manual_seed(0)
    denoiser = build_denoiser(size)
    # Zero-initialised output layers would block gradients to earlier layers on the first step.
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    x = torch.randn(4, 3, 32, 32)
    out = denoiser(x, torch.tensor([0.01, 0.5, 5.0, 80.0]), torch.tensor([0, 3, 9, NULL_LABEL]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [name for name, p in denoiser.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_untrained_denoiser_is_skip_connection():
    # The U-Net's output layer starts at zero, so D(x, sigma) = c_skip(sigma) x at initialisation.
    denoiser = build_denoiser("tiny")
    x = torch.randn(2, 3, 32, 32)
    sigma = torch.tensor([0.5, 2.0])
    expected = (0.25 / (sigma**2 + 0.25)).reshape(-1, 1, 1, 1) * x
    assert torch.allclose(denoiser(x, sigma, torch.tensor([1, 2])), expected, atol=1e-6)


def test_denoiser_output_depends_on_label():
    torch.manual_seed(0)
    denoiser = build_denoiser("tiny")
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    x = torch.randn(1, 3, 32, 32).expand(3, -1, -1, -1)
    out = denoiser(x, torch.ones(3), torch.tensor([1, 7, NULL_LABEL]))
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_denoiser_config_round_trip():
    denoiser = build_denoiser("small", dropout=0.0)
    rebuilt = denoiser_from_config(denoiser.config())
    assert rebuilt.config() == denoiser.config()
    rebuilt.load_state_dict(denoiser.state_dict())
    assert count_parameters(rebuilt) == count_parameters(denoiser)


def test_model_sizes_grow():
    counts = [count_parameters(build_denoiser(size)) for size in MODEL_SIZES]
    assert counts == sorted(counts)
    assert 0.5e6 < counts[0] < 3e6


def test_forward_gflops_of_tiny_model():
    # A 3x3 convolution of 32 -> 32 channels at 32x32 alone costs 2 * 9 * 32 * 32 * 1024 = 19 MFLOPs.
    gflops = forward_gflops(build_denoiser("tiny"))
    assert 0.1 < gflops < 2.0


def test_build_denoiser_rejects_unknown_size():
    with pytest.raises(ValueError, match="tiny, small, base"):
        build_denoiser("huge")
