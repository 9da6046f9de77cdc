"""Samplers that turn a trained denoiser into images, all behind one call signature.

Every sampler is called as

    sampler(denoiser, sde, labels, *, generator, steps=None, guidance=0.0, batch_size=256, device="cpu",
            progress=None, **options) -> SampleResult

and advances the whole set of `len(labels)` images step by step. All randomness (the initial noise and the
noise of every step) is drawn for the whole set from `generator` on the CPU, and the network takes the images
in chunks of `batch_size`, so the chunk size cannot change which noise an image gets.

`SampleResult.nfe` counts denoiser evaluations per image. With classifier-free guidance each evaluation runs
the network twice (conditional and unconditional, in one batch).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from augsvhn.models import NULL_LABEL
from augsvhn.sde import SDE, _batch_view

SAMPLER_NAMES = ("heun", "dpm2m", "pc", "em", "ode")
# Steps of each sampler when none are given. dpm2m: 10 steps matched 25 and 50 in Fréchet distance on a
# well-trained tiny model (docs/benchmarks.md).
DEFAULT_STEPS = {"heun": 18, "dpm2m": 10, "pc": 1000, "em": 1000, "ode": None}

NETWORK_BATCH_MULTIPLE = 32

ProgressFn = Callable[[int], None]


class DenoiserLike(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SampleResult:
    """Images (N, 3, 32, 32) in [-1, 1] on the CPU, and the denoiser evaluations spent per image."""

    images: torch.Tensor
    nfe: int


def shard_generator(seed: int, cluster: int, shard_index: int) -> torch.Generator:
    """Return a CPU generator seeded by (seed, cluster, shard index) alone, through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(cluster), int(shard_index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert images (N, 3, H, W) in [-1, 1] to uint8 (N, H, W, 3), rounding to the nearest level."""
    scaled = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)


class GuidedDenoiser:
    """Evaluate D(x, sigma, label) on the whole image set in chunks, with classifier-free guidance.

    D_guided = D(x, sigma, label) + w (D(x, sigma, label) - D(x, sigma, no label)), Ho and Salimans 2022, eq. (6)
    written for the denoiser; w = 0 is the plain conditional model. Inputs and outputs are float32 on the CPU.

    Args:
        denoiser: a `models.Denoiser` or any callable with its signature.
        labels: (N,) class labels 0-9 of the images, or NULL_LABEL for unconditional images.
        guidance: the weight w (>= 0).
        batch_size: images per network call (a guided call runs 2 x batch_size through the network).
        device: where the network runs.
        bf16: run the network under bfloat16 autocast.
        channels_last: give the network channels-last tensors.
    """

    def __init__(self, denoiser: DenoiserLike, labels: torch.Tensor, guidance: float = 0.0, batch_size: int = 256,
                 device: str | torch.device = "cpu", bf16: bool = False, channels_last: bool = False):
        if guidance < 0 or not math.isfinite(guidance):
            raise ValueError(f"guidance weight must be a finite number >= 0, got {guidance}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.denoiser = denoiser
        self.labels = labels.cpu().long()
        self.guidance = float(guidance)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.bf16 = bf16
        self.channels_last = channels_last
        self.nfe = 0

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _network(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # On the CPU, matrix products of a few rows take another kernel whose last bits differ, so an image's
        # result would depend on the size of its batch. Padding every batch to a multiple of NETWORK_BATCH_MULTIPLE
        # rows (repeating the last image) keeps each image's result the same for any batch size.
        n = len(x)
        padding = -n % NETWORK_BATCH_MULTIPLE
        if padding:
            x = torch.cat([x, x[-1:].expand(padding, *x.shape[1:])])
            sigma = torch.cat([sigma, sigma[-1:].expand(padding)])
            labels = torch.cat([labels, labels[-1:].expand(padding)])
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.denoiser(x, sigma.to(self.device), labels.to(self.device))
        return out[:n].float().cpu()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Denoise x (N, C, H, W) at per-image noise levels sigma (N,) in the VE-equivalent scaling."""
        self.nfe += 1
        out = torch.empty_like(x)
        for start in range(0, len(x), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            labels = self.labels[chunk]
            if self.guidance == 0:
                out[chunk] = self._network(x[chunk], sigma[chunk], labels)
                continue
            n = len(labels)
            both = self._network(
                torch.cat([x[chunk], x[chunk]]),
                torch.cat([sigma[chunk], sigma[chunk]]),
                torch.cat([labels, torch.full_like(labels, NULL_LABEL)]),
            )
            conditional, unconditional = both[:n], both[n:]
            out[chunk] = conditional + self.guidance * (conditional - unconditional)
        return out


def _score(model: GuidedDenoiser, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """Score of p_t at x, from the denoiser: (alpha D(x / alpha, std / alpha) - x) / std^2."""
    t_vec = torch.full((len(x),), t, dtype=torch.float64)
    alpha = float(sde.alpha(t_vec)[0])
    std = float(sde.std(t_vec)[0])
    denoised = model(x / alpha, torch.full((len(x),), std / alpha, dtype=torch.float32))
    return (alpha * denoised - x) / std**2


def _denoise_final(model: GuidedDenoiser, sde: SDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """Return E[x0 | x(t)] (Tweedie's formula) as the last step: the denoised mean, no noise added."""
    t_vec = torch.full((len(x),), t, dtype=torch.float64)
    alpha = float(sde.alpha(t_vec)[0])
    sigma = float(sde.ve_sigma(t_vec)[0])
    return model(x / alpha, torch.full((len(x),), sigma, dtype=torch.float32))


def _sde_coefficients(sde: SDE, x: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
    t_vec = torch.full((len(x),), t, dtype=torch.float64)
    return sde.drift(x, t_vec.float()), float(sde.diffusion(t_vec)[0])


def _image_shape(labels: torch.Tensor) -> tuple[int, int, int, int]:
    return (len(labels), 3, 32, 32)


def _check_steps(name: str, steps: int | None, minimum: int = 1) -> int:
    steps = DEFAULT_STEPS[name] if steps is None else int(steps)
    if steps < minimum:
        raise ValueError(f"sampler {name!r} needs steps >= {minimum}, got {steps}")
    return steps


def _report(progress: ProgressFn | None, model: GuidedDenoiser) -> None:
    if progress is not None:
        progress(model.nfe)


def euler_maruyama(denoiser, sde: SDE, labels: torch.Tensor, *, generator: torch.Generator,
                   steps: int | None = None, guidance: float = 0.0, batch_size: int = 256,
                   device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                   bf16: bool = False, channels_last: bool = False) -> SampleResult:
    """Euler-Maruyama on the reverse-time SDE dx = [f - g^2 score] dt + g dw (Song et al. 2021, eq. (6)).

    `steps` uniform time steps from T to eps, then one denoising evaluation: NFE = steps + 1.
    """
    steps = _check_steps("em", steps)
    model = GuidedDenoiser(denoiser, labels, guidance, batch_size, device, bf16, channels_last)
    x = sde.prior_sampling(_image_shape(labels), generator)
    times = np.linspace(sde.T, sde.eps, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t - t_next
        drift, diffusion = _sde_coefficients(sde, x, t)
        x_mean = x - (drift - diffusion**2 * _score(model, sde, x, t)) * dt
        x = x_mean + diffusion * math.sqrt(dt) * torch.randn(x.shape, generator=generator)
        _report(progress, model)
    x = _denoise_final(model, sde, x, times[-1])
    _report(progress, model)
    return SampleResult(x.clamp(-1, 1), model.nfe)


def predictor_corrector(denoiser, sde: SDE, labels: torch.Tensor, *, generator: torch.Generator,
                        steps: int | None = None, guidance: float = 0.0, batch_size: int = 256,
                        device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                        snr: float = 0.16, corrector_steps: int = 1, bf16: bool = False,
                        channels_last: bool = False) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2 and 3).

    Predictor: reverse diffusion (the reverse SDE discretised like the forward one, Song et al. 2021, eq. (46)).
    Corrector: `corrector_steps` Langevin steps whose size makes the signal-to-noise ratio ||eps z|| / ||score||
    equal `snr` (0.16 is the paper's CIFAR-10 value). NFE = steps * (1 + corrector_steps) + 1.
    """
    steps = _check_steps("pc", steps)
    if snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    model = GuidedDenoiser(denoiser, labels, guidance, batch_size, device, bf16, channels_last)
    x = sde.prior_sampling(_image_shape(labels), generator)
    times = np.linspace(sde.T, sde.eps, steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        # Langevin corrector at time t.
        for _ in range(corrector_steps):
            score = _score(model, sde, x, t)
            noise = torch.randn(x.shape, generator=generator)
            score_norm = score.flatten(1).norm(dim=1)
            noise_norm = noise.flatten(1).norm(dim=1)
            # Song et al. scale the step by the discrete alpha_i = 1 - beta_i / N of the VP SDE, within
            # beta_max / N of 1 at the step counts used here, so the scale is taken as 1 for every SDE.
            step_size = 2 * (snr * noise_norm / score_norm.clamp_min(1e-12)) ** 2  # (N,)
            x = x + _batch_view(step_size, x) * score + _batch_view((2 * step_size).sqrt(), x) * noise

        # Reverse-diffusion predictor from t to t_next.
        dt = t - t_next
        drift, diffusion = _sde_coefficients(sde, x, t)
        x_mean = x - (drift * dt - diffusion**2 * dt * _score(model, sde, x, t))
        x = x_mean + diffusion * math.sqrt(dt) * torch.randn(x.shape, generator=generator)
        _report(progress, model)
    x = _denoise_final(model, sde, x, times[-1])
    _report(progress, model)
    return SampleResult(x.clamp(-1, 1), model.nfe)


def probability_flow_ode(denoiser, sde: SDE, labels: torch.Tensor, *, generator: torch.Generator,
                         steps: int | None = None, guidance: float = 0.0, batch_size: int = 256,
                         device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                         rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45", bf16: bool = False,
                         channels_last: bool = False) -> SampleResult:
    """Solve the probability-flow ODE dx/dt = f - g^2 score / 2 (Song et al. 2021, eq. (13)) from T to eps.

    An adaptive Runge-Kutta solver (scipy's solve_ivp, Dormand-Prince RK45 by default) picks the steps for the
    whole image set at the given tolerances; `steps` is ignored. NFE = the solver's evaluations + 1.
    """
    from scipy.integrate import solve_ivp

    model = GuidedDenoiser(denoiser, labels, guidance, batch_size, device, bf16, channels_last)
    shape = _image_shape(labels)
    x = sde.prior_sampling(shape, generator)

    def ode_function(t: float, y: np.ndarray) -> np.ndarray:
        x_t = torch.from_numpy(y.astype(np.float32)).reshape(shape)
        drift, diffusion = _sde_coefficients(sde, x_t, t)
        velocity = drift - 0.5 * diffusion**2 * _score(model, sde, x_t, t)
        _report(progress, model)
        return velocity.double().numpy().reshape(-1)

    solution = solve_ivp(ode_function, (sde.T, sde.eps), x.double().numpy().reshape(-1),
                         rtol=rtol, atol=atol, method=method)
    if not solution.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {solution.message}")
    x = torch.from_numpy(solution.y[:, -1].astype(np.float32)).reshape(shape)
    x = _denoise_final(model, sde, x, sde.eps)
    _report(progress, model)
    return SampleResult(x.clamp(-1, 1), model.nfe)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Noise levels of Karras et al. 2022, eq. (5): `steps` levels from sigma_max to sigma_min, then 0 (float64)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inverse_min, inverse_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inverse_max + ramp * (inverse_min - inverse_max)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _ve_start(sde: SDE, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """Draw x(T) from the prior and return it in the VE-equivalent scaling with the SDE's sigma range."""
    x = sde.prior_sampling(_image_shape(labels), generator)
    ends = torch.tensor([sde.T, sde.eps], dtype=torch.float64)
    alpha_T = float(sde.alpha(ends)[0])
    sigma_max, sigma_min = (float(value) for value in sde.ve_sigma(ends))
    return x / alpha_T, sigma_min, sigma_max


def heun(denoiser, sde: SDE, labels: torch.Tensor, *, generator: torch.Generator,
         steps: int | None = None, guidance: float = 0.0, batch_size: int = 256,
         device: str | torch.device = "cpu", progress: ProgressFn | None = None, rho: float = 7.0,
         bf16: bool = False, channels_last: bool = False) -> SampleResult:
    """Heun's second-order solver of the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    Works in the VE-equivalent scaling, dx/dsigma = (x - D(x, sigma)) / sigma, on `steps` noise levels of
    eq. (5) between the SDE's ve_sigma(T) and ve_sigma(eps), then 0. The last step to sigma = 0 is an Euler step,
    which returns D: NFE = 2 * steps - 1.
    """
    steps = _check_steps("heun", steps)
    model = GuidedDenoiser(denoiser, labels, guidance, batch_size, device, bf16, channels_last)
    x, sigma_min, sigma_max = _ve_start(sde, labels, generator)
    sigmas = karras_sigmas(sigma_min, sigma_max, steps, rho)
    n = len(labels)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        # Euler step.
        slope = (x - model(x, torch.full((n,), sigma))) / sigma
        x_next = x + (sigma_next - sigma) * slope

        # Second-order correction, except on the last step to sigma = 0.
        if sigma_next > 0:
            slope_next = (x_next - model(x_next, torch.full((n,), sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        x = x_next
        _report(progress, model)
    return SampleResult(x.clamp(-1, 1), model.nfe)


def dpm_solver_2m(denoiser, sde: SDE, labels: torch.Tensor, *, generator: torch.Generator,
                  steps: int | None = None, guidance: float = 0.0, batch_size: int = 256,
                  device: str | torch.device = "cpu", progress: ProgressFn | None = None, rho: float = 7.0,
                  bf16: bool = False, channels_last: bool = False) -> SampleResult:
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022, Algorithm 2).

    In the VE-equivalent scaling (alpha = 1, lambda = -log sigma) a first-order step from sigma to sigma' is
    x' = (sigma' / sigma) x + (1 - sigma' / sigma) D; the 2M step replaces D by
    (1 + 1 / (2 r)) D_i - D_{i-1} / (2 r), r = h_{i-1} / h_i. Karras noise levels; NFE = steps.
    """
    steps = _check_steps("dpm2m", steps)
    model = GuidedDenoiser(denoiser, labels, guidance, batch_size, device, bf16, channels_last)
    x, sigma_min, sigma_max = _ve_start(sde, labels, generator)
    sigmas = karras_sigmas(sigma_min, sigma_max, steps, rho)
    n = len(labels)
    previous_denoised, previous_h = None, None
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        denoised = model(x, torch.full((n,), sigma))
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if previous_denoised is not None:
                r = previous_h / h
                estimate = (1 + 1 / (2 * r)) * denoised - previous_denoised / (2 * r)
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * estimate
            previous_h = h
        previous_denoised = denoised
        _report(progress, model)
    return SampleResult(x.clamp(-1, 1), model.nfe)


_SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "heun": heun,
    "dpm2m": dpm_solver_2m,
    "pc": predictor_corrector,
    "em": euler_maruyama,
    "ode": probability_flow_ode,
}
assert tuple(_SAMPLERS) == SAMPLER_NAMES


def get_sampler(name: str) -> Callable[..., SampleResult]:
    """Return the sampler function of a name in SAMPLER_NAMES."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return _SAMPLERS[name]


def expected_nfe(name: str, steps: int | None) -> int | None:
    """Denoiser evaluations per image of a sampler at `steps`, or None where the solver chooses (ode)."""
    steps = DEFAULT_STEPS[name] if steps is None else steps
    return {"heun": lambda s: 2 * s - 1, "dpm2m": lambda s: s, "pc": lambda s: 2 * s + 1,
            "em": lambda s: s + 1, "ode": lambda s: None}[name](steps)


# ---- fast paths ------------------------------------------------------------------------------------------------

# Images per network call on the CPU for `batch_size="auto"`. A CPU runs a convolution at about the same speed
# for any batch above a few dozen images, so a moderate fixed value keeps the memory low.
# NOTE: not tuned per machine; on one loaded AMD EPYC core the tiny model ran 12-17 images/s at 32 to 256 images.
CPU_AUTO_BATCH_SIZE = 256
MAX_AUTO_BATCH_SIZE = 8192
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16_instructions(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Return whether the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16).

    Reads the flags of /proc/cpuinfo, so it is False where that file is missing (macOS, Windows). Without these
    instructions bfloat16 autocast on the CPU emulates the products and is slower than float32.
    """
    try:
        with open(cpuinfo_path, encoding="utf-8") as file:
            for line in file:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        return False
    return False


def default_bf16(device: str | torch.device) -> bool:
    """Return whether bfloat16 autocast is on by default: on CUDA devices that support it, off on the CPU.

    The CPU default stays float32 so that shards made on different CPUs agree. Where `cpu_has_bf16_instructions()`
    is True, `--bf16` is faster: it doubled the tiny model's training speed on an AMD EPYC (docs/benchmarks.md).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def auto_batch_size(denoiser: DenoiserLike, device: str | torch.device, guidance: float = 0.0, bf16: bool = False,
                    channels_last: bool = False, memory_fraction: float = 0.8, probe_batch: int = 64) -> int:
    """Return the images per network call for `batch_size="auto"`.

    On the CPU this is CPU_AUTO_BATCH_SIZE. On CUDA, one guided network call on `probe_batch` images measures the
    peak memory per image, and the batch is the largest multiple of NETWORK_BATCH_MULTIPLE whose estimated peak
    fits `memory_fraction` of the free device memory, between NETWORK_BATCH_MULTIPLE and MAX_AUTO_BATCH_SIZE.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_AUTO_BATCH_SIZE
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")

    # One network call on a probe batch, measured from the current allocation.
    labels = torch.zeros(probe_batch, dtype=torch.long)
    model = GuidedDenoiser(denoiser, labels, guidance, probe_batch, device, bf16, channels_last)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    model(torch.zeros(probe_batch, 3, 32, 32), torch.ones(probe_batch))
    torch.cuda.synchronize(device)
    bytes_per_image = max((torch.cuda.max_memory_allocated(device) - baseline) / probe_batch, 1.0)

    # Largest multiple of NETWORK_BATCH_MULTIPLE that fits.
    free_bytes, _ = torch.cuda.mem_get_info(device)
    fitting = int(memory_fraction * free_bytes / bytes_per_image)
    batch = fitting // NETWORK_BATCH_MULTIPLE * NETWORK_BATCH_MULTIPLE
    return int(min(max(batch, NETWORK_BATCH_MULTIPLE), MAX_AUTO_BATCH_SIZE))


def resolve_batch_size(value: int | str, denoiser: DenoiserLike, device: str | torch.device, guidance: float = 0.0,
                       bf16: bool = False, channels_last: bool = False) -> int:
    """Turn a batch size option (a positive int, or "auto") into images per network call."""
    if value == "auto":
        return auto_batch_size(denoiser, device, guidance, bf16, channels_last)
    try:
        batch_size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}") from None
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}")
    return batch_size


def prepare_denoiser(denoiser: torch.nn.Module, channels_last: bool = False, compile_network: bool = False) -> torch.nn.Module:
    """Return the denoiser ready for fast sampling: channels-last weights and, optionally, torch.compile.

    torch.compile (PyTorch 2) traces the network on its first call, which takes tens of seconds on a CPU and
    needs a C++ compiler there; it pays off only for long sampling runs. The compiled module returns the same
    values as the eager one up to float rounding.
    """
    if channels_last:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    if compile_network:
        denoiser = torch.compile(denoiser)
    return denoiser
