"""The ADD losses against numbers worked out by hand in the comments (Sauer et al. 2023, eq. 1-4, App. A)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turbokit.distill import losses
from turbokit.sampling import add_noise_vp, x0_from_output_vp


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Two heads, batch 2: head A has 2 logits (tokens) per sample, head B one.
REAL = [t([[2.0, 0.5], [-1.0, 1.0]]), t([[0.0], [3.0]])]
FAKE = [t([[-2.0, 0.0], [0.5, -0.5]]), t([[1.0], [-3.0]])]


def test_hinge_discriminator_loss_sums_heads_of_token_means():
    # head A real: relu(1 − [2, .5, −1, 1]) = [0, .5, 2, 0] → mean .625
    # head A fake: relu(1 + [−2, 0, .5, −.5]) = [0, 1, 1.5, .5] → mean .75
    # head B real: relu(1 − [0, 3]) = [1, 0] → .5;  fake: relu(1 + [1, −3]) = [2, 0] → 1
    # total .625 + .75 + .5 + 1 = 2.875
    assert losses.hinge_discriminator_loss(REAL, FAKE).item() == pytest.approx(2.875)


def test_hinge_discriminator_loss_needs_as_many_real_as_fake_heads():
    with pytest.raises(ValueError):
        losses.hinge_discriminator_loss(REAL, FAKE[:1])


def test_hinge_generator_loss_is_minus_the_summed_head_means():
    # head A mean (−2 + 0 + .5 − .5)/4 = −.5; head B mean (1 − 3)/2 = −1 → −(−1.5) = 1.5
    assert losses.hinge_generator_loss(FAKE).item() == pytest.approx(1.5)


def test_discriminator_accuracy_counts_over_all_heads_and_tokens():
    # real > 0: head A 2, .5, 1 (not −1) = 3 of 4; head B 3 (not 0) = 1 of 2 → 4/6
    # fake < 0: head A −2, −.5 (not 0, .5) = 2 of 4; head B −3 = 1 of 2 → 3/6
    real_accuracy, fake_accuracy = losses.discriminator_accuracy(REAL, FAKE)
    assert real_accuracy == pytest.approx(4 / 6)
    assert fake_accuracy == pytest.approx(0.5)


def features(values) -> torch.Tensor:
    """F_k(x0) as the caller hands it to the heads: detached, then requiring grad."""
    return t(values).requires_grad_(True)


def test_r1_of_a_linear_head_is_its_squared_weight_norm():
    # D(f) = w·f has ∂D/∂f = w whatever f is, so R1 = ||w||² = 3² + 4² = 25 for every sample.
    w = t([3.0, 4.0])
    f = features([[1.0, -2.0], [0.5, 7.0]])
    assert losses.r1_penalty([f @ w], [f]).item() == pytest.approx(25.0)


def test_r1_sums_heads_and_tokens_and_averages_the_batch():
    # head 1: linear w = (3, 4) → 25 per sample.
    # head 2: per-token linear w = (1, 2) on 3 tokens: ∂(ΣD)/∂f has the row w on each token
    #         → ||·||² = 3·(1 + 4) = 15 per sample.
    # head 3: D(f) = Σ f², ∂/∂f = 2f → 4||f||²: samples (1, 2) → 20 and (0, 3) → 36, batch mean 28.
    # total 25 + 15 + 28 = 68
    f1 = features([[1.0, -2.0], [0.5, 7.0]])
    f2 = features(torch.arange(12.0).reshape(2, 3, 2).tolist())
    f3 = features([[1.0, 2.0], [0.0, 3.0]])
    logits = [f1 @ t([3.0, 4.0]), f2 @ t([1.0, 2.0]), f3.square().sum(1)]
    assert losses.r1_penalty(logits, [f1, f2, f3]).item() == pytest.approx(68.0)


def test_r1_is_on_the_head_inputs_not_the_pixels():
    # A frozen feature network F(x) = 2x feeds the head D(f) = w·f, w = (3, 4). On the head input
    # R1 = ||w||² = 25; on pixels it would be ||2w||² = 100.
    pixels = t([[0.1, 0.2], [0.3, 0.4]]).requires_grad_(True)
    f = (2 * pixels).detach().requires_grad_(True)
    assert losses.r1_penalty([f @ t([3.0, 4.0])], [f]).item() == pytest.approx(25.0)


def test_r1_scales_quadratically_with_the_head_weights_and_ignores_the_bias():
    head = nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(t([[3.0, 4.0]]))
        head.bias.fill_(5.0)
    f = features([[1.0, -2.0], [0.5, 7.0]])
    assert losses.r1_penalty([head(f)], [f]).item() == pytest.approx(25.0)
    with torch.no_grad():
        head.weight.mul_(3.0)  # ×3 weights → ×9 penalty
        head.bias.fill_(-40.0)  # the bias moves the logits, not their gradient
    assert losses.r1_penalty([head(f)], [f]).item() == pytest.approx(225.0)


def test_r1_is_zero_for_a_head_that_ignores_its_input():
    bias = nn.Parameter(t([1.5]))
    f = features([[1.0, -2.0], [0.5, 7.0]])
    penalty = losses.r1_penalty([bias.expand(2, 1)], [f])
    assert penalty.item() == 0.0


def test_r1_backpropagates_into_the_head():
    # R1 = ||w||² → ∂R1/∂w = 2w = (6, 8): the penalty trains the heads (create_graph=True).
    w = t([3.0, 4.0]).requires_grad_(True)
    f = features([[1.0, -2.0], [0.5, 7.0]])
    losses.r1_penalty([f @ w], [f]).backward()
    torch.testing.assert_close(w.grad, t([6.0, 8.0]))


def test_r1_defaults():
    assert losses.DEFAULT_R1_GAMMA == 1e-5


# (α, σ) pairs on the unit circle: 0.6² + 0.8² = 1 and 0.28² + 0.96² = 1.
ALPHA = t([0.6, 0.28]).view(-1, 1, 1, 1)
SIGMA = t([0.8, 0.96]).view(-1, 1, 1, 1)


def test_exponential_weighting_is_alpha():
    torch.testing.assert_close(losses.distill_weighting("exponential", ALPHA, SIGMA).flatten(), t([0.6, 0.28]))


@pytest.mark.parametrize("name", ["sds", "nfsd"])
def test_sds_and_nfsd_weighting_is_alpha_sigma_over_two(name):
    # c = α/(2σ)·w with w = σ²: 0.6·0.8/2 = 0.24; 0.28·0.96/2 = 0.1344
    torch.testing.assert_close(losses.distill_weighting(name, ALPHA, SIGMA).flatten(), t([0.24, 0.1344]))


def test_unknown_weighting_names_the_valid_ones():
    assert losses.DISTILL_WEIGHTINGS == ("exponential", "sds", "nfsd")
    with pytest.raises(ValueError, match="exponential, sds, nfsd"):
        losses.distill_weighting("uniform", ALPHA, SIGMA)


def test_distillation_loss_weights_per_sample_mean_squared_errors():
    # sample 1: student (1, 2) vs teacher (0, 0) → (1 + 4)/2 = 2.5, c = .5 → 1.25
    # sample 2: student (3, 4) vs teacher (3, 2) → (0 + 4)/2 = 2,   c = 2  → 4
    # batch mean (1.25 + 4)/2 = 2.625
    student = t([1.0, 2.0, 3.0, 4.0]).view(2, 1, 1, 2).requires_grad_(True)
    teacher = t([0.0, 0.0, 3.0, 2.0]).view(2, 1, 1, 2).requires_grad_(True)
    for weight in (t([0.5, 2.0]), t([0.5, 2.0]).view(2, 1, 1, 1)):
        assert losses.distillation_loss(student, teacher, weight).item() == pytest.approx(2.625)
    losses.distillation_loss(student, teacher, t([0.5, 2.0])).backward()
    # ∂/∂x̂ = c·2(x̂ − x̂_ψ)/(N·B) with N = 2, B = 2: sample 1 .5·(1, 2)/2 = (.25, .5); sample 2 2·(0, 2)/2 = (0, 2)
    torch.testing.assert_close(student.grad.flatten(), t([0.25, 0.5, 0.0, 2.0]))
    assert teacher.grad is None  # sg(x̂_ψ)


def test_generator_loss_is_adversarial_plus_lambda_distillation():
    assert losses.DEFAULT_DISTILL_LAMBDA == 2.5
    assert losses.generator_loss(t(0.5), t(0.2)).item() == pytest.approx(0.5 + 2.5 * 0.2)
    assert losses.generator_loss(t(0.5), t(0.2), distill_lambda=1.0).item() == pytest.approx(0.7)


def test_sds_weighting_gives_the_sds_gradient_by_hand():
    # Student x̂ = θ·x_s with θ = 2, x_s = 1 → x̂ = 2. Teacher at α = .6, σ = .8 predicts ε̂ = 1.5
    # whatever its input; ε' = .5. x̂_t = .6·2 + .8·.5 = 1.6; x̂_ψ = (1.6 − .8·1.5)/.6 = 2/3.
    # c = .6·.8/2 = .24; L = .24·(2 − 2/3)² = .24·16/9 = .42667.
    # ∂L/∂θ = .24·2·(4/3)·x_s = .64 = w(t)(ε̂ − ε')∂x̂/∂θ = .8²·(1.5 − .5)·1.
    theta = t(2.0).requires_grad_(True)
    student_x0 = (theta * t(1.0)).view(1, 1, 1, 1)
    alpha, sigma = t(0.6).view(1, 1, 1, 1), t(0.8).view(1, 1, 1, 1)
    x_t = add_noise_vp(student_x0.detach(), t(0.5).view(1, 1, 1, 1), alpha, sigma)
    teacher_x0 = x0_from_output_vp(x_t, t(1.5).view(1, 1, 1, 1), alpha, sigma, "epsilon")
    loss = losses.distillation_loss(student_x0, teacher_x0, losses.distill_weighting("sds", alpha, sigma))
    assert loss.item() == pytest.approx(0.24 * 16 / 9)
    loss.backward()
    assert theta.grad.item() == pytest.approx(0.64)


def test_sds_weighting_gives_the_sds_gradient_on_a_toy_student():
    # Autograd through the loss against the SDS formula (1/(B·N)) Σ w(t)(ε̂_ψ − ε')∂x̂/∂θ, w = σ²,
    # applied as a vector-Jacobian product: the 1/(B·N) is the loss's mean over batch and elements.
    generator = torch.Generator().manual_seed(0)
    batch, shape = 3, (2, 4, 4)
    scale = nn.Parameter(torch.randn(shape, generator=generator))
    shift = nn.Parameter(torch.randn(shape, generator=generator))
    x_s = torch.randn(batch, *shape, generator=generator)
    student_x0 = torch.tanh(scale * x_s + shift)

    abar = t([0.9, 0.5, 0.1]).view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    eps_prime = torch.randn(batch, *shape, generator=generator)
    x_t = add_noise_vp(student_x0.detach(), eps_prime, alpha, sigma)
    eps_hat = 0.5 * torch.sin(3 * x_t) + 0.1 * x_t  # a fixed, non-trivial "teacher"
    teacher_x0 = x0_from_output_vp(x_t, eps_hat, alpha, sigma, "epsilon")

    loss = losses.distillation_loss(student_x0, teacher_x0, losses.distill_weighting("sds", alpha, sigma))
    autograd = torch.autograd.grad(loss, (scale, shift), retain_graph=True)
    sds_residual = sigma**2 * (eps_hat - eps_prime) / (batch * student_x0[0].numel())
    sds = torch.autograd.grad(student_x0, (scale, shift), grad_outputs=sds_residual)
    for got, expected in zip(autograd, sds, strict=True):
        torch.testing.assert_close(got, expected)


def test_nfsd_target_by_hand():
    # x̂ = 2, α = .6, σ = .8, s = 2; teacher ε̂(y) = 1, ε̂(∅) = .5, ε̂(p_neg) = .25 → δ_C = .5.
    # t = 100 (< 200): δ_D = ε̂(∅) = .5 → δ_D + sδ_C = 1.5 → target 2 − (.8/.6)·1.5 = 0
    # t = 500: δ_D = .5 − .25 = .25 → 1.25 → target 2 − (4/3)·1.25 = 1/3
    student_x0 = t([2.0, 2.0]).view(2, 1, 1, 1).requires_grad_(True)
    ones = torch.ones(2, 1, 1, 1)
    alpha, sigma = 0.6 * ones, 0.8 * ones
    target = losses.nfsd_target(
        student_x0, 1.0 * ones, 0.5 * ones, 0.25 * ones, torch.tensor([100, 500]), alpha, sigma, guidance_scale=2.0
    )
    torch.testing.assert_close(target.flatten(), t([0.0, 1 / 3]))
    assert not target.requires_grad  # a target, sg(·)

    # The loss gradient is the NFSD one, w(t)(δ_D + sδ_C)/B with w = σ² = .64:
    # .64·1.5/2 = .48 and .64·1.25/2 = .4
    losses.distillation_loss(student_x0, target, losses.distill_weighting("nfsd", alpha, sigma)).backward()
    torch.testing.assert_close(student_x0.grad.flatten(), t([0.48, 0.4]))


def test_nfsd_switches_to_the_negative_prompt_at_t_200():
    # s = 7.5 by default; ε̂(y) = ε̂(∅) so δ_C = 0; x̂ = 0, α = σ → target = −δ_D.
    # t = 199: δ_D = ε̂(∅) = 1; t = 200: δ_D = 1 − ε̂(p_neg) = 1 − 3 = −2.
    assert losses.NFSD_GUIDANCE_SCALE == 7.5
    ones = torch.ones(2, 1, 1, 1)
    target = losses.nfsd_target(0 * ones, ones, ones, 3 * ones, torch.tensor([199, 200]), 0.5 * ones, 0.5 * ones)
    torch.testing.assert_close(target.flatten(), t([-1.0, 2.0]))
