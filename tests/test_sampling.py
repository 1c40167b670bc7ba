"""The sampling maths against diffusers' schedulers and the rules of issue 2 §3."""

from __future__ import annotations

import pytest
import torch
from diffusers.schedulers import EulerDiscreteScheduler

from turbokit import sampling
from turbokit.configs import turbo_config_dir
from turbokit.errors import InvalidRequestError


@pytest.fixture(scope="module")
def scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_pretrained(turbo_config_dir("sd2"), subfolder="scheduler")


def test_trailing_timesteps_are_the_turbo_ones():
    assert sampling.trailing_timesteps(1).tolist() == [999]
    assert sampling.trailing_timesteps(4).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 25, 50])
def test_schedule_equals_diffusers(scheduler, steps):
    scheduler.set_timesteps(steps)
    timesteps = sampling.trailing_timesteps(steps)
    assert torch.equal(timesteps, scheduler.timesteps)
    torch.testing.assert_close(sampling.sigmas_at(timesteps, scheduler.alphas_cumprod), scheduler.sigmas)


def test_invalid_step_counts_are_user_errors():
    for steps in (0, -1, 1001):
        with pytest.raises(InvalidRequestError, match="steps must be between 1 and 1000"):
            sampling.trailing_timesteps(steps)


@pytest.mark.parametrize(
    ("steps", "strength", "run"), [(2, 0.5, 1), (4, 0.5, 2), (4, 0.75, 3), (1, 1.0, 1), (3, 0.34, 1)]
)
def test_img2img_runs_int_steps_times_strength(steps, strength, run):
    assert sampling.img2img_steps(steps, strength) == run


def test_img2img_pair_that_runs_nothing_states_the_rule_and_a_valid_pair():
    with pytest.raises(InvalidRequestError) as err:
        sampling.img2img_steps(1, 0.5)
    message = str(err.value)
    assert "int(steps × strength)" in message
    assert "steps 2 (or more) with strength 0.5" in message  # a valid pair for the same strength
    assert sampling.img2img_steps(2, 0.5) == 1
    with pytest.raises(InvalidRequestError) as err:
        sampling.img2img_steps(4, 0.1)
    assert "steps 10 (or more)" in str(err.value) and "strength 0.25 (or more)" in str(err.value)


def test_vanishing_strength_is_a_user_error_not_an_overflow():
    with pytest.raises(InvalidRequestError, match="too small"):
        sampling.img2img_steps(4, 5e-324)


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5])
def test_strength_outside_unit_interval_is_refused(strength):
    with pytest.raises(InvalidRequestError, match=r"strength must be in \(0, 1\]"):
        sampling.img2img_steps(4, strength)


def test_euler_step_from_epsilon_matches_hand_computation():
    x, eps = torch.tensor([2.0]), torch.tensor([0.5])
    sigma, sigma_next = torch.tensor(4.0), torch.tensor(1.0)
    denoised = sampling.to_denoised(x, eps, sigma, "epsilon")  # 2 − 4·0.5 = 0
    assert denoised.item() == 0.0
    # d = (x − x₀)/σ = 0.5; x + d·(σ_next − σ) = 2 + 0.5·(−3) = 0.5
    assert sampling.euler_step(x, denoised, sigma, sigma_next).item() == 0.5
    assert sampling.scale_input(x, torch.tensor(0.0)).item() == 2.0


def test_ancestral_sigmas_preserve_the_marginal_variance():
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(1.5)
    down, up = sampling.ancestral_sigmas(sigma, sigma_next)
    torch.testing.assert_close(down**2 + up**2, sigma_next**2)
    assert sampling.ancestral_sigmas(sigma, torch.tensor(0.0)) == (0.0, 0.0)


def test_noise_rows_depend_only_on_their_own_generator():
    g = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = sampling.noise((3, 4, 8, 8), g, torch.device("cpu"), torch.float32)
    alone = sampling.noise((1, 4, 8, 8), [torch.Generator().manual_seed(6)], torch.device("cpu"), torch.float32)
    assert torch.equal(batch[1:2], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_is_diffusers_noise(dtype):
    """Same seeds, same noise as diffusers' pipelines draw: images match theirs seed for seed."""
    from diffusers.utils.torch_utils import randn_tensor

    ours = sampling.noise((2, 4, 6, 6), [torch.Generator().manual_seed(s) for s in (1, 2)], torch.device("cpu"), dtype)
    theirs = randn_tensor((2, 4, 6, 6), generator=[torch.Generator().manual_seed(s) for s in (1, 2)], dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_vp_form_inverts_forward_diffusion(scheduler):
    t = torch.tensor([0, 249, 999])
    alpha, sigma = sampling.vp_coefficients(scheduler.alphas_cumprod, t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x_t = sampling.add_noise_vp(x0, eps, alpha, sigma)
    torch.testing.assert_close(sampling.x0_from_output_vp(x_t, eps, alpha, sigma, "epsilon"), x0, atol=1e-3, rtol=1e-3)
    v = alpha * eps - sigma * x0
    torch.testing.assert_close(
        sampling.x0_from_output_vp(x_t, v, alpha, sigma, "v_prediction"), x0, atol=1e-4, rtol=1e-4
    )
