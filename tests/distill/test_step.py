"""The teacher's distillation target: one step (the paper) and several DDIM steps (`--teacher_steps`),
against diffusers' own DDIM scheduler as the reference; NFSD's target at the configured scale; and which
samples the discriminator conditions on the real image (`--disc_image_condition`)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from turbokit.distill import losses
from turbokit.distill.config import DistillConfig
from turbokit.distill.discriminator import Discriminator
from turbokit.distill.step import StepBatch, StepModels, blind_image_condition, nfsd_target_x0, teacher_x0
from turbokit.distill.trainer import train
from turbokit.errors import TurbokitError
from turbokit.families import Conditioning


class ToyTeacher(nn.Module):
    """An ε-predictor that depends non-linearly on x, t and the text, so that every step matters."""

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        eps = torch.tanh(x) * (1 + t.view(-1, 1, 1, 1) / 1000) + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1)
        return (eps,)


def models_and_batch(scheduler: DDIMScheduler) -> tuple[StepModels, StepBatch]:
    cond, uncond = Conditioning(torch.full((2, 3, 4), 0.2)), Conditioning(torch.zeros(2, 3, 4))
    models = StepModels(
        student=nn.Identity(),
        teacher=ToyTeacher(),
        vae=nn.Identity(),
        disc=nn.Identity(),
        alphas_cumprod=scheduler.alphas_cumprod,
        prediction_type="epsilon",
        scaling_factor=1.0,
        student_prediction_type="epsilon",
    )
    return models, StepBatch(torch.zeros(2, 4, 8, 8), None, cond, uncond, {}, {})


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_several_teacher_steps_are_diffusers_ddim_from_t(guidance):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    scheduler.set_timesteps(3)  # 1000 // 3 = 333 apart: from 999, the steps visit 999, 666, 333
    models, batch = models_and_batch(scheduler)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])

    x = x_t
    for step in (999, 666, 333):
        ts = torch.tensor([step, step])
        cond_eps = models.teacher(x, ts, batch.cond.embeds)[0]
        uncond_eps = models.teacher(x, ts, batch.uncond.embeds)[0]
        out = scheduler.step(uncond_eps + guidance * (cond_eps - uncond_eps), step, x, eta=0.0)
        x = out.prev_sample
    reference = out.pred_original_sample

    ours = teacher_x0(x_t, t, batch, models, torch.full((2,), guidance), steps=3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    one_step = teacher_x0(x_t, t, batch, models, torch.full((2,), guidance), steps=1)
    assert (one_step - reference).abs().max() > 0.1  # the extra steps change the target


def test_each_sample_runs_from_its_own_t():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    models, batch = models_and_batch(scheduler)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    guidance = torch.ones(2)
    both = teacher_x0(x_t, torch.tensor([999, 400]), batch, models, guidance, steps=2)
    second = StepBatch(batch.x0[1:], None, batch.cond[1:], batch.uncond[1:], {}, {})
    alone = teacher_x0(x_t[1:], torch.tensor([400]), second, models, guidance[1:], steps=2)
    torch.testing.assert_close(both[1:], alone)


def test_teacher_steps_are_checked():
    base = {"teacher": "t", "data": "d", "output_dir": "o", "method": "ladd"}
    with pytest.raises(TurbokitError, match="at least 1"):
        DistillConfig(**base, teacher_steps=0).validate()
    with pytest.raises(TurbokitError, match="nfsd"):
        DistillConfig(**base, teacher_steps=4, distill_weighting="nfsd").validate()
    DistillConfig(**base, teacher_steps=4).validate()


@pytest.mark.parametrize("scale", [3.0, 7.5])
def test_nfsd_target_uses_the_configured_scale(scale):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    models, batch = models_and_batch(scheduler)
    batch.negative, batch.negative_unet_kwargs = Conditioning(torch.full((2, 3, 4), -0.5)), {}
    gen = torch.Generator().manual_seed(2)
    x_hat, x_t, t = (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.tensor([500, 100]),
    )

    alpha, sigma = (
        c.view(-1, 1, 1, 1) for c in (scheduler.alphas_cumprod[t].sqrt(), (1 - scheduler.alphas_cumprod[t]).sqrt())
    )
    eps = {
        k: models.teacher(x_t, t, c.embeds)[0]
        for k, c in (("y", batch.cond), ("0", batch.uncond), ("n", batch.negative))
    }
    delta_d = torch.stack([eps["0"][0] - eps["n"][0], eps["0"][1]])  # t = 100 < 200: the unconditional ε̂ alone
    expected = x_hat - sigma / alpha * (delta_d + scale * (eps["y"] - eps["0"]))

    torch.testing.assert_close(nfsd_target_x0(x_hat, x_t, t, batch, models, scale), expected, rtol=1e-4, atol=1e-4)


def test_nfsd_scale_defaults_to_the_papers_and_is_checked():
    base = {"teacher": "t", "data": "d", "output_dir": "o", "method": "ladd", "distill_weighting": "nfsd"}
    assert DistillConfig(**base).nfsd_guidance_scale == losses.NFSD_GUIDANCE_SCALE == 7.5
    with pytest.raises(TurbokitError, match="nfsd_guidance_scale"):
        DistillConfig(**base, nfsd_guidance_scale=-1.0).validate()


def test_blind_image_condition_zeroes_only_the_blind_samples_image_embedding():
    text, image = torch.randn(3, 5), torch.randn(3, 7)
    cond = {"features": {}, "heads": {"text_embeds": text, "image_embeds": image}}
    blinded = blind_image_condition(cond, torch.tensor([True, False, True]))
    assert blinded["heads"]["text_embeds"] is text
    assert torch.equal(blinded["heads"]["image_embeds"][1], image[1])
    assert not blinded["heads"]["image_embeds"][[0, 2]].any()
    assert cond["heads"]["image_embeds"] is image  # the caller's condition is left as it was


@pytest.mark.parametrize(
    ("policy", "timesteps", "blind"),
    [("seen", "999", True), ("seen", "249", False), ("all", "999", False)],
)
def test_the_heads_see_the_image_condition_only_where_the_student_saw_the_image(
    add_options, monkeypatch, policy, timesteps, blind
):
    seen: list[torch.Tensor] = []
    original = Discriminator.head_logits

    def spy(self, features, text_embeds, image_embeds=None, noise_level=None):
        seen.append(image_embeds.detach().clone())
        return original(self, features, text_embeds, image_embeds, noise_level)

    monkeypatch.setattr(Discriminator, "head_logits", spy)
    train(DistillConfig(**add_options, student_timesteps=timesteps, disc_image_condition=policy))
    assert len(seen) == 3  # real and fake for the discriminator, fake for the generator
    for embeds in seen:  # pure-noise inputs (zero terminal SNR at 999) are blind; real and fake alike
        assert (not embeds.any()) if blind else bool((embeds != 0).all(dim=1).all())


def test_the_image_condition_policy_is_checked():
    base = {"teacher": "t", "data": "d", "output_dir": "o", "method": "ladd"}
    with pytest.raises(TurbokitError, match="--disc_image_condition seen needs --method add"):
        DistillConfig(**base, disc_image_condition="seen").validate()
    with pytest.raises(TurbokitError, match="all or seen"):
        DistillConfig(**base, disc_image_condition="some").validate()


def test_every_option_with_choices_is_checked_outside_argparse_too():
    base = {"teacher": "t", "data": "d", "output_dir": "o", "method": "ladd"}
    with pytest.raises(TurbokitError, match="--distill_weighting is exponential, sds or nfsd, not 'nfds'"):
        DistillConfig(**base, distill_weighting="nfds").validate()
    with pytest.raises(TurbokitError, match="--report_to is tensorboard, wandb, all or none, not 'tb'"):
        DistillConfig(**base, report_to="tb").validate()
