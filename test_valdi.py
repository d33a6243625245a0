"""Tests of the Valdi reference implementation: `python -m pytest` (the whole suite runs on CPU).

Sections: valdi.py (the agent), then eval_diagnostics.py, then decoder.py.

Everything here is real: the real CarRacing env, the real networks, real files on disk. Tiny
flags keep the suite fast; the numbers the paper fixes (parameter counts, schedules) are
checked at the paper's defaults."""

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import decoder
import eval_diagnostics as ed
import valdi

HERE = Path(__file__).resolve().parent
if os.environ.get("VALDI_TEST_NO_BF16"):
    # `VALDI_TEST_NO_BF16=1 python -m pytest` runs the suite as a CPU without native bfloat16
    # (AVX2 only) would: torch's capability check answers no, as it does there.
    class _AnswersNo:  # callable like the op, with the .default overload torch.compile looks up
        def __call__(self):
            return False
        default = __call__
    torch.ops.mkldnn._is_mkldnn_bf16_supported = _AnswersNo()
NATIVE_BF16 = valdi.has_native_bf16(torch.device("cpu"))
NO_BF16 = "this CPU has no native bfloat16 arithmetic: bf16 runs are refused here (tested by the no-bf16 tests)"
TINY = ["--total-trajectories", "2", "--seed-trajectories", "1", "--max-episode-steps", "30",
        "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--batch-size", "4",
        "--updates-per-trajectory", "2", "--no-cuda"]


def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """valdi.py as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, str(HERE / "valdi.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def only_run_dir(parent: Path) -> Path:
    (run_dir,) = [p for p in Path(parent).iterdir() if p.is_dir()]
    return run_dir


def one_tiny_run_per_dynamics(tmp_path_factory, flags: list[str], prefix: str) -> dict:
    runs = {}
    for dynamics in valdi.DYNAMICS:
        parent = tmp_path_factory.mktemp(f"{prefix}_{dynamics}")
        assert valdi.main([*flags, "--runs-dir", str(parent), "--dynamics", dynamics]) == 0
        runs[dynamics] = only_run_dir(parent)
    return runs


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """One tiny trained run per dynamics, made through the CLI entry point. Shared by the tests
    of valdi.py and of the companion scripts; tests that modify a run copy it first."""
    return one_tiny_run_per_dynamics(tmp_path_factory, TINY, "runs")


def copy_run(run_dir: Path, parent: Path) -> Path:
    """A private copy of a tiny run, for tests that write into it."""
    return Path(shutil.copytree(run_dir, Path(parent) / run_dir.name))


def tiny_args(**overrides) -> valdi.Args:
    base = dict(max_episode_steps=30, pop_size=16, num_elites=4, cem_iters=2, batch_size=4, cuda=False)
    base.update(overrides)
    return valdi.Args(**base)


def agent_of(model, args, target=None, optimizer=None, device="cpu") -> valdi.Agent:
    """An agent around given networks, with the speed switches of `args` applied as training does."""
    return valdi.speed_up(valdi.Agent(args, torch.device(device), model, target, optimizer))


# ---------------------------------------------------------------------------------------------
# Networks: exact parameter counts of Supp. B
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamics, expected", [
    ("diffusion", {"encoder": 1_052_896, "dynamics": 3_198_387, "reward": 546_049, "value": 592_898,
                   "total": 5_390_230}),
    ("mlp", {"encoder": 1_052_896, "dynamics": 3_603_520, "reward": 546_049, "value": 592_898,
             "total": 5_795_363}),
    # Rectified flow: Valdi's transformer with the 1000 x 32 timestep table replaced by
    # Linear(32, 32), SiLU, Linear(32, 32) on 16 sin/cos frequency pairs (two 32 x 32 + 32).
    ("flow", {"encoder": 1_052_896, "dynamics": 3_198_387 - 1000 * 32 + 2 * (32 * 32 + 32), "reward": 546_049,
              "value": 592_898, "total": 5_390_230 - 1000 * 32 + 2 * (32 * 32 + 32)}),
])
def test_parameter_counts(dynamics, expected):
    model = valdi.WorldModel(valdi.Args(dynamics=dynamics))
    assert valdi.count_parameters(model) == expected


SHIPPED_RUNS = sorted(p.parent.relative_to(HERE / "docs" / "learning-check")
                      for p in (HERE / "docs" / "learning-check").rglob("checkpoint.pt"))


@pytest.mark.parametrize("run", SHIPPED_RUNS, ids=str)
def test_the_checkpoints_in_docs_load_and_plan(run):
    """Every learning-check run shipped in docs/ fits today's networks, name for name, and plans."""
    path = HERE / "docs" / "learning-check" / run
    agent = decoder.load_agent(path)
    args = agent.args
    system = next(s for s in ("valdi", "mlp", "flow") if s in run.parts)
    assert args.dynamics == {"valdi": "diffusion", "mlp": "mlp", "flow": "flow"}[system]
    planned = valdi.plan(agent, torch.zeros(1, args.latent_dim), generator=torch.Generator().manual_seed(0))
    assert planned.shape == (1, args.horizon, 9) and torch.isfinite(planned).all()


SHIPPED_DECODERS = sorted(p.parent.parent.relative_to(HERE / "docs" / "learning-check")
                          for p in (HERE / "docs" / "learning-check").rglob("decoder/decoder.pt"))


@pytest.mark.parametrize("run", SHIPPED_DECODERS, ids=str)
def test_the_decoders_in_docs_are_slim_and_draw_a_real_frame_from_its_latent(run):
    """A fresh clone can play and redraw the figures: each shipped decoder is weights only (no Adam state), and it
    draws a real CarRacing frame, past the opening zoom, from the run's encoding of it far better than an untrained
    decoder does (its validation MSE started near 0.08)."""
    path = HERE / "docs" / "learning-check" / run
    agent = decoder.load_agent(path)
    net, state = decoder.load_decoder(path, torch.device("cpu"), agent.args.latent_dim)
    assert not set(decoder.TRAINING_STATE) & set(state) and (path / "decoder" / "decoder.pt").stat().st_size < 10e6
    env = valdi.make_env(agent.args)
    try:
        obs, _ = env.reset(seed=ed.fixed_track_seeds(1)[0])
        for _ in range(60):  # straight ahead, gently, past the 50-frame zoom
            obs, *_ = env.step(np.array([0.0, 0.2, 0.0], np.float32))
    finally:
        env.close()
    frame = decoder.frames_to_float(torch.from_numpy(obs["rgb"]).unsqueeze(0))
    z = valdi.encode_observation(agent.model, obs, torch.device("cpu"))
    error = lambda net: float(torch.nn.functional.mse_loss(decoder.decode(net, z), frame))
    torch.manual_seed(0)
    assert error(net) < 0.02 < error(decoder.ViTDecoder(agent.args.latent_dim).eval())


def test_encoder_and_transformer_shapes():
    args = valdi.Args()
    model = valdi.WorldModel(args)
    rgb = torch.randint(0, 256, (2, 3, 96, 96, 3), dtype=torch.uint8)
    z = model.encode(rgb, torch.randn(2, 3, 7))
    assert z.shape == (2, 3, 64)
    u = model.dynamics(torch.randn(4, 64), torch.randn(4, 5, 64), torch.randn(4, 5, 9), torch.arange(4))
    assert u.shape == (4, 5, 64)
    # Bidirectional: the first future token's output depends on the last action chunk.
    z0, zn, a = torch.randn(1, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 9)
    a2 = a.clone()
    a2[0, 4] += 1.0
    tau = torch.tensor([500])
    assert not torch.allclose(model.dynamics(z0, zn, a, tau)[0, 0], model.dynamics(z0, zn, a2, tau)[0, 0])


# ---------------------------------------------------------------------------------------------
# Environment (Supp. E) on the real CarRacing
# ---------------------------------------------------------------------------------------------
def test_env_wrapper_observation_and_truncation():
    env = valdi.make_env(tiny_args(max_episode_steps=45))
    obs, _ = env.reset(seed=3)
    assert obs["rgb"].shape == (96, 96, 3) and obs["rgb"].dtype == np.uint8
    assert obs["proprio"].shape == (7,) and obs["proprio"].dtype == np.float32
    steps, truncated, terminated = 0, False, False
    while not (truncated or terminated):
        obs, _, terminated, truncated, _ = env.step(np.array([0.0, 1.0, 0.0], np.float32))  # full gas
        steps += 1
        assert (obs["rgb"][valdi.INDICATOR_BAND_START:] == 0).all(), "indicator band must be blacked out"
        assert obs["rgb"][: valdi.INDICATOR_BAND_START].any(), "the track view must remain"
    assert truncated and not terminated and steps == 45
    env.close()


def hand_readout(frame: np.ndarray) -> list[float]:
    """The band's 7 bars counted pixel by pixel, in plain Python, from the raw uint8 frame."""
    def total(pixels):
        return sum(int(v) for v in pixels) / 255.0
    speed = total(frame[r, 12, 0] for r in range(84, 94)) / 5
    wheels = [total(frame[r, 18 + 2 * i, 2] for r in range(84, 94)) / 5 for i in range(4)]
    steering = (total(frame[88, c, 1] for c in range(48, 58)) - total(frame[88, c, 1] for c in range(38, 48))) / 10
    gyro = (total(frame[88, c, 0] for c in range(72, 86)) - total(frame[88, c, 0] for c in range(58, 72))) / 5
    return [speed, *wheels, steering, gyro]


@pytest.fixture(scope="module")
def band_drive():
    """A real drive that accelerates, brakes, and steers hard left then right: for each step the
    wrapper's proprio, the raw frame it was read from (band intact) and the phase of the drive."""
    env = valdi.make_env(tiny_args(max_episode_steps=200))
    env.reset(seed=5)
    phases = [("gas", [0.0, 1.0, 0.0], 50), ("brake", [0.0, 0.0, 0.8], 20), ("gas2", [0.0, 1.0, 0.0], 20),
              ("left", [-1.0, 0.5, 0.0], 25), ("right", [1.0, 0.5, 0.0], 25)]
    rows = []
    for phase, action, n in phases:
        for _ in range(n):
            obs, _, terminated, truncated, _ = env.step(np.array(action, np.float32))
            rows.append((phase, obs["proprio"], env.unwrapped.state.copy()))  # unwrapped: band intact
            assert not (terminated or truncated)
    env.close()
    return rows


def test_proprio_is_the_band_readout_of_the_raw_frame(band_drive):
    for _, proprio, raw in band_drive:
        np.testing.assert_allclose(proprio, hand_readout(raw), rtol=0, atol=1e-5)


def test_proprio_stays_within_the_band(band_drive):
    p = np.stack([proprio for _, proprio, _ in band_drive])
    assert (p[:, :5] >= 0).all() and (p[:, :5] <= 2.2).all()  # speed and the 4 wheels
    assert (np.abs(p[:, 5]) <= 1.1).all() and (np.abs(p[:, 6]) <= 3).all()  # steering, gyro
    # The drive exercised the bars: each one moved away from zero at some point.
    assert (np.abs(p).max(axis=0) > 0.05).all(), np.abs(p).max(axis=0)


def test_proprio_follows_the_drive(band_drive):
    by_phase = {}
    for phase, proprio, _ in band_drive:
        by_phase.setdefault(phase, []).append(proprio)
    gas, brake = np.stack(by_phase["gas"]), np.stack(by_phase["brake"])
    assert gas[-1, 0] > gas[0, 0] + 0.3  # accelerating raises the speed bar
    assert brake[-1, 0] < gas[-1, 0] - 0.1  # braking lowers it
    # Hard left then hard right: the steering bar takes both signs, opposite to each other.
    left, right = np.stack(by_phase["left"])[-5:, 5].mean(), np.stack(by_phase["right"])[-5:, 5].mean()
    assert np.sign(left) == -np.sign(right) and min(abs(left), abs(right)) > 0.3


def test_env_unwrapped_frame_has_band():
    """The wrapper really removes something: the raw frame's band shows the speed bar."""
    env = valdi.make_env(tiny_args())
    env.reset(seed=3)
    for _ in range(20):
        env.step(np.array([0.0, 1.0, 0.0], np.float32))
    raw = env.unwrapped.state  # the unwrapped env's last frame
    assert raw[valdi.INDICATOR_BAND_START:].any()
    env.close()


# ---------------------------------------------------------------------------------------------
# Diffusion helpers (Supp. A.2)
# ---------------------------------------------------------------------------------------------
def test_linear_schedule():
    ab = valdi.linear_alpha_bar().double()
    assert ab.shape == (1000,)
    assert ab[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)  # index 0 is one step of noise
    betas = np.linspace(1e-4, 2e-2, 1000)
    assert ab[999].item() == pytest.approx(np.prod(1 - betas), rel=1e-4)
    assert (ab[1:] < ab[:-1]).all()


def test_noising_velocity_and_eq1_identities():
    torch.manual_seed(0)
    z, eps = torch.randn(8, 5, 64), torch.randn(8, 5, 64)
    ab = valdi.linear_alpha_bar()[torch.randint(0, 1000, (8,))].view(8, 1, 1)
    z_noisy = valdi.add_noise(z, eps, ab)
    u = valdi.velocity_target(z, eps, ab)
    # With the exact velocity, Eq. 1 recovers the clean latent and eps_hat the noise.
    torch.testing.assert_close(valdi.reconstruct(z_noisy, u, ab), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(valdi.noise_estimate(z_noisy, u, ab), eps, atol=1e-5, rtol=1e-5)
    # (z^tau, u) is (z, eps) rotated by the angle whose cosine is sqrt(alpha_bar): lengths are kept.
    torch.testing.assert_close(z_noisy**2 + u**2, z**2 + eps**2)
    # At the ends of the schedule: tau = 0 is almost clean (u almost eps), tau = 999 almost pure noise.
    ends = valdi.linear_alpha_bar()[[0, 999]].view(2, 1, 1)
    z_ends = valdi.add_noise(z[:2], eps[:2], ends)
    torch.testing.assert_close(z_ends[0], z[0], atol=0.04, rtol=0)
    torch.testing.assert_close(z_ends[1], eps[1], atol=0.04, rtol=0)
    torch.testing.assert_close(valdi.velocity_target(z[:1], eps[:1], ends[:1]), eps[:1], atol=0.04, rtol=0)


@pytest.mark.parametrize("n, expected", [(1, [999]), (2, [999, 499]), (3, [999, 666, 333]),
                                         (4, [999, 749, 499, 249])])
def test_ddim_timesteps(n, expected):
    assert valdi.ddim_timesteps(n) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_ddim_with_exact_velocity_oracle_recovers_clean_latents(n):
    torch.manual_seed(n)
    clean = torch.randn(16, 5, 64)
    alpha_bar = valdi.linear_alpha_bar()
    seen = []

    def oracle(z, tau):  # the true velocity of z given that the clean sample is `clean`
        seen.append(tau)
        ab = alpha_bar[tau]
        eps = (z - ab.sqrt() * clean) / (1 - ab).sqrt()
        return valdi.velocity_target(clean, eps, ab)

    out = valdi.ddim_sample(oracle, torch.randn(16, 5, 64), n, alpha_bar)
    assert seen == valdi.ddim_timesteps(n)
    torch.testing.assert_close(out, clean, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_euler_with_the_exact_velocity_recovers_clean_latents(n):
    """On the straight line x_t = (1 - t) noise + t z the velocity is z - noise, the same at every
    t: Euler integration is then exact for any number of steps."""
    torch.manual_seed(n)
    clean, noise = torch.randn(16, 5, 64), torch.randn(16, 5, 64)
    seen = []

    def oracle(x, t):
        seen.append(t)
        return (clean - x) / (1 - t)  # equals clean - noise on the line through x
    torch.testing.assert_close(valdi.euler_sample(oracle, noise, n), clean, atol=1e-5, rtol=1e-5)
    assert seen == [i / n for i in range(n)]


def test_flow_time_embedding_loss_and_sampler_by_hand():
    torch.manual_seed(0)
    flow = valdi.WorldModel(valdi.Args(dynamics="flow")).dynamics
    t = torch.tensor([0.0, 0.25, 1.0])
    freqs = flow.time_embed.freqs
    np.testing.assert_allclose(freqs.numpy(), np.geomspace(1, 1000, 16), rtol=1e-6)  # 1 .. 1000, log-spaced
    angles = 2 * math.pi * t[:, None] * freqs
    features = torch.cat([angles.sin(), angles.cos()], dim=-1)
    mlp = flow.time_embed.mlp
    by_hand = mlp[2](torch.nn.functional.silu(mlp[0](features)))
    torch.testing.assert_close(flow.embed_time(t), by_hand)

    z0, z_bar, actions = torch.randn(4, 64), torch.randn(4, 5, 64), torch.randn(4, 5, 9)
    torch.manual_seed(1)
    loss, z_hat = flow.loss(z0, z_bar, actions)
    torch.manual_seed(1)  # the same draws: t per segment, then the noise
    t, noise = torch.rand(4), torch.randn(4, 5, 64)
    x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * z_bar
    u_hat = flow(z0, x_t, actions, t)
    torch.testing.assert_close(loss, ((u_hat - (z_bar - noise)) ** 2).mean())
    torch.testing.assert_close(z_hat, x_t + (1 - t[:, None, None]) * u_hat)

    x = torch.randn(4, 5, 64)  # two Euler steps: t = 0, then t = 1/2
    half = x + flow(z0, x, actions, torch.zeros(1)) / 2
    torch.testing.assert_close(flow.imagine(z0, actions, 2, x), half + flow(z0, half, actions, torch.full((1,), 0.5)) / 2)


def test_imagine_shapes_and_stochasticity():
    torch.manual_seed(0)
    model = valdi.WorldModel(valdi.Args()).eval()
    z0, actions = torch.randn(3, 64), torch.rand(3, 5, 9) * 2 - 1
    with torch.inference_mode():
        one = model.imagine(z0, actions, diffusion_steps=1)
        again = model.imagine(z0, actions, diffusion_steps=1)
        four = model.imagine(z0, actions, diffusion_steps=4)
    assert one.shape == four.shape == (3, 6, 64)
    assert torch.equal(one[:, 0], z0)
    assert not torch.allclose(one[:, 1:], again[:, 1:])  # fresh noise: a distribution of futures
    mlp = valdi.WorldModel(valdi.Args(dynamics="mlp")).eval()
    with torch.inference_mode():
        assert torch.equal(mlp.imagine(z0, actions), mlp.imagine(z0, actions))  # deterministic


# ---------------------------------------------------------------------------------------------
# Losses: SIGReg, TD targets, EMA, one update
# ---------------------------------------------------------------------------------------------
def test_sigreg_small_for_gaussian_large_for_collapsed_with_gradients():
    torch.manual_seed(0)
    gaussian = torch.randn(256, 64, requires_grad=True)
    collapsed = (0.5 + 0.01 * torch.randn(256, 64)).requires_grad_()
    low, high = valdi.sigreg(gaussian), valdi.sigreg(collapsed)
    assert low.item() < 3.0
    assert high.item() > 30 * low.item()
    high.backward()
    assert collapsed.grad is not None and torch.isfinite(collapsed.grad).all() and collapsed.grad.abs().sum() > 0
    # Descending SIGReg alone spreads the collapsed batch out to zero mean, unit spread.
    x = collapsed.detach().clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        valdi.sigreg(x, num_slices=256).backward()
        opt.step()
    assert 0.8 < x.std().item() < 1.2 and abs(x.mean().item()) < 0.05
    assert valdi.sigreg(x.detach()).item() < 3.0


def test_chunk_returns_discount_within_chunk():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    assert valdi.chunk_returns(r, 0.99).item() == pytest.approx(1 + 0.99 * 2 + 0.99**2 * 3)


def random_batch(B=4, H=5, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randint(0, 256, (B, H + 2, 96, 96, 3), dtype=torch.uint8, generator=g),
            "proprio": torch.randn(B, H + 2, 7, generator=g),
            "actions": torch.rand(B, H + 1, 9, generator=g) * 2 - 1,
            "rewards": torch.randn(B, H + 1, 3, generator=g),
            "terminal": torch.zeros(B, H + 1, dtype=torch.bool)}


def test_terminal_masks_the_bootstrap_and_truncation_does_not():
    args = valdi.Args()
    model = valdi.WorldModel(args)
    target = copy.deepcopy(model)
    batch = random_batch()
    reward_target = valdi.chunk_returns(batch["rewards"], args.gamma)
    open_ended = valdi.td_targets(model, target, batch, reward_target, args)
    batch["terminal"][1, 5] = True
    ended = valdi.td_targets(model, target, batch, reward_target, args)
    assert ended[1, 5].item() == pytest.approx(reward_target[1, 5].item())  # no bootstrap after the end
    with torch.no_grad():  # the smaller of the target's two heads, taken by hand
        z_next = model.encoder(batch["rgb"][1, 6], batch["proprio"][1, 6])
        v = min(head(z_next) for head in target.value_heads.heads)
    assert open_ended[1, 5].item() == pytest.approx(reward_target[1, 5].item() + 0.99**3 * v.item(), rel=1e-5)
    mask = torch.ones_like(ended, dtype=torch.bool)
    mask[1, 5] = False
    assert torch.equal(ended[mask], open_ended[mask])  # every other target untouched


def test_ema_rule():
    torch.manual_seed(0)
    online = valdi.WorldModel(valdi.Args(dynamics="mlp"))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    valdi.ema_update(target, online, 0.005)
    for old, new, p in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.995 * old + 0.005 * p)


def test_eq9_total_loss_and_its_terms_by_hand():
    """Eq. 9 and every term of it, recomputed from the networks' parts with the same random
    draws (Valdi: tau, then eps, then SIGReg's directions): the velocity MSE (Eq. 7), the reward
    MSE on the denoised latents (Eq. 1) against chunk returns, the TD value loss against
    r + g min(target heads)(E(s')), SIGReg on z_0, and the total
    (1 - l_reg)(l_diff L_diff + l_rew L_rew + l_val L_val) + l_reg L_reg."""
    args = valdi.Args(sigreg_slices=32, reward_coef=0.3, value_coef=0.2, diffusion_coef=0.7, sigreg_coef=0.1)
    torch.manual_seed(0)
    model = valdi.WorldModel(args)
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():  # a target unlike the online network, as after some updates
            p.add_(0.05 * torch.randn_like(p))
    batch = random_batch(B=6)
    batch["terminal"][2, 4] = True
    H, B, g = args.horizon, 6, args.gamma_wm
    torch.manual_seed(9)
    with torch.no_grad():
        total, parts = valdi.compute_losses(model, target, batch, args)
        torch.manual_seed(9)
        tau = torch.randint(0, valdi.DIFFUSION_T, (B,))
        z0 = model.encoder(batch["rgb"][:, 0], batch["proprio"][:, 0])
        z_bar = target.encoder(batch["rgb"][:, 1:H + 1], batch["proprio"][:, 1:H + 1])
        eps = torch.randn_like(z_bar)
        directions = torch.randn(64, args.sigreg_slices)
        ab = valdi.linear_alpha_bar()[tau].view(B, 1, 1)
        z_tau = ab.sqrt() * z_bar + (1 - ab).sqrt() * eps
        u_hat = model.dynamics(z0, z_tau, batch["actions"][:, :H], tau)
        dynamics = ((u_hat - (ab.sqrt() * eps - (1 - ab).sqrt() * z_bar)) ** 2).mean()
        latents = torch.cat([z0[:, None], ab.sqrt() * z_tau - (1 - ab).sqrt() * u_hat], 1)  # Eq. 1
        r = batch["rewards"]
        chunk_reward = r[..., 0] + 0.99 * r[..., 1] + 0.99**2 * r[..., 2]
        reward = ((model.reward_head(torch.cat([latents, batch["actions"]], -1)).squeeze(-1) - chunk_reward) ** 2).mean()
        z_next = model.encoder(batch["rgb"][:, 1:], batch["proprio"][:, 1:])
        v_next = torch.stack([head(z_next).squeeze(-1) for head in target.value_heads.heads]).min(0).values
        td = chunk_reward + g * (~batch["terminal"]) * v_next
        value = sum(0.5 * ((head(latents).squeeze(-1) - td) ** 2).mean() for head in model.value_heads.heads)
        t = torch.linspace(0, 3, args.sigreg_points)
        w = torch.full_like(t, 2 * 3 / (args.sigreg_points - 1))
        w[0] = w[-1] = 3 / (args.sigreg_points - 1)
        x = (z0 @ (directions / directions.norm(dim=0)))[..., None] * t  # (B, slices, points)
        gap = (x.cos().mean(0) - torch.exp(-t**2 / 2)) ** 2 + x.sin().mean(0) ** 2
        reg = B * (gap * w * torch.exp(-t**2 / 2)).sum(-1).mean()
    hand = {"dynamics": dynamics, "reward": reward, "value": value, "sigreg": reg}
    for name, expected in hand.items():
        torch.testing.assert_close(parts[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    expected_total = (1 - 0.1) * (0.7 * dynamics + 0.3 * reward + 0.2 * value) + 0.1 * reg
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["total"], expected_total, rtol=1e-5, atol=1e-6)
    assert float(reg) > 0.01 and abs(float(td[2, 4] - chunk_reward[2, 4])) < 1e-6  # both terms matter here


@pytest.mark.parametrize("dynamics", ["diffusion", "mlp", "flow"])
def test_one_update_lowers_the_loss_on_a_fixed_batch(dynamics):
    # Adam's first step moves each of the ~5.5M weights by about lr in the sign of its gradient;
    # at the paper's 3e-4 that overshoots the MLP's 5-step residual rollout on this random batch,
    # so the descent property is checked at a smaller rate.
    args = valdi.Args(dynamics=dynamics, sigreg_slices=256, lr=1e-4)
    torch.manual_seed(0)
    model = valdi.WorldModel(args)
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = random_batch(B=8)

    def loss_with_fixed_noise():  # same tau, eps and SIGReg directions every time
        torch.manual_seed(123)
        with torch.no_grad():
            return valdi.compute_losses(model, target, batch, args)[0].item()

    before = loss_with_fixed_noise()
    torch.manual_seed(123)
    parts = valdi.update(agent_of(model, args, target, optimizer), batch)
    after = loss_with_fixed_noise()
    assert parts[0].item() == pytest.approx(before, rel=1e-5)  # update reports the pre-step loss
    assert after < before
    assert all(torch.isfinite(parts))


def test_update_trains_every_component():
    args = valdi.Args(sigreg_slices=64)
    torch.manual_seed(0)
    model = valdi.WorldModel(args)
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    valdi.update(agent_of(model, args, target, optimizer), random_batch())
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    # Embedding rows of timesteps not drawn get no gradient; everything else must move.
    assert all(name == "dynamics.tau_embed.weight" for name in unchanged), unchanged


# ---------------------------------------------------------------------------------------------
# Speed flags: --compile agrees with eager, --precision bf16 stays close, --threads takes effect
# ---------------------------------------------------------------------------------------------
def can_compile() -> bool:
    try:
        valdi.check_device(valdi.Args(compile=True, cuda=False), torch.device("cpu"))
        return True
    except valdi.ValdiError:
        return False


def test_compiled_planner_and_update_agree_with_eager(tiny_runs):
    """--compile changes how the arithmetic is scheduled, not what it computes. Inductor fuses
    and reorders fp32 reductions, which moves a result by a few ulps per layer (1e-7 relative);
    through the encoder, 2 denoising steps and the heads that stays under 1e-5, while a wrong
    op (a missed residual, a stale buffer, a dropped noise term) moves scores and losses by
    1e-2 or more. Random draws are the same in both: the planner's come from outside the
    compiled function, and the update's from aten's generator (fallback_random)."""
    if not can_compile():
        pytest.skip("torch.compile cannot build on this platform")
    import torch._inductor.config as inductor_config
    model = decoder.load_agent(tiny_runs["diffusion"]).model
    eager_args, compiled_args = tiny_args(), tiny_args(compile=True)
    generator = lambda: torch.Generator().manual_seed(5)
    z = torch.randn(2, eager_args.latent_dim, generator=generator())
    samples = torch.randn(2, 2, eager_args.pop_size, 15, 3, generator=generator())  # 2 iterations
    noise = torch.randn(2, 2 * eager_args.pop_size, eager_args.horizon, eager_args.latent_dim, generator=generator())
    with torch.no_grad():
        inputs = (model, z, samples, noise, 2, eager_args)
        eager = valdi.cem_search(*inputs)
        fast = valdi.faster(valdi.cem_search, "cpu", "fp32", True)(*inputs)
        assert torch.allclose(fast, eager, rtol=1e-5, atol=1e-5) and eager.std() > 1e-3
        # The whole search is captured as one graph, as on CUDA (there replayed as a CUDA graph).
        search = torch._dynamo.explain(valdi.cem_search)(*inputs)
        assert (search.graph_count, search.graph_break_count) == (1, 0)
    # The whole plan: same population, same elites, same actions (same shapes and step count as
    # above, so the compiled search is reused rather than built again).
    planned = [valdi.plan(agent_of(model, a), z, diffusion_steps=2, generator=generator())
               for a in (eager_args, compiled_args)]
    assert torch.allclose(planned[0], planned[1], atol=1e-5)

    buffer = valdi.ReplayBuffer(2, 30, eager_args.horizon, eager_args.action_chunk, np.random.default_rng(0))
    for k in (0, 1):
        buffer.add(valdi.load_trajectory(tiny_runs["diffusion"] / "trajectories" / f"00000{k}.npz"))
    batch = valdi.to_device(buffer.sample(8), torch.device("cpu"))
    results = []
    for args in (eager_args, compiled_args):
        net, target = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
        torch.manual_seed(11)
        with inductor_config.patch(fallback_random=True):
            agent = agent_of(net, args, target, optimizer)
            stats = torch.stack([valdi.update(agent, batch) for _ in range(2)])
        results.append((stats, net, target))
    (stats_e, net_e, target_e), (stats_c, net_c, target_c) = results
    assert torch.allclose(stats_c, stats_e, rtol=1e-4, atol=1e-6)
    assert not torch.equal(stats_e[0], stats_e[1])  # the first step changed the weights the second saw
    # The weights moved the same way. Adam divides each coordinate's step by that coordinate's own
    # gradient RMS, so where a gradient is near zero a rounding difference can swing its step by up
    # to lr: compare the whole update instead, which a wrong gradient would change by its own size.
    # (The EMA target moves by tau times as much, and is compared the same way.)
    flat = lambda net: torch.cat([p.flatten() for p in net.parameters()])
    for eager_net, compiled_net in [(net_e, net_c), (target_e, target_c)]:
        step = flat(eager_net) - flat(model)
        assert (flat(compiled_net) - flat(eager_net)).norm() < 1e-2 * step.norm()
    # What is captured, as valdi.speed_up says: the losses' forward pass whole (the step is
    # compiled on CUDA only; its graph breaks are checked by the CUDA tests).
    torch._dynamo.reset()
    forward = torch._dynamo.explain(valdi.compute_losses)(net_e, target_e, batch, eager_args)
    assert (forward.graph_count, forward.graph_break_count) == (1, 0)


def test_a_compile_failure_mid_run_is_one_line():
    """A function torch.compile cannot build (here: one that enters inference mode itself, which
    AOT autograd refuses) stops the run with one line and the advice to run with --no-compile. In a fresh
    interpreter: a failed compile leaves torch's dispatcher unusable for the rest of the process."""
    script = (
        "import torch, valdi\n"
        "f = torch.inference_mode()(lambda m, x: m(x) * m.weight[0, 0])\n"
        "with torch.no_grad():\n"
        "    valdi.faster(f, 'cpu', 'fp32', True)(torch.nn.Linear(4, 4), torch.ones(2, 4))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("valdi.ValdiError: --compile failed (") and last.endswith("run with --no-compile")


def test_bf16_losses_are_finite_and_close_to_fp32_on_a_real_batch(tiny_runs):
    """Eq. 9's terms under bfloat16 autocast on real frames, same random draws as fp32. bf16
    keeps 8 bits of mantissa (0.4% per rounding); through the encoder and the transformer the
    losses move by about a percent, so 5% catches a real precision bug (an fp16-style overflow,
    a loss computed in bf16 end to end) without failing on rounding."""
    if not NATIVE_BF16:
        pytest.skip(NO_BF16)
    args = valdi.Args(dynamics="diffusion", batch_size=16, cuda=False)
    buffer = valdi.ReplayBuffer(2, 30, args.horizon, args.action_chunk, np.random.default_rng(0))
    for k in (0, 1):
        buffer.add(valdi.load_trajectory(tiny_runs["diffusion"] / "trajectories" / f"00000{k}.npz"))
    batch = valdi.to_device(buffer.sample(args.batch_size), torch.device("cpu"))
    model = decoder.load_agent(tiny_runs["diffusion"]).model
    target = copy.deepcopy(model).requires_grad_(False)
    parts = {}
    for precision in ("fp32", "bf16"):  # the losses as an agent of that precision computes them
        torch.manual_seed(3)
        with torch.no_grad():
            agent = agent_of(model, dataclasses.replace(args, precision=precision), target)
            parts[precision] = agent.losses(model, target, batch, args)[1]
    for name in valdi.UPDATE_STATS:
        fp32, bf16 = parts["fp32"][name], parts["bf16"][name]
        assert bf16.dtype == torch.float32 and torch.isfinite(bf16), name  # losses stay fp32
        assert float(bf16) == pytest.approx(float(fp32), rel=0.05), name
    assert any(float(parts["bf16"][n]) != float(parts["fp32"][n]) for n in valdi.LOSS_NAMES)  # bf16 did run


def test_threads_flag_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert valdi.main([*TINY, "--total-trajectories", "1", "--threads", "1", "--runs-dir", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compile_without_a_compiler_is_one_line(tmp_path):
    """torch.compile needs a C++ compiler on the CPU: without one on PATH, the run is refused at
    start with the advice to drop the flag."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "CXX": "no-such-compiler"}
    result = subprocess.run([sys.executable, str(HERE / "valdi.py"), *TINY, "--compile", "--runs-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("valdi.py: error: --compile failed (") and line.endswith("run with --no-compile")
    assert not list(tmp_path.iterdir())  # refused before the run directory was made


def test_precision_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        valdi.main(["--precision", "fp16"])
    assert exc.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Replay: segments aligned with a hand-built trajectory
# ---------------------------------------------------------------------------------------------
def hand_built_trajectory(length: int, terminated: bool, tid: int = 0) -> dict:
    """Frame i carries i in its pixels and proprio, and the trajectory id in a second channel;
    action i is (i, i + .25, i + .5); reward i is i."""
    idx = np.arange(length + 1)
    rgb = np.zeros((length + 1, 96, 96, 3), np.uint8)
    rgb[:, 0, 0, 0] = idx
    rgb[:, 0, 0, 1] = tid
    proprio = np.zeros((length + 1, 7), np.float32)
    proprio[:, 0] = idx
    steps = np.arange(length, dtype=np.float32)
    actions = np.stack([steps, steps + 0.25, steps + 0.5], axis=1)
    return {"rgb": rgb, "proprio": proprio, "actions": actions, "rewards": steps.copy(),
            "terminated": np.bool_(terminated), "track_seed": np.int64(0)}


def test_replay_segments_are_aligned():
    rng = np.random.default_rng(0)
    buffer = valdi.ReplayBuffer(capacity=3, max_steps=60, horizon=5, chunk=3, rng=rng)
    buffer.add(hand_built_trajectory(60, terminated=False, tid=0))  # truncated
    buffer.add(hand_built_trajectory(24, terminated=True, tid=1))  # off the track at step 24
    buffer.add(hand_built_trajectory(10, terminated=True, tid=2))  # too short for a segment
    batch = buffer.sample(512)
    assert batch["rgb"].shape == (512, 7, 96, 96, 3) and batch["rgb"].dtype == np.uint8
    assert batch["actions"].shape == (512, 6, 9) and batch["rewards"].shape == (512, 6, 3)
    start = batch["proprio"][:, 0, 0].astype(int)
    k = np.arange(6)
    # Frames t, t+3, ..., t+18, pixels and proprio of the same frame.
    np.testing.assert_array_equal(batch["proprio"][:, :, 0], start[:, None] + 3 * np.arange(7))
    np.testing.assert_array_equal(batch["rgb"][:, :, 0, 0, 0], start[:, None] + 3 * np.arange(7))
    # Chunk k = env actions t+3k, t+3k+1, t+3k+2 (3 values each), between frames k and k+1.
    chunks = batch["actions"].reshape(512, 6, 3, 3)
    np.testing.assert_array_equal(chunks[:, :, :, 0], start[:, None, None] + 3 * k[:, None] + np.arange(3))
    np.testing.assert_array_equal(chunks[:, :, :, 1], chunks[:, :, :, 0] + 0.25)
    np.testing.assert_array_equal(batch["rewards"], chunks[:, :, :, 0])
    # Every frame of a segment comes from one trajectory; the short one is never drawn.
    tid = batch["rgb"][:, :, 0, 0, 1]
    assert (tid == tid[:, :1]).all()
    tid = tid[:, 0]
    assert set(tid.tolist()) == {0, 1}
    assert start[tid == 0].max() <= 60 - 18 and start[tid == 1].max() <= 24 - 18
    # Terminal exactly on the last chunk of the segments that end at the termination (t = 6).
    expected = np.zeros((512, 6), bool)
    expected[:, 5] = (tid == 1) & (start == 6)
    assert expected.any()
    np.testing.assert_array_equal(batch["terminal"], expected)


def test_replay_is_a_ring_of_trajectories():
    buffer = valdi.ReplayBuffer(capacity=2, max_steps=30, horizon=5, chunk=3, rng=np.random.default_rng(0))
    for n in (30, 27, 24):
        buffer.add(hand_built_trajectory(n, terminated=False))
    assert len(buffer) == 2
    assert sorted(buffer.length.tolist()) == [24, 27]  # the oldest was overwritten


# ---------------------------------------------------------------------------------------------
# CEM planner (Supp. D)
# ---------------------------------------------------------------------------------------------
def linear_reward_model(weights: torch.Tensor) -> valdi.WorldModel:
    """A real MLP-dynamics world model whose weights are set so that the latent never moves,
    every value is 0 and R(z, a) = weights . a: the return of Eq. 10 is then a known linear
    function of the actions, maximised by a = sign(weights) in every chunk."""
    args = valdi.Args(dynamics="mlp")
    model = valdi.WorldModel(args)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.reward_head.blocks:
            block[0].weight.fill_(1.0)  # LayerNorm weight; the zeroed last Linear makes blocks identity
        model.reward_head.inp.weight[:9, 64:] = torch.eye(9)  # hidden[:9] = action chunk
        model.reward_head.out.weight[0, :9] = weights
    return model.eval()


def test_cem_finds_the_optimum_of_a_known_objective():
    weights = torch.tensor([1.0, -0.5, 0.4, -1.0, 0.3, -0.6, 0.8, -0.7, 0.35])
    model = linear_reward_model(weights)
    args = valdi.Args(dynamics="mlp")  # the paper's planner: 512 samples, 64 elites, 10 iterations
    z = torch.randn(1, 64)
    with torch.inference_mode():
        actions = valdi.plan(agent_of(model, args), z, generator=torch.Generator().manual_seed(0))
        discounts = 0.99 ** (3 * torch.arange(6.0))
        best_return = valdi.trajectory_return(model, model.imagine(z, actions), actions, discounts)
    assert actions.shape == (1, 5, 9)
    np.testing.assert_array_equal(torch.sign(actions).numpy(), torch.sign(weights).expand(1, 5, 9).numpy())
    # The supremum (every |a| = 1) is reached by tanh only in the limit; random actions score 0
    # on average. CEM's plan must come close to the supremum.
    supremum = weights.abs().sum() * sum(0.99 ** (3 * h) for h in range(5))
    assert (best_return > 0.85 * supremum).all()


def cem_by_hand(weights: torch.Tensor, args: valdi.Args, generator: torch.Generator, correction: int):
    """Two CEM iterations on the linear objective of linear_reward_model, written out with the
    same random draws as plan(): the elites' spread is refit with std(correction=...)."""
    P, K, H = args.pop_size, args.num_elites, args.horizon
    discounts = args.gamma_wm ** torch.arange(H, dtype=torch.float32)
    mean, std = torch.zeros(1, H * 3, 3), torch.ones(1, H * 3, 3)
    best, best_score = None, -math.inf
    for _ in range(args.cem_iters):
        samples = mean + std * torch.randn((1, P, H * 3, 3), generator=generator)[0]
        scores = (torch.tanh(samples).reshape(P, H, 9) @ weights) @ discounts  # Eq. 10, V = 0
        top = scores.topk(K).indices
        elites = samples[top]
        mean, std = elites.mean(0, keepdim=True), elites.std(0, keepdim=True, correction=correction) + 1e-6
        if scores[top[0]] > best_score:
            best, best_score = elites[0], scores[top[0]]
    return torch.tanh(best).reshape(1, H, 9)


def test_cem_refits_the_elite_spread_with_the_sample_std():
    """Supp. D as published: the second iteration samples with the Bessel-corrected std of the
    first iteration's elites (dividing by K - 1, not K)."""
    weights = torch.tensor([1.0, -0.5, 0.4, -1.0, 0.3, -0.6, 0.8, -0.7, 0.35])
    model = linear_reward_model(weights)
    args = valdi.Args(dynamics="mlp", pop_size=8, num_elites=3, cem_iters=2)
    with torch.inference_mode():
        planned = valdi.plan(agent_of(model, args), torch.randn(1, 64), generator=torch.Generator().manual_seed(5))
    bessel = cem_by_hand(weights, args, torch.Generator().manual_seed(5), correction=1)
    population = cem_by_hand(weights, args, torch.Generator().manual_seed(5), correction=0)
    torch.testing.assert_close(planned, bessel, rtol=0, atol=1e-6)
    assert not torch.allclose(bessel, population, atol=1e-3)  # the two rules give different plans here


def eq10_by_hand(model: valdi.WorldModel, z: torch.Tensor, actions: torch.Tensor, gamma_wm: float,
                 rule: str = "paper") -> torch.Tensor:
    """Eq. 10 for each row of actions (P, H, 9) from the start latent z (1, D), written out from
    the networks' parts: the MLP rolled out step by step, R of each chunk discounted by
    g^0 .. g^(H-1), and g^H times the smaller of the two value heads at z_H. `rule` builds the
    plausible slips instead: "larger_head" (max of the heads), "shifted" (g^1 .. g^H on the rewards)."""
    P, H, _ = actions.shape
    total, latent = torch.zeros(P), z.expand(P, -1)
    for h in range(H):
        weight = gamma_wm ** (h + 1 if rule == "shifted" else h)
        total = total + weight * model.reward_head(torch.cat([latent, actions[:, h]], -1)).squeeze(-1)
        latent = latent + model.dynamics.f(torch.cat([latent, actions[:, h]], -1))
    heads = torch.stack([head(latent).squeeze(-1) for head in model.value_heads.heads])
    terminal = heads.max(0).values if rule == "larger_head" else heads.min(0).values
    return total + gamma_wm ** H * terminal


def cem_with_rule(model: valdi.WorldModel, z: torch.Tensor, args: valdi.Args, seed: int, rule: str) -> torch.Tensor:
    """CEM written out with plan()'s random draws (one standard-normal block per iteration),
    scoring by eq10_by_hand. rule "last_best" keeps the last iteration's best instead of the best
    seen; any other rule is passed to eq10_by_hand. Returns tanh(best), (1, H, 9)."""
    P, K, H = args.pop_size, args.num_elites, args.horizon
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.zeros(H * 3, 3), torch.ones(H * 3, 3)
    best, best_score = None, -math.inf
    for _ in range(args.cem_iters):
        samples = mean + std * torch.randn((1, P, H * 3, 3), generator=generator)[0]
        scores = eq10_by_hand(model, z, torch.tanh(samples).reshape(P, H, 9), args.gamma_wm,
                              "paper" if rule == "last_best" else rule)
        order = scores.argsort(descending=True)[:K]
        elites = samples[order]
        mean, std = elites.mean(0), elites.std(0) + 1e-6
        if rule == "last_best" or scores[order[0]] > best_score:
            best, best_score = elites[0], scores[order[0]]
    return torch.tanh(best).reshape(1, H, 9)


def test_planner_return_and_best_seen_rule_equal_eq10_by_hand():
    """The planner's candidate return is Eq. 10 term by term (rewards discounted from g^0, the
    smaller value head at z_H scaled by g^H) and the plan is the best candidate seen in any CEM
    iteration. For each plausible slip (the larger head, rewards shifted by one step, the last
    iteration's best) a seed is found where the slip picks another plan than the paper's rule,
    and the planner must give the paper's plan there: the test fails on any of the slips."""
    torch.manual_seed(0)
    # 12 elites of 16: later iterations improve little, so the best seen is often an early one.
    args = valdi.Args(dynamics="mlp", pop_size=16, num_elites=12, cem_iters=3, gamma=0.8)  # g = 0.512
    model = valdi.WorldModel(args).eval()
    with torch.no_grad():
        for head in model.value_heads.heads:  # values of the size of the rewards, and unlike each other
            head[-1].weight.mul_(30.0)
        model.reward_head.out.weight.mul_(10.0)
    z = torch.randn(1, 64)
    for slip in ("larger_head", "shifted", "last_best"):
        with torch.no_grad():
            for seed in range(300):
                paper = cem_with_rule(model, z, args, seed, "paper")
                if (cem_with_rule(model, z, args, seed, slip) - paper).abs().max() > 1e-3:
                    break
            else:
                pytest.fail(f"no seed separates the paper's rule from {slip}")
            planned = valdi.plan(agent_of(model, args), z, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(planned, paper, rtol=0, atol=1e-5, msg=f"{slip} (seed {seed})")
    # The scorer itself, on given actions, also equals the hand computation (not just its ranking).
    actions = torch.tanh(torch.randn(8, args.horizon, 9, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        discounts = args.gamma_wm ** torch.arange(args.horizon + 1.0)
        latents = model.imagine(z.expand(8, -1), actions)
        torch.testing.assert_close(valdi.trajectory_return(model, latents, actions, discounts),
                                   eq10_by_hand(model, z, actions, args.gamma_wm), rtol=1e-5, atol=1e-5)


def test_plan_takes_no_gradients_and_is_reproducible_bounded_and_noisy():
    model = valdi.WorldModel(valdi.Args()).eval()
    args = tiny_args()
    z = torch.randn(3, 64, requires_grad=True)
    agent = agent_of(model, args)
    quiet = valdi.plan(agent, z, generator=torch.Generator().manual_seed(1))
    same = valdi.plan(agent, z, generator=torch.Generator().manual_seed(1))
    noisy = valdi.plan(agent, z, noise_std=0.25, generator=torch.Generator().manual_seed(1))
    assert not quiet.requires_grad  # no graph is kept, though z asks for gradients
    assert torch.equal(quiet, same)  # a seeded generator makes planning reproducible
    assert not torch.equal(quiet, noisy)
    assert quiet.abs().max() <= 1.0 and noisy.abs().max() <= 1.0


def test_exploration_schedule():
    args = valdi.Args()
    assert valdi.exploration_std(0, args) == 0.25  # seeding
    assert valdi.exploration_std(10 + 249, args) == 0.25  # hold
    assert valdi.exploration_std(10 + 375, args) == pytest.approx(0.15)  # halfway down
    assert valdi.exploration_std(10 + 500, args) == pytest.approx(0.05)
    assert valdi.exploration_std(4999, args) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# The online loop through the CLI: files, checkpoint, resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamics", ["diffusion", "mlp", "flow"])
def test_tiny_run_writes_everything(tiny_runs, dynamics):
    run_dir = tiny_runs[dynamics]
    rows = read_rows(run_dir)
    assert [int(r["trajectory"]) for r in rows] == [0, 1]
    assert list(rows[0]) == valdi.CSV_FIELDS
    assert rows[0]["loss_total"] == "" and float(rows[1]["loss_total"]) > 0  # seed trajectory: no updates
    assert 0 < float(rows[1]["latent_norm"]) < 100
    assert all(int(r["length"]) == 30 and float(r["planner_hz"]) > 0 for r in rows)
    assert sorted(p.name for p in (run_dir / "trajectories").iterdir()) == ["000000.npz", "000001.npz"]
    traj = valdi.load_trajectory(run_dir / "trajectories" / "000001.npz")
    assert traj["rgb"].shape == (31, 96, 96, 3) and traj["actions"].shape == (30, 3)
    assert float(rows[1]["return"]) == pytest.approx(float(traj["rewards"].sum()), rel=1e-5)
    assert list(run_dir.glob("events.out.tfevents.*"))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["counters"]["trajectories"] == 2 and state["counters"]["updates"] == 2
    assert state["counters"]["env_steps"] == 60 and state["args"]["dynamics"] == dynamics


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *argv],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    repo, plain = tmp_path / "repo", tmp_path / "plain"
    for folder in (repo, plain):
        folder.mkdir()
        shutil.copy(HERE / "valdi.py", folder / "valdi.py")
    git(repo, "init", "-q")
    git(repo, "add", "valdi.py")
    git(repo, "commit", "-q", "-m", "x")
    (repo / "notes.txt").write_text("untracked files are not code changes\n")
    assert valdi.code_version(repo / "valdi.py") == {"commit": git(repo, "rev-parse", "HEAD"), "uncommitted_changes": False}
    with open(repo / "valdi.py", "a") as f:
        f.write("# a fork's edit\n")
    assert valdi.code_version(repo / "valdi.py")["uncommitted_changes"] is True
    assert valdi.code_version(plain / "valdi.py") == {"commit": "unknown", "uncommitted_changes": "unknown"}


def test_args_json_records_the_code_of_every_session_of_a_run(tiny_runs, tmp_path):
    flags = json.loads((tiny_runs["mlp"] / "args.json").read_text())
    assert flags["code"] == [{**valdi.code_version(), "from_trajectory": 0, "flags_changed": {}}]
    # A run started by other code and resumed by this code keeps both on record.
    run_dir = copy_run(tiny_runs["mlp"], tmp_path)
    earlier = {"commit": "0" * 40, "uncommitted_changes": False, "from_trajectory": 0}
    (run_dir / "args.json").write_text(json.dumps({**flags, "code": [earlier]}))
    assert valdi.main(["--resume", str(run_dir), "--total-trajectories", "3", "--threads", "1"]) == 0
    torch.set_num_threads(2)
    assert json.loads((run_dir / "args.json").read_text())["code"] == \
        [earlier, {**valdi.code_version(), "from_trajectory": 2,
                   "flags_changed": {"resume": str(run_dir), "total_trajectories": 3, "threads": 1}}]


def read_rows(run_dir: Path) -> list[dict]:
    import csv
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


# An interrupted run, resumed, is the same run. One process at a time, one torch thread each, so
# that the arithmetic (and so every bit) is the same in the uninterrupted and the resumed run.
EXACT = ["--total-trajectories", "6", "--seed-trajectories", "1", "--max-episode-steps", "60",
         "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--batch-size", "4",
         "--updates-per-trajectory", "12", "--threads", "1", "--no-cuda"]
TIMING_COLUMNS = ("planner_hz", "wall_seconds")  # the only columns allowed to differ


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "valdi.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)


def wait_for(condition, proc, what, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def stat_of(path: Path):
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def fault(proc, run_dir: Path, k: int, when: str, sig: int) -> None:
    """Send `sig` while trajectory k is being collected ('collect') or during its updates
    ('update'), then check that the stop happened where it was meant to."""
    traj_k = lambda: run_dir is not None and (run_dir / "trajectories" / f"{k:06d}.npz").exists()
    ckpt = run_dir / "checkpoint.pt"
    if when == "update":
        wait_for(traj_k, proc, f"trajectory {k} to be saved")  # its updates start right after
    else:
        wait_for(lambda: (run_dir / "trajectories" / f"{k - 1:06d}.npz").exists(), proc, f"trajectory {k - 1}")
        before = stat_of(ckpt)  # the checkpoint counting k - 1 trajectories, rewritten once k - 1 is done
        wait_for(lambda: stat_of(ckpt) != before, proc, f"the checkpoint after trajectory {k - 1}")
        time.sleep(0.05)
    proc.send_signal(sig)
    if sig == signal.SIGINT:  # an impatient user presses Ctrl-C twice
        time.sleep(0.01)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and f"interrupted during trajectory {k}" in err
    assert valdi.load_checkpoint(run_dir)["counters"]["trajectories"] == k  # k itself was not counted
    assert traj_k() == (when == "update")


def assert_same_run(a: Path, b: Path) -> None:
    files_a = sorted(p.name for p in (a / "trajectories").iterdir())
    assert files_a == sorted(p.name for p in (b / "trajectories").iterdir())
    for name in files_a:
        assert (a / "trajectories" / name).read_bytes() == (b / "trajectories" / name).read_bytes(), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]
    assert strip(read_rows(a)) == strip(read_rows(b))
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    for key in ("model", "target"):
        assert sa[key].keys() == sb[key].keys()
        assert all(torch.equal(sa[key][n], sb[key][n]) for n in sa[key]), key
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(oa[i][s], ob[i][s]) for i in oa for s in oa[i])
    assert {k: v for k, v in sa["counters"].items() if k != "wall_seconds"} == \
           {k: v for k, v in sb["counters"].items() if k != "wall_seconds"}


def test_interrupted_and_resumed_run_is_the_same_run(tmp_path):
    # The uninterrupted run goes on beside the interrupted one, each on one core and one thread.
    straight_proc = start(*EXACT, "--runs-dir", str(tmp_path / "straight"))

    # One run, stopped four ways in turn and resumed after each: SIGINT during the updates of
    # trajectory 2, kill -9 during those of 3, SIGTERM while 4 is collected, kill -9 while 5 is.
    proc = start(*EXACT, "--runs-dir", str(tmp_path / "stopped"))
    wait_for(lambda: (tmp_path / "stopped").exists() and list((tmp_path / "stopped").iterdir()), proc, "the run dir")
    run_dir = only_run_dir(tmp_path / "stopped")
    fault(proc, run_dir, 2, "update", signal.SIGINT)
    for k, when, sig in [(3, "update", signal.SIGKILL), (4, "collect", signal.SIGTERM), (5, "collect", signal.SIGKILL)]:
        proc = start("--resume", str(run_dir))
        fault(proc, run_dir, k, when, sig)
    result = run_cli("--resume", str(run_dir / "checkpoint.pt"))  # the checkpoint's path works as well
    assert result.returncode == 0, result.stderr
    assert straight_proc.wait(timeout=300) == 0, straight_proc.stderr.read()

    straight = only_run_dir(tmp_path / "straight")
    assert_same_run(straight, run_dir)
    # The trajectory files written after a checkpoint (2 and 3, whose updates were cut short) were
    # collected again by the resumed run and rewritten byte for byte (assert_same_run compared them).
    assert not list(run_dir.rglob("*.tmp"))


PROJECTION = re.compile(r"valdi.py: projection from the first plans: a plan and its 3 env steps every ([\d.]+) s, "
                        r"so ([\d.]+) (s|min|h|days) a trajectory \((\d+) plans\) and ([\d.]+) (s|min|h|days) for "
                        r"the (\d+) left, before their updates")


def test_the_first_plans_project_the_run_and_the_bar_moves_inside_a_trajectory(tmp_path):
    """After its second plan a run prints one line projecting its length from the time between plans; where that is
    over a day, it names the README's CPU-sized run. The bar counts fractions of a trajectory, and a Ctrl-C in the
    first trajectory says the checkpoint holds none yet."""
    seconds = lambda value, unit: float(value) * {"s": 1, "min": 60, "h": 3600, "days": 86400}[unit]
    result = run_cli(*TINY, "--runs-dir", str(tmp_path / "short"))
    lines = [line for line in result.stderr.splitlines() if "projection" in line]
    assert result.returncode == 0 and len(lines) == 1 and "over a day" not in lines[0], result.stderr
    each, trajectory, unit, plans, _, _, left = PROJECTION.search(lines[0]).groups()
    assert (int(plans), int(left)) == (10, 2)  # 30 env steps in chunks of 3; both trajectories to come
    assert seconds(trajectory, unit) == pytest.approx(10 * float(each), rel=0.05, abs=0.06)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a run of 10^8 trajectories of 200 plans: far over a day
        proc = subprocess.Popen([sys.executable, str(HERE / "valdi.py"), *TINY, "--total-trajectories", "100000000",
                                 "--max-episode-steps", "600", "--buffer-size", "2", "--runs-dir", str(tmp_path / "long")],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=HERE)
        wait_for(lambda: re.search(r"\| 0\.[1-9]/100000000", log.read_text()), proc, "the bar inside trajectory 0")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    text = log.read_text()
    match = PROJECTION.search(text)
    assert match and int(match.group(4)) == 200 and int(match.group(7)) == 100000000
    assert seconds(*match.group(5, 6)) > 86400 and "over a day: see the README's 'A CPU-sized run'" in text
    assert proc.returncode == 130 and "interrupted during trajectory 0" in text and "holds no finished trajectory yet" in text


def test_an_interrupt_names_what_the_checkpoint_holds_in_every_window(tmp_path):
    """Ctrl-C during the first trajectory, and while the checkpoint after trajectory 2 is being written (its .tmp
    exists: the counters have moved, the file has not): the message names what the checkpoint on disk holds, and
    the resume continues from there."""
    proc = start(*EXACT, "--pop-size", "512", "--cem-iters", "4", "--runs-dir", str(tmp_path))  # slow plans
    wait_for(lambda: list(tmp_path.glob("*/events.out.tfevents*")), proc, "the run's log")
    run_dir = only_run_dir(tmp_path)
    time.sleep(1.5)  # inside the first trajectory: its 20 plans of 512 x 4 take longer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted during trajectory 0" in err and "holds no finished trajectory yet" in err
    proc = start("--resume", str(run_dir), "--pop-size", "16", "--cem-iters", "2")
    tmp = run_dir / "checkpoint.pt.tmp"
    wait_for(lambda: (run_dir / "trajectories" / "000002.npz").exists() and tmp.exists(), proc,
             "the checkpoint after trajectory 2 being written")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    held = valdi.load_checkpoint(run_dir)["counters"]["trajectories"]
    assert proc.returncode == 130 and held in (2, 3)  # the save was cut short, or had just finished
    assert f"interrupted during trajectory {held}: " in err and f"holds the run up to trajectory {held - 1};" in err, err
    result = run_cli("--resume", str(run_dir))
    assert result.returncode == 0 and f"resumed {run_dir} after trajectory {held - 1}" in result.stderr


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def test_a_file_system_without_locks_is_one_line_not_in_use(code, tmp_path, capsys, monkeypatch):
    """On Lustre mounted without flock support, flock fails with ENOSYS (or ENOLCK, EOPNOTSUPP elsewhere): the run
    says the file system has no locks, not that another process uses the run."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    err = one_line_error([*TINY, "--runs-dir", str(tmp_path)], capsys)
    assert "its file system has no file locks" in err and "in use" not in err


def test_non_finite_loss_stops_before_anything_is_saved(tiny_runs, tmp_path, capsys):
    """A target network that overflows makes the TD targets, and so the loss, non-finite: the run
    stops before the trajectory counts as done, and the checkpoint on disk is the one before."""
    run_dir = copy_run(tiny_runs["diffusion"], tmp_path)
    state = valdi.load_checkpoint(run_dir)
    state["target"]["value_heads.heads.0.4.bias"].fill_(float("inf"))
    torch.save(state, run_dir / "checkpoint.pt")
    saved = (run_dir / "checkpoint.pt").read_bytes()
    assert valdi.main(["--resume", str(run_dir), "--total-trajectories", "3", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss after trajectory 2" in err and "up to trajectory 1" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == saved
    assert [int(r["trajectory"]) for r in read_rows(run_dir)] == [0, 1]
    torch.set_num_threads(2)


def test_full_disk_stops_with_the_last_checkpoint_intact(tiny_runs, tmp_path):
    """Files may not grow past 5 MB (RLIMIT_FSIZE; writes then fail as on a full disk): the
    trajectory and its row fit, the 86 MB checkpoint does not."""
    import resource
    run_dir = copy_run(tiny_runs["mlp"], tmp_path)
    saved = (run_dir / "checkpoint.pt").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 2**20, 5 * 2**20))
    result = subprocess.run([sys.executable, str(HERE / "valdi.py"), "--resume", str(run_dir),
                             "--total-trajectories", "3"], capture_output=True, text=True, cwd=HERE,
                            timeout=120, preexec_fn=small_files)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot write {run_dir / 'checkpoint.pt'}: File too large" in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == saved and not list(run_dir.rglob("*.tmp"))
    # With room again, the run resumes and redoes trajectory 2.
    assert valdi.main(["--resume", str(run_dir), "--total-trajectories", "3"]) == 0
    assert [int(r["trajectory"]) for r in read_rows(run_dir)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the flag or file, non-zero exit, no traceback, nothing lost
# ---------------------------------------------------------------------------------------------
def one_line_error(argv, capsys) -> str:
    code = valdi.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--num-elites", "600"], "exceeds --pop-size"),
    (["--num-elites", "1"], "--num-elites must be at least 2"),
    (["--max-episode-steps", "15"], "shorter than one replay segment"),
    (["--max-episode-steps", "31"], "not a multiple of --action-chunk"),
    (["--diffusion-steps", "0"], "--diffusion-steps must be between 1 and 1000 (the noise schedule's length), got 0"),
    (["--diffusion-steps", "1001"], "--diffusion-steps must be between 1 and 1000"),
    (["--updates-per-trajectory", "0"], "--updates-per-trajectory must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--lr", "-1"], "--lr must be in (0, 1]"),
    (["--lr", "1e39"], "--lr must be in (0, 1]"),
    (["--lr", "nan"], "--lr must be in (0, 1]"),
    (["--gamma", "2"], "--gamma must be in (0, 1]"),
    (["--gamma", "-1"], "--gamma must be in (0, 1]"),
    (["--ema-tau", "nan"], "--ema-tau must be in [0, 1]"),
    (["--sigreg-coef", "1.5"], "--sigreg-coef must be in [0, 1]"),
    (["--explore-std-max", "-0.1"], "--explore-std-max must be non-negative"),
    (["--explore-std-min", "inf"], "--explore-std-min must be non-negative and finite"),
    (["--grad-clip", "0"], "--grad-clip must be positive"),
    (["--reward-coef", "-1"], "--reward-coef must be non-negative"),
    (["--latent-dim", "300"], "leaves no room"),
    (["--buffer-size", "100000"], "lower --buffer-size"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
])
def test_bad_flags_are_refused_in_one_line(argv, message, capsys):
    assert message in one_line_error(argv, capsys)


def test_replay_memory_estimate_names_both_figures():
    assert valdi.replay_bytes(valdi.Args()) == pytest.approx(16.6e9, rel=0.01)  # 1000 x 601 frames
    need = valdi.replay_bytes(valdi.Args(buffer_size=100000))  # capped at the 5000 trajectories
    with pytest.raises(valdi.ValdiError) as exc:
        valdi.check_args(valdi.Args(buffer_size=100000))
    have = valdi.available_memory()
    assert f"{need / 1e9:.1f} GB" in str(exc.value) and f"{have / 1e9:.1f} GB" in str(exc.value)


@pytest.mark.parametrize("flags, message", [
    (["--dynamics", "mlp"], "--dynamics cannot change on --resume"),
    (["--horizon", "3"], "--horizon cannot change on --resume"),
    (["--latent-dim", "32"], "--latent-dim cannot change on --resume"),
    (["--action-chunk", "2"], "--action-chunk cannot change on --resume"),
    (["--max-episode-steps", "24"], "--max-episode-steps cannot change on --resume"),
])
def test_resume_refuses_shape_changes(tiny_runs, flags, message, capsys):
    assert message in one_line_error(["--resume", str(tiny_runs["diffusion"]), *flags], capsys)


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(tiny_runs, tmp_path):
    """What a --compile run on CUDA with 8 GPUs visible writes: Adam's groups with capturable=True,
    and (older checkpoints) one CUDA generator state per GPU. On a CPU, with --no-compile, it
    resumes; the groups are fitted to this device and only this device's generator is saved."""
    run_dir = copy_run(tiny_runs["mlp"], tmp_path)
    state = valdi.load_checkpoint(run_dir)
    state["args"]["compile"] = True
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]
    torch.save(state, run_dir / "checkpoint.pt")
    assert valdi.main(["--resume", str(run_dir), "--total-trajectories", "3", "--no-compile", "--threads", "1"]) == 0
    torch.set_num_threads(2)
    resumed = valdi.load_checkpoint(run_dir)
    assert resumed["counters"]["trajectories"] == 3 and resumed["counters"]["updates"] == 4
    assert all(group["capturable"] is False for group in resumed["optimizer"]["param_groups"])
    assert all(s["step"].device.type == "cpu" and s["step"] == 4 for s in resumed["optimizer"]["state"].values())
    assert resumed["rng"]["cuda"] is None and resumed["args"]["compile"] is False


def test_a_run_directory_belongs_to_one_process(tmp_path, capsys):
    proc = start(*TINY, "--total-trajectories", "50", "--runs-dir", str(tmp_path))
    try:
        wait_for(lambda: list(tmp_path.glob("*/checkpoint.pt")), proc, "the first checkpoint")
        run_dir = only_run_dir(tmp_path)
        wait_for(lambda: (run_dir / "lock").read_text().strip() == str(proc.pid), proc, "the lock")
        err = one_line_error(["--resume", str(run_dir), "--threads", "1"], capsys)
        assert f"{run_dir} is in use by process {proc.pid}" in err
        assert proc.poll() is None  # nothing was touched
    finally:
        proc.kill()
        proc.wait()
    # A run left by a killed process is taken over.
    done = valdi.load_checkpoint(run_dir)["counters"]["trajectories"]
    assert valdi.main(["--resume", str(run_dir), "--total-trajectories", str(done + 1), "--threads", "1"]) == 0
    torch.set_num_threads(2)
    assert valdi.load_checkpoint(run_dir)["counters"]["trajectories"] == done + 1


def test_resume_refuses_broken_runs_and_loses_nothing(tiny_runs, tmp_path, capsys):
    run_dir = copy_run(tiny_runs["diffusion"], tmp_path)
    ckpt, traj0 = run_dir / "checkpoint.pt", run_dir / "trajectories" / "000000.npz"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    good = traj0.read_bytes()
    traj0.write_bytes(good[:100])  # a corrupt replay file
    assert f"cannot read {traj0}: BadZipFile" in one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    traj0.unlink()  # a deleted one
    assert f"{traj0} is missing" in one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    traj0.write_bytes(good)

    state = valdi.load_checkpoint(run_dir)
    saved = ckpt.read_bytes()
    torch.save({k: v for k, v in state.items() if k != "model"}, ckpt)
    assert "lacks model" in one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    state["model"]["encoder.head.1.weight"] = torch.zeros(3, 3)
    torch.save(state, ckpt)
    assert "do not fit the model" in one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    ckpt.write_bytes(saved[: len(saved) // 2])  # a crash mid-copy
    assert "cannot read checkpoint" in one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    ckpt.write_bytes(os.urandom(4096))
    err = one_line_error(["--resume", str(run_dir), "--total-trajectories", "3"], capsys)
    assert "cannot read checkpoint" in err and "weights_only=False" not in err
    ckpt.write_bytes(saved)
    with pytest.raises(valdi.ValdiError, match="holds a 'diffusion' model"):
        decoder.load_agent(run_dir, dynamics="mlp")
    # Nothing was changed, moved or replaced by any of the refused attempts.
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_unusable_runs_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for runs_dir in (tmp_path / "a_file", Path("/proc/valdi-runs")):
        err = one_line_error([*TINY, "--runs-dir", str(runs_dir)], capsys)
        assert f"cannot create a run directory in --runs-dir {runs_dir}" in err


def test_cli_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        valdi.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for f in valdi.dataclasses.fields(valdi.Args):
        assert "--" + f.name.replace("_", "-") in text
    for shown in ("--cuda, --no-cuda", "(default: 512)", "(default: 0.0003)", "(default: diffusion)"):
        assert shown in text


class LinearDynamics(valdi.Dynamics):
    """A fork's deterministic dynamics, z_{k+1} = z_k + W [z_k, a_k]: the class and its register
    line are all it takes (training, resume and evaluation follow)."""
    label = "linear"

    def __init__(self, latent_dim: int, action_dim: int, horizon: int):
        super().__init__()
        self.step = torch.nn.Linear(latent_dim + action_dim, latent_dim)

    def forward(self, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        z, future = z0, []
        for k in range(actions.shape[1]):
            z = z + self.step(torch.cat([z, actions[:, k]], dim=-1))
            future.append(z)
        return torch.stack(future, dim=1)


@pytest.fixture
def linear_dynamics():
    valdi.register("linear")(LinearDynamics)
    yield "linear"
    del valdi.DYNAMICS["linear"]


def test_a_new_deterministic_dynamics_is_one_registered_class(linear_dynamics, tmp_path, capsys):
    with pytest.raises(SystemExit):
        valdi.main(["--help"])
    assert "linear (linear)" in " ".join(capsys.readouterr().out.split())  # --help lists the registry
    assert valdi.main([*TINY, "--dynamics", "linear", "--runs-dir", str(tmp_path), "--threads", "1"]) == 0
    run = only_run_dir(tmp_path)
    assert valdi.main(["--resume", str(run), "--total-trajectories", "3", "--threads", "1"]) == 0
    torch.set_num_threads(2)
    state = valdi.load_checkpoint(run)
    assert state["counters"] == {**state["counters"], "trajectories": 3, "updates": 4}
    assert state["model"]["dynamics.step.weight"].shape == (64, 64 + 9)
    assert all(r["loss_dynamics"] not in ("", "nan") for r in read_rows(run)[1:])  # trained by the default loss
    assert ed.main(["returns", str(run), "--episodes", "1", "--frames", "15", "--diffusion-steps", "4", "--no-cuda"]) == 0
    (result,) = json.loads((run / "eval" / "returns.json").read_text())["results"]
    assert result["diffusion_steps"] is None and len(result["returns"]) == 1  # deterministic: no sampler steps


def test_a_statistic_added_in_one_place_reaches_progress_csv_and_the_figure(tmp_path):
    """A fork adds a statistic to compute_losses's parts and its name to UPDATE_STATS, nothing
    else: progress.csv gets its column and the training-curve figure's data its values."""
    for name in ("valdi.py", "decoder.py", "eval_diagnostics.py"):
        shutil.copy(HERE / name, tmp_path / name)
    source = (tmp_path / "valdi.py").read_text()
    edits = [('UPDATE_STATS = (*LOSS_NAMES, "latent_norm")', 'UPDATE_STATS = (*LOSS_NAMES, "latent_norm", "value_gap")'),
             ('             "latent_norm": z0.detach().float().norm(dim=-1).mean()}',
              '             "latent_norm": z0.detach().float().norm(dim=-1).mean(), "value_gap": (v1 - v2).abs().mean()}')]
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (tmp_path / "valdi.py").write_text(source)
    run = subprocess.run([sys.executable, "valdi.py", *TINY, "--runs-dir", "runs", "--threads", "1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    rows = read_rows(run_dir)
    assert rows[0]["value_gap"] == "" and float(rows[1]["value_gap"]) > 0  # seeding has no updates
    plot = subprocess.run([sys.executable, "eval_diagnostics.py", "plot", str(run_dir), "--out-dir", "figures",
                           "--window", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr
    (blocks,) = json.loads((tmp_path / "figures" / "plot.json").read_text())["blocks"].values()
    assert blocks[0]["value_gap"] == pytest.approx(float(rows[1]["value_gap"]))


def test_the_readme_reading_map_points_at_the_sections():
    import re
    lines = (HERE / "valdi.py").read_text().split("\n")
    rows = re.findall(r"^\| (\d+)\. [^|]+\| (\d+)-(\d+) \|", (HERE / "README.md").read_text(), flags=re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, 11))
    for (n, start, end), following in zip(rows, [*rows[1:], (None, str(len(lines) + 1), None)]):
        assert lines[int(start) - 1].startswith(f"# {n}. "), (n, lines[int(start) - 1])
        assert int(end) == int(following[1]) - 1, n


def test_import_does_no_work(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import valdi"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no run directory, no files


# =============================================================================================
# eval_diagnostics.py: returns on fixed tracks, Table 1 diagnostics, speed, plots
# =============================================================================================
@pytest.fixture(scope="module")
def runs(tiny_runs, tmp_path_factory):
    """Copies of the tiny runs, for eval_diagnostics.py to write its eval/ folders into."""
    return {dynamics: copy_run(tiny_runs[dynamics], tmp_path_factory.mktemp(f"eval_{dynamics}"))
            for dynamics in ("diffusion", "mlp")}


def returns_cli(runs):
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = ed.main(["returns", str(runs["diffusion"]), str(runs["mlp"]), "--episodes", "2", "--frames", "15",
                        "--diffusion-steps", "1", "2", "--no-cuda"])
    assert code == 0
    return {"printed": printed.getvalue(),
            **{kind: json.loads((d / "eval" / "returns.json").read_text()) for kind, d in runs.items()}}


@pytest.fixture(scope="module")
def evaluated(runs):
    """`returns` run once on both tiny runs (the plot test needs its JSON too)."""
    return returns_cli(runs)


# --- fixed tracks ---------------------------------------------------------------------------------
def test_fixed_track_seeds_are_the_protocols():
    seeds = ed.fixed_track_seeds()
    expected = np.random.default_rng(12345).integers(0, 2**31 - 1, size=100)
    assert seeds == [int(s) for s in expected]
    assert all(0 <= s < 2**31 - 1 for s in seeds) and len(set(seeds)) == 100
    assert ed.fixed_track_seeds(7) == seeds[:7]  # --episodes K means the first K tracks
    assert ed.fixed_track_seeds(150)[:100] == seeds


# --- returns --------------------------------------------------------------------------------------
def test_returns_one_per_episode_and_step_count_and_reproducible(runs, evaluated, capsys):
    seeds = ed.fixed_track_seeds(2)
    diff, mlp = evaluated["diffusion"], evaluated["mlp"]
    assert diff["track_seeds"] == seeds and mlp["track_seeds"] == seeds
    assert [r["diffusion_steps"] for r in diff["results"]] == [1, 2]
    assert [r["diffusion_steps"] for r in mlp["results"]] == [None]  # the MLP has no steps
    for r in diff["results"] + mlp["results"]:
        assert len(r["returns"]) == 2 and r["lengths"] == [15, 15]
        assert r["mean"] == pytest.approx(np.mean(r["returns"]))
        assert r["min"] == min(r["returns"]) and r["max"] == max(r["returns"])
        assert r["sem"] == pytest.approx(abs(r["returns"][0] - r["returns"][1]) / 2)  # s.e. of two numbers
    out = evaluated["printed"]
    assert runs["diffusion"].name in out and runs["mlp"].name in out and "mean speed bar" in out
    # Same track, same episode: the per-episode torch.Generator fixes every random draw, whatever
    # ran before. In 15 frames returns often tie across policies (1000/N per tile minus 0.1 per
    # frame), so the mean speeds, which follow every executed action, are compared too.
    run = ed.load_runs([str(runs["diffusion"])], torch.device("cpu"))[0]
    run.args = valdi.dataclasses.replace(run.args, max_episode_steps=15)
    again = ed.evaluate_returns(run, torch.device("cpu"), seeds[1:], 2)  # the second track alone
    assert again["returns"] == diff["results"][1]["returns"][1:]
    assert again["mean_speeds"] == diff["results"][1]["mean_speeds"][1:]
    assert diff["results"][0]["mean_speeds"] != mlp["results"][0]["mean_speeds"]
    assert all(s > 0 for r in diff["results"] + mlp["results"] for s in r["mean_speeds"])


def test_returns_in_bf16_beside_fp32_and_compared(runs, evaluated, capsys):
    if not NATIVE_BF16:
        pytest.skip(NO_BF16)
    before = (runs["diffusion"] / "eval" / "returns.json").read_bytes()
    assert ed.main(["returns", str(runs["diffusion"]), "--episodes", "2", "--frames", "15", "--diffusion-steps", "1",
                    "--precision", "bf16", "--no-cuda"]) == 0
    assert (runs["diffusion"] / "eval" / "returns.json").read_bytes() == before  # fp32 results untouched
    bf16 = json.loads((runs["diffusion"] / "eval" / "returns_bf16.json").read_text())
    assert bf16["planner"]["precision"] == "bf16" and len(bf16["results"][0]["first_plans"]) == 2
    fp32 = evaluated["diffusion"]["results"][0]
    gap = np.abs(np.array(bf16["results"][0]["first_plans"]) - np.array(fp32["first_plans"])).mean()
    assert f"first planned actions differ by {gap:.3f}" in capsys.readouterr().out


def test_returns_sweep_merges_step_counts(runs, evaluated):
    assert ed.main(["returns", str(runs["diffusion"]), "--episodes", "2", "--frames", "15",
                    "--diffusion-steps", "4", "--no-cuda"]) == 0
    data = json.loads((runs["diffusion"] / "eval" / "returns.json").read_text())
    assert [r["diffusion_steps"] for r in data["results"]] == [1, 2, 4]  # same tracks: earlier counts kept
    assert data["results"][0]["returns"] == evaluated["diffusion"]["results"][0]["returns"]


# --- Table 1 arithmetic by hand --------------------------------------------------------------------
def test_td_residuals_and_error_rows_by_hand():
    rewards = np.array([[1.0, 2.0], [0.0, -1.0]])
    values = np.array([[10.0, 20.0, 30.0], [4.0, 2.0, 8.0]])
    d = ed.td_residuals(rewards, values, gamma_wm=0.5)
    # row 0: 1 + 0.5*20 - 10 = 1;  2 + 0.5*30 - 20 = -3
    # row 1: 0 + 0.5*2 - 4 = -3;  -1 + 0.5*8 - 2 = 1
    np.testing.assert_allclose(d, [[1.0, -3.0], [-3.0, 1.0]])
    rows = ed.error_rows(list(d.T), 0, [np.array([0, 1])] * 2)  # the two rollouts from two episodes
    assert [r["h"] for r in rows] == [0, 1]
    # s.e. over episodes: std(ddof 1) of the episode means [1, -3] is sqrt(8), over sqrt(2) -> 2.
    assert rows[0] == {"h": 0, "mean": -1.0, "sem": pytest.approx(2.0), "mean_abs": 2.0, "std": 2.0, "count": 2,
                       "episodes": 2}
    assert rows[1] == {"h": 1, "mean": -1.0, "sem": pytest.approx(2.0), "mean_abs": 2.0, "std": 2.0, "count": 2,
                       "episodes": 2}


def test_drift_residuals_by_hand():
    real = np.array([1.0, 2.0, 3.0, 4.0])  # V(z_t), t = 0..3: 3 plans and the final state
    imagined = np.array([[1.0, 1.5, 2.5], [2.0, 2.0, 5.0], [3.0, 3.5, 1.0]])  # V(z_hat_h), H = 2
    h1, h2 = ed.drift_residuals(real, imagined)
    np.testing.assert_allclose(h1, [2 - 1.5, 3 - 2.0, 4 - 3.5])
    np.testing.assert_allclose(h2, [3 - 2.5, 4 - 5.0])  # the last plan's z_{t+2} never happened
    # An episode that ended with a termination has no final real state: one fewer at each depth.
    h1, h2 = ed.drift_residuals(real[:3], imagined)
    np.testing.assert_allclose(h1, [0.5, 1.0])
    np.testing.assert_allclose(h2, [0.5])
    rows = ed.error_rows([np.array([0.5, 1.0, 0.5]), np.array([0.5, -1.0])], 1, [np.array([0, 0, 1]), np.array([0, 1])])
    assert rows[0]["h"] == 1 and rows[0]["count"] == 3 and rows[0]["episodes"] == 2
    assert rows[0]["mean"] == pytest.approx(2 / 3) and rows[0]["std"] == pytest.approx(np.sqrt(1 / 18))
    assert rows[0]["sem"] == pytest.approx(0.125)  # episode means 0.75 and 0.5: std 0.1768 / sqrt(2)
    assert rows[1]["mean"] == pytest.approx(-0.25) and rows[1]["mean_abs"] == pytest.approx(0.75)


def test_td_and_drift_of_the_model_on_a_fixed_trajectory(runs):
    """The model-fed diagnostics equal a term-by-term hand computation with model.reward/value."""
    agent = decoder.load_agent(runs["diffusion"], "cpu")
    args, model = agent.args, agent.model
    traj = valdi.load_trajectory(runs["diffusion"] / "trajectories" / "000000.npz")
    H, c = args.horizon, args.action_chunk
    with torch.inference_mode():
        frames = np.arange(0, len(traj["rgb"]), c)  # one real latent per world-model step
        real = model.encode(torch.from_numpy(traj["rgb"][frames]), torch.from_numpy(traj["proprio"][frames]))
        T = len(real) - 1  # plans with at least one real successor
        chunks = torch.from_numpy(traj["actions"][: (len(traj["actions"]) // c) * c]).reshape(-1, c * 3)
        # A fixed action sequence from each start: the next H executed chunks (zero-padded at the end).
        padded = torch.cat([chunks, torch.zeros(H, c * 3)])
        actions = torch.stack([padded[t:t + H] for t in range(T)])
        imagined = model.imagine(real[:T], actions, 1, torch.Generator().manual_seed(0))
        gamma_wm = args.gamma_wm
        assert gamma_wm == pytest.approx(0.99 ** 3)  # one world-model step is 3 env steps (Supp. D)
        td = ed.td_of_rollouts(model, imagined, actions, gamma_wm)
        drift = ed.drift_of_episode(model, real, imagined)
        V = lambda z: min(float(head(z)) for head in model.value_heads.heads)  # the smaller head, by hand
        for t in range(T):
            for h in range(H):
                hand = (float(model.reward(imagined[t, h], actions[t, h])) + gamma_wm * V(imagined[t, h + 1])
                        - V(imagined[t, h]))
                assert td[t, h] == pytest.approx(hand, abs=1e-4)
        for h in range(1, H + 1):
            hand = [V(real[t + h]) - V(imagined[t, h]) for t in range(T) if t + h < len(real)]
            assert len(drift[h - 1]) == len(hand) > 0
            np.testing.assert_allclose(drift[h - 1], hand, atol=1e-4)


# --- consistency and grounding on the tiny runs ---------------------------------------------------
def fake_on_policy_dataset(run_dir: Path) -> Path:
    """decoder.py's dataset format, from the run's two real trajectories: two episodes (tracks)."""
    parts = [valdi.load_trajectory(run_dir / "trajectories" / f"00000{e}.npz") for e in (0, 1)]
    n = [len(p["rgb"]) for p in parts]
    path = decoder.dataset_path(run_dir)
    path.parent.mkdir(exist_ok=True)
    np.savez(path, rgb=np.concatenate([p["rgb"] for p in parts]), proprio=np.concatenate([p["proprio"] for p in parts]),
             episode=np.repeat([0, 1], n).astype(np.int32), step=np.concatenate([np.arange(k) for k in n]),
             is_val=np.repeat([False, True], n))
    return path


def test_consistency_on_the_on_policy_dataset(runs, capsys):
    missing = one_line_eval_error(["consistency", str(runs["diffusion"]), "--no-cuda"], capsys)
    assert "no on-policy dataset at" in missing and "decoder.py collect" in missing
    for kind in ("diffusion", "mlp"):
        fake_on_policy_dataset(runs[kind])
    assert ed.main(["consistency", str(runs["diffusion"]), str(runs["mlp"]), "--num-states", "40",
                    "--plan-batch", "16", "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert runs["diffusion"].name in out and runs["mlp"].name in out and "**" in out  # side by side, marked
    assert "from 40 start states, signed mean ± standard error over episodes" in out  # what stands behind it
    for kind in ("diffusion", "mlp"):
        data = json.loads((runs[kind] / "eval" / "consistency.json").read_text())
        assert data["source"] == str(decoder.dataset_path(runs[kind]))
        assert data["num_states"] == 40 and data["num_tracks"] == 2  # 40 of 62 frames: both episodes drawn
        assert [(r["h"], r["count"], r["episodes"]) for r in data["rows"]] == [(h, 40, 2) for h in range(5)]
        assert all(math.isfinite(r["sem"]) for r in data["rows"])


def one_line_eval_error(argv, capsys) -> str:
    code = ed.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_grounding_counts_per_depth(runs, capsys):
    assert ed.main(["grounding", str(runs["diffusion"]), str(runs["mlp"]), "--episodes", "1", "--wm-steps", "8",
                    "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert "delta_drift" in out and "**" in out
    assert "from 1 closed-loop episodes of 8 world-model steps, signed mean ± standard error over episodes" in out
    for kind in ("diffusion", "mlp"):
        data = json.loads((runs[kind] / "eval" / "grounding.json").read_text())
        assert data["lengths"] == [24] and data["track_seeds"] == ed.fixed_track_seeds(1)
        # 8 plans and 9 real states (the last chunk ran in full): depth h pairs 9 - h of them.
        assert [(r["h"], r["count"]) for r in data["rows"]] == [(1, 8), (2, 7), (3, 6), (4, 5), (5, 4)]
        assert all(r["episodes"] == 1 and r["sem"] is None for r in data["rows"])  # one episode: no s.e.


# --- speed: FLOPs by hand -------------------------------------------------------------------------
# Layer sizes from Supp. B (Table 2), written out independently of the code.
def hand_linear(*pairs):
    return sum(2 * i * o for i, o in pairs)


MLP_F = hand_linear((73, 384), *[(384, 768), (768, 384)] * 6, (384, 64))  # per row
REWARD = hand_linear((73, 256), *[(256, 512), (512, 256)] * 2, (256, 1))  # per row
VALUE = 2 * hand_linear((64, 512), (512, 512), (512, 1))  # both heads, per row
BLOCK_PER_TOKEN = hand_linear((256, 768), (256, 256), (256, 512), (512, 256))  # qkv, proj, FFN


def linears_of(H):
    """The diffusion transformer's Linear layers on one sequence: H + 1 tokens, readout on H."""
    return 6 * (H + 1) * BLOCK_PER_TOKEN + H * hand_linear((256, 64))


def test_flop_counts_equal_hand_counts():
    """torch's FlopCounterMode on the real planner equals the layer-by-layer hand count. On the
    CPU it does not count the attention products (0.25% of a plan), so neither does the hand."""
    pop, iters, H = 16, 2, 2
    for dynamics, per_step in (("mlp", H * MLP_F), ("diffusion", linears_of(H))):
        args = valdi.Args(dynamics=dynamics, pop_size=pop, num_elites=4, cem_iters=iters, horizon=H, cuda=False)
        model, z = valdi.WorldModel(args), torch.randn(1, 64)
        for steps in (1, 2):
            dyn = per_step * (steps if dynamics == "diffusion" else 1)
            assert ed.flops_of(lambda: valdi.plan(agent_of(model, args), z, 0.0, steps)) == iters * pop * (dyn + H * REWARD + VALUE)


def test_speed_table_rates_and_ratios(tmp_path, capsys):
    path = tmp_path / "speed.json"
    assert ed.main(["speed", "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--horizon", "2",
                    "--batch-size", "4", "--modes", "eager", "--act-frames", "6", "--repeats", "1",
                    "--replay-trajectories", "2", "--prep-updates", "2", "--json", str(path), "--no-cuda"]) == 0
    out = capsys.readouterr().out
    assert "| eager fp32" in out and "projected the paper's run" not in out  # a tiny planner is not the paper's
    assert ("projected a run of the paper's length at these settings (planner 16 x 4 x 2, H = 2, batch 4; "
            "not the paper's), eager fp32") in out
    data = json.loads(path.read_text())
    # Without native bf16 the bf16 row is skipped (tested below).
    assert [(r["mode"], r["precision"]) for r in data["rows"]] == [("eager", "fp32")] + NATIVE_BF16 * [("eager", "bf16")]
    assert ("| eager bf16" in out) == NATIVE_BF16
    prep = data["batch_preparation"]  # the data path: in line against the worker thread
    assert prep["replay_trajectories"] == 2 and prep["prepare_ms"] > 0 and prep["update_ms"] > 0
    assert 0 <= prep["waiting_share_worker"] < 1 and 0 <= prep["waiting_share_inline"] < 1
    assert data["device"] == "cpu" and data["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert "(1.00x)" in out.splitlines()[[i for i, line in enumerate(out.splitlines()) if "| eager fp32" in line][0]]
    rates = ("plan_hz_1", "plan_hz_8", "act_fps", "update_ms_diffusion", "update_ms_mlp")
    for row in data["rows"]:  # a clock read wrongly (a zero interval) would give inf or 0 here
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in rates), row
        assert row["compile_s"] == {}  # eager: nothing compiled, no compile line
    assert "compile time" not in out
    assert data["flops"]["plan"] == 2 * 16 * (linears_of(2) + 2 * REWARD + VALUE)


def test_without_native_bf16_it_is_skipped_in_the_table_and_refused_for_runs(tmp_path, capsys, monkeypatch):
    """A CPU with only AVX2 has no native bfloat16 (torch's capability check answers no; made to
    answer no here): the speed table measures fp32 alone and says why, a run is refused."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not valdi.has_native_bf16(torch.device("cpu"))
    path = tmp_path / "speed.json"
    assert ed.main(["speed", "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--horizon", "2",
                    "--batch-size", "4", "--modes", "eager", "--act-frames", "3", "--repeats", "1",
                    "--replay-trajectories", "0", "--json", str(path), "--no-cuda"]) == 0
    captured = capsys.readouterr()
    assert "note: bf16 skipped: this cpu device has no native bfloat16 arithmetic" in captured.err
    assert "| eager bf16" not in captured.out
    assert [r["precision"] for r in json.loads(path.read_text())["rows"]] == ["fp32"]
    assert ed.main(["speed", "--precisions", "bf16", "--no-cuda"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    err = one_line_error([*TINY, "--precision", "bf16", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert "--precision bf16: this cpu device has no native bfloat16 arithmetic; use fp32" in err
    assert not (tmp_path / "runs").exists()


# --- plot -----------------------------------------------------------------------------------------
def test_plot_draws_every_figure_from_the_runs_files(runs, evaluated, tmp_path, capsys):
    import matplotlib.image
    (runs["diffusion"] / "decoder").mkdir(exist_ok=True)
    (runs["diffusion"] / "decoder" / "diversity.json").write_text(json.dumps(
        {"diffusion_steps": [1, 2, 4, 8], "lpips_mean": [0.006, 0.025, 0.033, 0.039],
         "lpips_std": [0.001, 0.004, 0.005, 0.006]}))
    out_dir = tmp_path / "figures"
    assert ed.main(["plot", str(runs["diffusion"]), str(runs["mlp"]), "--out-dir", str(out_dir),
                    "--window", "2"]) == 0
    for name in ("figure4_training_returns.png", "figure3_diffusion_steps.png", "training_losses.png"):
        image = matplotlib.image.imread(out_dir / name)
        assert image.shape[0] > 300 and image[..., :3].std() > 0.05, name  # drawn, not blank
    summary = json.loads((out_dir / "plot.json").read_text())["runs"]
    for kind in ("diffusion", "mlp"):
        returns = [float(r["return"]) for r in read_rows(runs[kind])]
        assert summary[runs[kind].name] == {"dynamics": kind, "trajectories": 2, "best_return": max(returns),
                                            "final_moving_average": pytest.approx(np.mean(returns))}


def test_plot_reads_a_sweep_split_across_cpus(runs, evaluated, tmp_path):
    """Step counts measured on a CPU of another name (returns__<cpu>.json) join returns.json in
    Fig. 3; a result of another protocol (here: other frames) stays out."""
    run = tmp_path / "run"
    shutil.copytree(runs["diffusion"], run)
    data = json.loads((run / "eval" / "returns.json").read_text())
    ours = [r["diffusion_steps"] for r in data["results"]]
    moved = [{**r, "diffusion_steps": 16, "mean": 123.0} for r in data["results"][:1]]
    (run / "eval" / "returns__Other-CPU.json").write_text(json.dumps(
        {**data, "device_name": "Other CPU", "results": moved}))
    (run / "eval" / "returns__5f.json").write_text(json.dumps(
        {**data, "frames": 5, "results": [{**moved[0], "diffusion_steps": 32}]}))
    merged = ed.read_returns(run)
    assert [r["diffusion_steps"] for r in merged["results"]] == sorted({*ours, 16})
    assert next(r for r in merged["results"] if r["diffusion_steps"] == 16)["mean"] == 123.0
    assert merged["device_name"] == data["device_name"]


def test_plot_groups_seeds_by_system(runs, tmp_path, capsys):
    """Runs of one dynamics are seeds of one system: Fig. 4 gets their mean, and the block table
    each seed's block mean with the mean ± s.e. over seeds."""
    import csv
    second = copy_run(runs["diffusion"], tmp_path / "seed2")
    rows = read_rows(second)
    for row in rows:
        row["return"] = str(float(row["return"]) + 10)
    with open(second / "progress.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=valdi.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out_dir = tmp_path / "figures"
    assert ed.main(["plot", str(runs["diffusion"]), str(second), str(runs["mlp"]), "--out-dir", str(out_dir),
                    "--window", "2", "--block", "2"]) == 0
    over = json.loads((out_dir / "plot.json").read_text())["blocks_over_seeds"]
    first = np.mean([float(r["return"]) for r in read_rows(runs["diffusion"])])
    (block,) = over["Valdi"]["blocks"]
    # The two Valdi runs share a folder name: their parents tell them apart in every table.
    assert over["Valdi"]["runs"] == [f"{runs['diffusion'].parent.name}/{runs['diffusion'].name}",
                                     f"seed2/{second.name}"] and block["seeds"] == 2
    assert set(json.loads((out_dir / "plot.json").read_text())["blocks"]) == {
        *over["Valdi"]["runs"], f"{runs['mlp'].parent.name}/{runs['mlp'].name}"}
    assert block["per_seed"] == pytest.approx([first, first + 10])
    assert (block["mean"], block["sem"]) == (pytest.approx(first + 5), pytest.approx(5.0))
    assert over["MLP"]["blocks"][0]["seeds"] == 1 and over["MLP"]["blocks"][0]["sem"] is None
    assert "mean ± s.e. over seeds" in capsys.readouterr().out


def test_flow_runs_through_every_command(tiny_runs, tmp_path, capsys):
    """--dynamics flow goes wherever diffusion goes: resume, returns over step counts, Table 1's
    diagnostics, the decoder's diversity and futures, and the speed table."""
    run = copy_run(tiny_runs["flow"], tmp_path)
    assert valdi.main(["--resume", str(run), "--total-trajectories", "3", "--threads", "1"]) == 0
    torch.set_num_threads(2)
    assert valdi.load_checkpoint(run)["counters"]["trajectories"] == 3
    assert ed.main(["returns", str(run), "--episodes", "2", "--frames", "15", "--diffusion-steps", "1", "2",
                    "--no-cuda"]) == 0
    returns = json.loads((run / "eval" / "returns.json").read_text())
    assert returns["dynamics"] == "flow" and [r["diffusion_steps"] for r in returns["results"]] == [1, 2]
    assert decoder.main(["collect", str(run), "--episodes", "2", "--no-cuda"]) == 0
    assert ed.main(["consistency", str(run), "--num-states", "8", "--plan-batch", "8", "--no-cuda"]) == 0
    assert ed.main(["grounding", str(run), "--episodes", "1", "--wm-steps", "6", "--no-cuda"]) == 0
    assert len(json.loads((run / "eval" / "grounding.json").read_text())["rows"]) == 5  # h = 1..H
    assert decoder.main(["train", str(run), "--steps", "2", "--batch-size", "4", "--eval-every", "2",
                         "--val-max-frames", "4", "--num-images", "2", "--lpips-random-backbone", "--no-cuda"]) == 0
    assert decoder.main(["diversity", str(run), "--num-starts", "2", "--num-futures", "3", "--diffusion-steps", "1",
                         "2", *LPIPS_FLAGS]) == 0
    diversity = read_diversity(run)
    assert diversity["dynamics"] == "flow" and min(diversity["lpips_mean"]) > 0  # its futures differ
    assert decoder.main(["futures", str(run), "--num-futures", "4", "--diffusion-steps", "2", *LPIPS_FLAGS]) == 0
    assert ed.main(["speed", "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--horizon", "2",
                    "--batch-size", "4", "--modes", "eager", "--precisions", "fp32", "--act-frames", "3",
                    "--repeats", "1", "--replay-trajectories", "0", "--dynamics", "flow",
                    "--planner-dynamics", "flow", "--no-cuda"]) == 0
    assert "update ms (Flow)" in capsys.readouterr().out


def test_evaluating_a_shipped_checkpoint_differently_keeps_the_shipped_results(tmp_path, capsys):
    """The README's commands with smaller settings on a checkpoint from docs/: the shipped JSON
    stays byte for byte; the new results go beside it, named after what differs."""
    run = Path(shutil.copytree(HERE / "docs" / "learning-check" / "old-planner" / "mlp", tmp_path / "mlp"))
    shipped = {p.name: p.read_bytes() for p in (run / "eval").iterdir()}
    for _ in range(2):  # the second time, the same settings find their own file again
        assert ed.main(["returns", str(run), "--episodes", "1", "--frames", "15", "--no-cuda", "--threads", "1"]) == 0
        assert ed.main(["grounding", str(run), "--episodes", "1", "--wm-steps", "5", "--no-cuda"]) == 0
    assert torch.get_num_threads() == 1  # --threads, as on valdi.py
    torch.set_num_threads(2)
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.name in shipped} == shipped
    assert sorted(set(p.name for p in (run / "eval").iterdir()) - set(shipped)) == [
        "grounding__1ep_5wm_cpu.json", "returns__1ep_15f_cpu.json"]
    side = json.loads((run / "eval" / "returns__1ep_15f_cpu.json").read_text())
    assert len(side["results"][0]["returns"]) == 1 and side["device"] == "cpu"
    assert "returns__1ep_15f_cpu.json" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so_and_writes_nothing(tiny_runs, capsys):
    run_dir = tiny_runs["mlp"]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")}
    assert valdi.main(["--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"valdi.py: nothing to do: {run_dir} has 2 of 2 trajectories; raise --total-trajectories "
                   f"to continue")
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*")} == before


@pytest.mark.parametrize("where, expected", [
    (lambda run: run / "trajectories" / "000000.npz", "is a trajectory file, not a run: give its run directory ({run})"),
    (lambda run: run / "trajectories", "is a folder inside a run, not a run: give the run directory {run}"),
    (lambda run: run.parent, "is a folder of runs, not a run: give one of them, e.g. {run}"),
])
def test_a_path_of_the_wrong_kind_names_what_was_expected(tiny_runs, where, expected, capsys):
    run = tiny_runs["mlp"]
    assert ed.main(["returns", str(where(run)), "--no-cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(run=run) in err, err
    assert decoder.main(["collect", str(where(run)), "--no-cuda"]) == 2
    assert expected.format(run=run) in capsys.readouterr().err


def readme_smoke_recipe() -> list[list[str]]:
    """The README's smoke recipe, one argv per command (continuation lines joined)."""
    import shlex
    text = (HERE / "README.md").read_text().split("<!-- smoke recipe -->")[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_readme_smoke_recipe_runs_every_companion_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mains = {"valdi.py": valdi.main, "eval_diagnostics.py": ed.main, "decoder.py": decoder.main}
    recipe, run = readme_smoke_recipe(), None
    (tmp_path / "smoke" / "runs" / "an-earlier-run").mkdir(parents=True)  # the recipe, run a second time
    for argv in recipe:
        if argv[:2] == ["rm", "-rf"]:
            shutil.rmtree(tmp_path / argv[2])
            continue
        if argv[0].startswith("RUN="):  # RUN=$(ls -d smoke/runs/*/)
            run = only_run_dir(tmp_path / "smoke" / "runs")
            continue
        assert argv[0] == "python" and argv[1] in mains, argv
        assert mains[argv[1]]([str(run) if a == "$RUN" else a for a in argv[2:]]) == 0, argv
    commands = lambda parser: next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {argv[2] for argv in recipe if argv[0] == "python" and argv[1] != "valdi.py"} == {
        *commands(ed.build_parser()), *commands(decoder.build_parser())}  # a new command joins the recipe
    for path in ("eval/returns.json", "eval/grounding.json", "eval/consistency.json", "decoder/decoder.pt",
                 "decoder/diversity.json", "decoder/futures.png", "decoder/reconstructions.png",
                 "eval/video_track0.mp4", "eval/video_track0.gif"):
        assert (run / path).is_file(), path
    assert "optimizer" not in torch.load(run / "decoder" / "decoder.pt", weights_only=True)  # slim: video and dream read it
    assert (tmp_path / "smoke" / "dream.gif").is_file() and (tmp_path / "smoke" / "dream.mp4").is_file()
    assert sorted(p.name for p in (tmp_path / "smoke" / "figures").glob("*.png")) == [
        "figure3_diffusion_steps.png", "figure4_training_returns.png", "training_losses.png"]


def test_video_shows_every_plan_beside_its_imagination(diffusion_trained, tmp_path, capsys):
    import imageio.v2 as imageio
    run, _ = diffusion_trained
    out = tmp_path / "clip"
    assert ed.main(["video", str(run), "--track", "2", "--frames", "15", "--out", str(out), "--no-cuda"]) == 0
    reader = imageio.get_reader(out.with_suffix(".mp4"))
    assert reader.count_frames() == 15 // 3  # one frame per plan
    assert reader.get_meta_data()["size"] == (480, 368)  # two 192-pixel panels over a strip of 5 x 96, labelled
    frame = reader.get_data(1)
    assert frame.shape == (368, 480, 3) and frame[26:218, 48:240].std() > 5  # the real frame is drawn
    from PIL import Image
    gif = Image.open(out.with_suffix(".gif"))
    assert gif.size == (360, 276) and gif.n_frames == 3  # 3/4 size, every 2nd plan
    assert "track 2:" in capsys.readouterr().out


def test_video_bad_input_is_one_line(tiny_runs, diffusion_trained, tmp_path, capsys):
    run, _ = diffusion_trained
    cases = [(["video", str(run), "--track", "100"], "--track must be between 0 and 99"),
             (["video", str(tiny_runs["mlp"])], "no decoder at"),
             (["video", str(run), "--out", "/proc/no/such/place/clip"], "cannot write /proc/no/such/place/clip.mp4")]
    for argv, expected in cases:
        assert ed.main([*argv, "--no-cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


# --- dream: driving inside the model's imagination (SDL's dummy video driver: no screen needed) ---
@pytest.fixture
def no_screen(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


def a_dream(run: Path, seed: int = 0) -> "ed.Dream":
    (loaded,) = ed.load_runs([str(run)], torch.device("cpu"))
    net, _ = decoder.load_decoder(run, torch.device("cpu"), loaded.args.latent_dim)
    return ed.Dream(loaded, net, ed.fixed_track_seeds(1)[0], ed.run_steps(loaded, None),
                    ed.new_generator(torch.device("cpu"), seed))


def test_dream_keys_posted_as_events_drive_both_cars(diffusion_trained, no_screen):
    import pygame
    dream = a_dream(diffusion_trained[0])
    screen = ed.open_window(dream.picture().shape[1::-1])
    try:
        for key in (pygame.K_UP, pygame.K_LEFT, pygame.K_a):  # A is not one of the game's keys: ignored
            pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=key))
        assert ed.play(dream, screen, "keys", max_ticks=1) == 1
        assert torch.equal(dream.last_actions, dream.held(np.array([-1, 1, 0], np.float32)))  # what the dream got
        car = dream.env.unwrapped.car  # what the real car got (CarRacing turns steer -1, left, into +1 on the wheel)
        assert car.wheels[0].steer == 1 and car.wheels[2].gas > 0 and car.wheels[0].brake == 0
        for event, key in ((pygame.KEYUP, pygame.K_LEFT), (pygame.KEYUP, pygame.K_UP), (pygame.KEYDOWN, pygame.K_DOWN)):
            pygame.event.post(pygame.event.Event(event, key=key))
        assert ed.play(dream, screen, "keys", max_ticks=1) == 1
        assert torch.equal(dream.last_actions, dream.held(np.array([0, 0, 0.8], np.float32)))
        assert car.wheels[0].steer == 0 and car.wheels[0].brake == pytest.approx(0.8)
        assert dream.ticks == 2
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_g))  # re-ground, then one tick
        pygame.event.post(pygame.event.Event(pygame.KEYDOWN, key=pygame.K_ESCAPE))
        assert ed.play(dream, screen, "keys", max_ticks=5) == 0 and dream.ticks == 0  # Esc before the tick
    finally:
        pygame.quit()


def test_dream_regrounding_resets_the_counter_and_takes_the_real_latent(diffusion_trained):
    dream = a_dream(diffusion_trained[0])
    for _ in range(3):
        dream.tick(dream.held(np.array([0.3, 0.5, 0], np.float32)))
    real = valdi.encode_observation(dream.run.model, dream.obs, torch.device("cpu"))
    assert dream.ticks == 3 and torch.equal(dream.z_real, real) and not torch.equal(dream.z_dream, real)
    dream.ground()
    assert dream.ticks == 0 and torch.equal(dream.z_dream, real)


def test_dream_records_a_scripted_session_and_the_planner_drives_the_mlp(diffusion_trained, mlp_trained, tmp_path,
                                                                        capsys):
    from PIL import Image
    script = tmp_path / "actions.txt"
    script.write_text("0 1 0\n-0.5 0.5 0\n0.5 0 0.8\n")  # cycled over the ticks
    out = tmp_path / "scripted.gif"
    assert ed.main(["dream", str(diffusion_trained[0]), "--record", str(out), "--ticks", "20", "--actions",
                    str(script), "--no-cuda"]) == 0
    gif = Image.open(out)
    assert gif.n_frames == 20 and gif.size == (2 * ed.DREAM_PANE + 32, ed.DREAM_PANE + 128)
    out = capsys.readouterr().out
    assert (tmp_path / "scripted.mp4").is_file() and "20 ticks" in out and "ms a tick (median; the env's pace: 60 ms)" in out
    assert ed.main(["dream", str(mlp_trained), "--record", str(tmp_path / "mlp"), "--ticks", "3", "--policy",
                    "planner", "--no-cuda"]) == 0
    assert Image.open(tmp_path / "mlp.gif").n_frames == 3 and "driven by the planner" in capsys.readouterr().out


def test_dream_drift_counts_the_ticks_until_the_dream_is_further_from_reality_than_the_decoders_blur(
        diffusion_trained, tmp_path, capsys):
    run = copy_run(diffusion_trained[0], tmp_path / "run")
    drift = ["dream", str(run), "--drift-tracks", "2", "--ticks", "6", "--skip-frames", "4", "--policy", "planner"]
    assert ed.main([*drift, "--no-cuda"]) == 0
    result = json.loads((run / "eval" / "dream_drift.json").read_text())
    yardstick = json.loads((run / "decoder" / "train.json").read_text())["lpips_recon_mean"]
    assert result["yardstick_lpips_recon_mean"] == yardstick and result["lpips_backbone"] == "random"
    assert len(result["ticks_to_drift"]) == 2 and result["mean"] == pytest.approx(np.mean(result["ticks_to_drift"]))
    # Track 0 by hand: the same dream, kept on reality until frame 4 (the zoom), then six ticks, and its decoded
    # frame's distance to the real one at each.
    dream = a_dream(run, seed=ed.fixed_track_seeds(1)[0])  # the track's own generator, as there
    grounded = -(-4 // dream.run.args.action_chunk)
    assert result["grounded_ticks"] == grounded > 0
    for _ in range(grounded):
        dream.tick(dream.planned())
        dream.ground()
    lp, curve = decoder.make_lpips(True, torch.device("cpu")), []
    for _ in range(6):
        dream.tick(dream.planned())
        real = decoder.frames_to_float(torch.from_numpy(dream.obs["rgb"]).unsqueeze(0))
        curve.append(float(lp(real, decoder.decode(dream.net, dream.z_dream), normalize=True)))
    passed = next((t for t, d in enumerate(curve, 1) if d > yardstick), None)  # the first tick beyond the yardstick
    assert (result["ticks_to_drift"][0], result["drifted"][0]) == (passed or 6, passed is not None)
    assert result["lpips_per_tick"][0] == pytest.approx(curve[:passed or 6], abs=1e-5)  # kept up to the count
    assert "ticks until the dream's LPIPS to reality passes the decoder's own" in capsys.readouterr().out
    # --curve: every track driven its full six ticks, every distance kept, the same counts.
    assert ed.main([*drift, "--curve", "--no-cuda"]) == 0
    full = json.loads((run / "eval" / "dream_drift.json").read_text())
    assert full["lpips_per_tick"][0] == pytest.approx(curve, abs=1e-5)
    assert (full["ticks_to_drift"], full["drifted"]) == (result["ticks_to_drift"], result["drifted"])


def test_dream_bad_input_is_one_line(tiny_runs, diffusion_trained, tmp_path, capsys, monkeypatch):
    run = str(diffusion_trained[0])
    (tmp_path / "bad.txt").write_text("1 2\n")
    monkeypatch.setenv("SDL_VIDEODRIVER", "no-such-display")
    cases = [(["dream", str(tiny_runs["mlp"])], "no decoder at"),
             (["dream", run, "--track", "100"], "--track must be between 0 and 99"),
             (["dream", run, "--record", "/proc/no/such/place/d.gif", "--policy", "planner"], "cannot write"),
             (["dream", run, "--record", str(tmp_path / "d.gif")], "give --policy planner or --actions FILE"),
             (["dream", run, "--record", str(tmp_path / "d.gif"), "--actions", str(tmp_path / "bad.txt")],
              "holds no actions of 3 finite numbers"),
             (["dream", run], "cannot open a window")]
    for argv, expected in cases:
        assert ed.main([*argv, "--no-cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert "--record PATH.gif" in err and not list(tmp_path.glob("d.*"))


def test_capture_video_records_training_episodes_without_changing_them(tiny_runs, tmp_path):
    import imageio.v2 as imageio
    assert valdi.main([*TINY, "--runs-dir", str(tmp_path), "--capture-video", "--video-every", "2"]) == 0
    run = only_run_dir(tmp_path)
    (video,) = sorted((run / "videos").glob("*.mp4"))  # trajectories 0 and 1, every 2nd: trajectory 0
    assert video.name == "from-trajectory-000000-episode-0.mp4"
    reader = imageio.get_reader(video)
    assert reader.count_frames() == 31 and reader.get_meta_data()["size"] == (600, 400)  # reset + 30 steps
    for name in ("000000.npz", "000001.npz"):  # recording watches; it does not change what happens
        assert (run / "trajectories" / name).read_bytes() == (tiny_runs["diffusion"] / "trajectories" / name).read_bytes()


# --- bad input: one line, non-zero exit, no traceback ---------------------------------------------
def test_eval_bad_input_is_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    foreign = tmp_path / "decoder.pt"
    torch.save({"decoder": torch.zeros(3)}, foreign)
    garbage = copy_run(runs["mlp"], tmp_path / "garbage")
    with open(garbage / "progress.csv", "a") as f:
        f.write("2,90,oops,30,0.25,,,,,,,1.0,1.0\n")
    cases = [
        (["returns", str(empty), "--no-cuda"], "no checkpoint"),
        (["grounding", str(foreign), "--no-cuda"], "not a Valdi checkpoint"),
        (["plot", str(empty)], "progress.csv"),
        (["plot", str(garbage)], "progress.csv line 4: return is 'oops', not a number"),
    ]
    for argv, fragment in cases:
        assert fragment in one_line_eval_error(argv, capsys), argv
    for argv, fragment in [(["frobnicate", str(runs["mlp"])], "invalid choice"),
                           (["returns", str(runs["diffusion"]), "--diffusion-steps", "0"], "--diffusion-steps must be between 1 and 1000")]:
        with pytest.raises(SystemExit) as exc:  # argparse's own exit, through the one-line parser
            ed.main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and fragment in err, argv


# =============================================================================================
# decoder.py: post-hoc pixel decoder, LPIPS diversity, diverse futures (random LPIPS trunk)
# =============================================================================================
EPISODE_STEPS = 30  # the tiny runs' episode length


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures: one diffusion and one MLP run, each collected and given a decoder --------------
@pytest.fixture(scope="module")
def diffusion_collected(tiny_runs, tmp_path_factory):
    run = copy_run(tiny_runs["diffusion"], tmp_path_factory.mktemp("decoder_diffusion"))
    assert decoder.main(["collect", str(run), "--episodes", "2", "--no-cuda"]) == 0
    return run


@pytest.fixture(scope="module")
def diffusion_trained(diffusion_collected):
    run = diffusion_collected
    before = sha256(run / "checkpoint.pt")
    assert decoder.main(["train", str(run), "--steps", "6", "--batch-size", "4", "--lr", "1e-3",
                         "--eval-every", "3", "--val-max-frames", "8", "--num-images", "2",
                         "--lpips-random-backbone", "--no-cuda"]) == 0
    return run, before


@pytest.fixture(scope="module")
def mlp_trained(tiny_runs, tmp_path_factory):
    run = copy_run(tiny_runs["mlp"], tmp_path_factory.mktemp("decoder_mlp"))
    assert decoder.main(["collect", str(run), "--episodes", "2", "--no-cuda"]) == 0
    assert decoder.main(["train", str(run), "--steps", "1", "--batch-size", "2", "--val-max-frames", "2",
                         "--num-images", "1", "--lpips-random-backbone", "--no-cuda"]) == 0
    return run


LPIPS_FLAGS = ["--lpips-random-backbone", "--skip-frames", "0", "--no-cuda"]


# --- collect ---------------------------------------------------------------------------------
def test_collect_writes_expected_frames(diffusion_collected):
    data = decoder.load_dataset(diffusion_collected)
    n = 2 * (EPISODE_STEPS + 1)  # 2 episodes of 30 env steps, each with its reset frame
    assert data["rgb"].shape == (n, 96, 96, 3) and data["rgb"].dtype == np.uint8
    assert data["proprio"].shape == (n, 7) and data["proprio"].dtype == np.float32
    assert data["episode"].dtype == np.int32 and data["step"].dtype == np.int32
    assert data["is_val"].dtype == np.bool_
    for e in (0, 1):
        rows = data["episode"] == e
        assert (data["step"][rows] == np.arange(EPISODE_STEPS + 1)).all()
        assert len(set(data["is_val"][rows])) == 1  # split by whole episodes
    assert data["is_val"].any() and not data["is_val"].all()
    assert (data["rgb"][:, valdi.INDICATOR_BAND_START:] == 0).all()  # the env's band is blacked out
    assert data["rgb"][:, :valdi.INDICATOR_BAND_START].std() > 0  # and the rest is real pictures


# --- the decoder -----------------------------------------------------------------------------
def test_decoder_shape_range_and_parameter_count():
    torch.manual_seed(0)
    net = decoder.ViTDecoder(64)
    assert sum(p.numel() for p in net.parameters()) == 1_750_784  # the post-hoc decoder of Supp. G
    assert len(net.blocks) == 3 and all(isinstance(b, valdi.TransformerBlock) for b in net.blocks)
    assert all(m.bias is None for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    with torch.no_grad():
        images = net(3.0 * torch.randn(2, 64))
    assert images.shape == (2, 3, 96, 96)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert not torch.allclose(images[0], images[1])  # the image depends on the latent


def test_train_lowers_validation_loss_and_keeps_encoder_frozen(diffusion_trained):
    run, checkpoint_hash = diffusion_trained
    state = torch.load(run / "decoder" / "decoder.pt", weights_only=True)
    history = state["history"]
    assert history["step"] == [0, 3, 6]
    assert history["val_loss"][-1] < history["val_loss"][0]
    net = decoder.ViTDecoder(64)
    net.load_state_dict(state["decoder"])  # a complete decoder, nothing else inside
    assert sha256(run / "checkpoint.pt") == checkpoint_hash  # the run (encoder included) untouched
    assert (run / "decoder" / "reconstructions.png").stat().st_size > 0
    assert len((run / "decoder" / "train_log.csv").read_text().strip().splitlines()) == 1 + 3
    summary = json.loads((run / "decoder" / "train.json").read_text())
    assert summary["stopped_by"] == "steps cap" and summary["steps"] == 6  # too few points to judge a plateau
    assert summary["val_mse"] == history["val_loss"][-1]
    assert summary["lpips_backbone"] == "random" and not summary["comparable_with_paper"]  # names its trunk
    assert "random" in summary["lpips_trunk"] and summary["lpips_recon_mean"] > 0
    import matplotlib.image
    curve = matplotlib.image.imread(run / "decoder" / "validation_curve.png")
    assert curve.ndim == 3 and curve.std() > 0


def test_decoder_training_stopped_by_ctrl_c_resumes_exactly(diffusion_collected, tmp_path, capsys):
    """Ctrl-C finishes the current step and saves it; --resume then goes on as if never stopped:
    the same weights and the same logged losses as one uninterrupted training."""
    flags = ["--batch-size", "2", "--lr", "1e-3", "--eval-every", "1000", "--val-max-frames", "2",
             "--num-images", "1", "--lpips-random-backbone", "--no-cuda", "--threads", "1"]
    whole, parts = (copy_run(diffusion_collected, tmp_path / name) for name in ("whole", "parts"))
    checkpoint = parts / "decoder" / "decoder.pt"
    for run in (whole, parts):  # the fixture's run may hold a trained decoder already: start afresh
        (run / "decoder" / "decoder.pt").unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "decoder.py", "train", str(parts), "--steps", "1000", *flags],
                               cwd=Path(__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # the step-0 checkpoint appears once the Ctrl-C handler is in place
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "--resume" in err and "Traceback" not in err
    k = torch.load(checkpoint, weights_only=True)["steps"]
    assert 1 <= k < 1000
    # The resumed part takes batch size and learning rate from the checkpoint, not these flags.
    assert decoder.main(["train", str(parts), "--steps", str(k + 2), "--resume", "--batch-size", "7",
                         "--lpips-random-backbone", "--no-cuda", "--threads", "1"]) == 0
    assert decoder.main(["train", str(whole), "--steps", str(k + 2), *flags]) == 0
    torch.set_num_threads(2)  # back to the suite's setting
    a, b = (torch.load(r / "decoder" / "decoder.pt", weights_only=True) for r in (whole, parts))
    assert a["steps"] == b["steps"] == k + 2
    assert a["history"]["step"] == b["history"]["step"] == [0, k + 2]
    assert a["history"]["val_loss"] == b["history"]["val_loss"]
    assert a["history"]["train_loss"][1:] == b["history"]["train_loss"][1:]  # the mean over steps 1..k+2
    for key in a["decoder"]:
        assert torch.equal(a["decoder"][key], b["decoder"][key]), key
    assert decoder.main(["train", str(parts), "--steps", str(k), "--resume", "--no-cuda"]) == 2  # cannot go back
    capsys.readouterr()
    assert decoder.main(["train", str(parts), "--no-cuda"]) == 2  # nor start afresh over a trained decoder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "go on training it with --resume" in err[0]


def test_a_slim_decoder_keeps_its_weights_for_every_reader_and_refuses_resume_in_one_line(diffusion_trained,
                                                                                            tmp_path, capsys):
    run = copy_run(diffusion_trained[0], tmp_path / "run")
    path = run / "decoder" / "decoder.pt"
    full, size = torch.load(path, weights_only=True), path.stat().st_size
    assert decoder.main(["slim", str(run), "--no-cuda"]) == 0
    slim = torch.load(path, weights_only=True)
    assert path.stat().st_size < size / 2 and "optimizer" not in slim and slim["steps"] == full["steps"]
    net, _ = decoder.load_decoder(run, torch.device("cpu"), 64)  # what video, dream, diversity, futures read
    assert all(torch.equal(value, full["decoder"][key]) for key, value in net.state_dict().items())
    assert ed.main(["video", str(run), "--frames", "6", "--out", str(tmp_path / "clip"), "--no-cuda"]) == 0
    capsys.readouterr()
    assert decoder.main(["train", str(run), "--resume", "--no-cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights only (decoder.py slim)" in err[0] and "move it aside" in err[0]


@pytest.mark.parametrize("val_loss, expected", [
    ([1.0, 0.5, 0.4, 0.3, 0.2, 0.1], False),          # still falling fast
    ([1.0, 0.5, 0.4, 0.3, 0.3, 0.299], True),         # last fifth (after step 4): 0.3% better
    ([1.0, 0.5, 0.4, 0.3, 0.3, 0.29], False),         # 3.3% better: keep going
    ([1.0, 0.5, 0.4, 0.3, 0.30, 0.305], True),        # worse than at the start of the fifth
    ([1.0, 0.5, 0.5, 0.5, 0.5], False),               # fewer than five validations after step 0
])
def test_decoder_stops_when_the_last_fifth_improves_by_less_than_one_percent(val_loss, expected):
    steps = [500 * i for i in range(len(val_loss))]
    assert decoder.plateaued(steps, val_loss, 0.01) is expected
    assert decoder.plateaued(steps, val_loss, 0.0) is False  # --plateau 0 always runs all steps


# --- LPIPS and the choice of 4 ---------------------------------------------------------------
def test_batched_pairwise_lpips_equals_the_package():
    torch.manual_seed(1)
    lp = decoder.make_lpips(True, torch.device("cpu"))
    images = torch.rand(5, 3, 96, 96)
    images[4] = images[1]  # a duplicate: distance 0
    distance = decoder.pairwise_lpips(lp, images)
    i, j = torch.triu_indices(5, 5, offset=1)
    with torch.no_grad():  # the package's own LPIPS, one batched call over the 10 pairs
        reference = lp(images[i] * 2 - 1, images[j] * 2 - 1).flatten().double()
    assert torch.allclose(distance[i, j], reference, rtol=1e-4, atol=1e-6)
    assert torch.allclose(distance, distance.T) and (distance.diagonal() == 0).all()
    assert distance[1, 4] < 1e-6 < distance[0, 1]


@pytest.mark.parametrize("n, seed", [(4, 0), (5, 1), (9, 2), (12, 3)])
def test_most_different_four_equals_brute_force(n, seed):
    rng = np.random.default_rng(seed)
    d = rng.random((n, n))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)

    def total(subset):
        return sum(d[a, b] for a, b in itertools.combinations(subset, 2))

    expected = max(itertools.combinations(range(n), 4), key=total)
    chosen, score = decoder.most_different_four(d)
    assert chosen == expected
    assert score == pytest.approx(total(expected))


# --- diversity (Fig. 3 right) ----------------------------------------------------------------
def read_diversity(run: Path) -> dict:
    result = json.loads((run / "decoder" / "diversity.json").read_text())
    assert result["diffusion_steps"] == [1, 2]
    assert len(result["lpips_mean"]) == len(result["lpips_std"]) == 2
    assert result["num_starts"] == 2 and result["num_futures"] == 3
    return result


def test_diversity_is_zero_for_the_deterministic_mlp(mlp_trained):
    assert decoder.main(["diversity", str(mlp_trained), "--num-starts", "2", "--num-futures", "3",
                         "--diffusion-steps", "1", "2", *LPIPS_FLAGS]) == 0
    result = read_diversity(mlp_trained)
    assert result["dynamics"] == "mlp"
    assert max(result["lpips_mean"]) < 1e-6


def test_diversity_is_positive_for_diffusion_with_more_steps(diffusion_trained):
    run, _ = diffusion_trained
    assert decoder.main(["diversity", str(run), "--num-starts", "2", "--num-futures", "3",
                         "--diffusion-steps", "1", "2", *LPIPS_FLAGS]) == 0
    result = read_diversity(run)
    assert result["dynamics"] == "diffusion" and not result["comparable_with_paper"]
    assert result["lpips_backbone"] == "random" and "random" in result["lpips_trunk"]  # names its trunk
    assert result["lpips_mean"][1] > 1e-4  # 2 DDIM steps: the futures differ
    per_start = np.array(result["lpips_per_start"])
    assert result["lpips_sem"] == pytest.approx(per_start.std(axis=1, ddof=1) / np.sqrt(2))
    import matplotlib.image
    assert matplotlib.image.imread(run / "decoder" / "diversity.png").std() > 0


# --- futures (Fig. 5) ------------------------------------------------------------------------
def test_futures_writes_the_grid(diffusion_trained):
    run, _ = diffusion_trained
    assert decoder.main(["futures", str(run), "--num-futures", "5", "--diffusion-steps", "8", *LPIPS_FLAGS]) == 0
    png = run / "decoder" / "futures.png"
    assert png.stat().st_size > 0
    import matplotlib.image
    picture = matplotlib.image.imread(png)
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 400 and picture.std() > 0
    info = json.loads((run / "decoder" / "futures.json").read_text())
    assert len(set(info["chosen"])) == 4 and all(0 <= i < 5 for i in info["chosen"])
    assert info["chosen_lpips_sum"] > 0


# --- bad input: one line, non-zero exit, no traceback ---------------------------------------
@pytest.fixture(scope="module")
def bad_input_dirs(diffusion_collected, tmp_path_factory):
    """A folder with no checkpoint, a run not yet collected, and one collected but not trained."""
    base = tmp_path_factory.mktemp("decoder_bad")
    empty, bare, collected = base / "empty", base / "bare", base / "collected"
    empty.mkdir()
    for d in (bare, collected):
        d.mkdir()
        shutil.copy(diffusion_collected / "checkpoint.pt", d / "checkpoint.pt")
    (collected / "decoder").mkdir()
    shutil.copy(diffusion_collected / "decoder" / "dataset.npz", collected / "decoder" / "dataset.npz")
    return {"empty": empty, "bare": bare, "collected": collected}


@pytest.mark.parametrize("case, argv, expected", [
    ("empty", ["collect", "{empty}", "--episodes", "2"], "no checkpoint"),
    ("bare", ["train", "{bare}"], "no on-policy dataset"),
    ("collected", ["diversity", "{collected}", "--lpips-random-backbone"], "no decoder"),
    ("collected", ["futures", "{collected}", "--lpips-random-backbone"], "no decoder"),
    ("collected", ["futures", "{collected}", "--num-futures", "3"], "fewer than the 4"),
])
def test_decoder_bad_input_is_one_line(bad_input_dirs, case, argv, expected, capsys):
    argv = [a.format(**{k: str(v) for k, v in bad_input_dirs.items()}) for a in argv]
    code = decoder.main([*argv, "--no-cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("decoder.py: error:"), lines
    assert expected in lines[0]


# =============================================================================================
# On a GPU: `python -m pytest -m cuda` runs exactly these; without CUDA they are skipped
# =============================================================================================
# The mark is registered here rather than in a config file (the project keeps none): pytest
# warns about an unknown mark only where it is first used.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    cuda_mark = pytest.mark.cuda


def on_cuda(test):
    """Marked `cuda` (what -m cuda selects), and skipped where CUDA is missing."""
    return cuda_mark(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


CUDA_TINY = [flag for flag in TINY if flag != "--no-cuda"]


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    """One tiny run per dynamics trained on CUDA (eager), as the user runs it."""
    return one_tiny_run_per_dynamics(tmp_path_factory, CUDA_TINY, "cuda")


@pytest.mark.parametrize("dynamics", ["diffusion", "mlp", "flow"])
@on_cuda
def test_cuda_compiled_agrees_with_eager_without_cudagraph_skips(cuda_runs, dynamics):
    """On CUDA --compile records CUDA graphs: the whole CEM search per plan, and the losses'
    forward and backward (the optimizer step is compiled, not graphed). Scores, plans and three updates (fresh randomness each) agree with eager, and
    inductor counts no CUDA-graph skip (a skip would mean silent eager fallback)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    cuda = torch.device("cuda")
    model = decoder.load_agent(cuda_runs[dynamics], cuda).model
    eager_args, compiled_args = tiny_args(dynamics=dynamics, cuda=True), tiny_args(dynamics=dynamics, cuda=True,
                                                                                   compile=True)
    counters.clear()
    z = torch.randn(2, eager_args.latent_dim, device=cuda)
    plans = [valdi.plan(agent_of(model, a, device=cuda), z, diffusion_steps=2, generator=torch.Generator(cuda).manual_seed(3))
             for a in (eager_args, compiled_args, compiled_args)]  # the second compiled call replays
    assert torch.allclose(plans[0], plans[1], atol=1e-4) and torch.equal(plans[1], plans[2])
    buffer = valdi.ReplayBuffer(2, 30, eager_args.horizon, eager_args.action_chunk, np.random.default_rng(0))
    for k in (0, 1):
        buffer.add(valdi.load_trajectory(cuda_runs[dynamics] / "trajectories" / f"00000{k}.npz"))
    batches = [valdi.to_device(buffer.sample(8), cuda) for _ in range(3)]
    stats = []
    for args in (eager_args, compiled_args):
        net, target = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
        agent = agent_of(net, args, target, torch.optim.Adam(net.parameters(), lr=args.lr), device=cuda)
        torch.manual_seed(11)
        with inductor_config.patch(fallback_random=True):
            stats.append(torch.stack([valdi.update(agent, b) for b in batches]))
    assert torch.allclose(stats[1], stats[0], rtol=1e-3, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # The step's graphs are split only where torch's Optimizer.step breaks the graph itself.
    net, target = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=eager_args.lr, capturable=True)
    valdi.compute_losses(net, target, batches[0], eager_args)[0].backward()
    step = torch._dynamo.explain(valdi.optimizer_step)(net, target, optimizer, eager_args)
    assert all(str(b.user_stack[-1].filename).endswith("optim/optimizer.py") for b in step.break_reasons)


@on_cuda
def test_cuda_run_killed_and_resumed_and_moved_between_devices(tmp_path):
    """A CUDA run killed mid-run resumes on CUDA; its checkpoint also resumes on the CPU, and a
    CPU checkpoint resumes on CUDA with --compile (capturable Adam)."""
    proc = start(*CUDA_TINY, "--total-trajectories", "4", "--runs-dir", str(tmp_path / "cuda"))
    wait_for(lambda: list((tmp_path / "cuda").glob("*/trajectories/000001.npz")), proc, "trajectory 1", 600)
    proc.kill()
    proc.wait()
    run_dir = only_run_dir(tmp_path / "cuda")
    assert run_cli("--resume", str(run_dir), timeout=600).returncode == 0
    state = valdi.load_checkpoint(run_dir)
    assert state["counters"]["trajectories"] == 4 and state["rng"]["cuda"].dtype == torch.uint8
    cpu_copy = copy_run(run_dir, tmp_path / "on_cpu")
    result = run_cli("--resume", str(cpu_copy), "--no-cuda", "--total-trajectories", "5", timeout=600)
    assert result.returncode == 0, result.stderr
    back = run_cli("--resume", str(cpu_copy), "--compile", "--total-trajectories", "6", timeout=900)
    assert back.returncode == 0, back.stderr
    groups = valdi.load_checkpoint(cpu_copy)["optimizer"]["param_groups"]
    assert all(group["capturable"] for group in groups)


@on_cuda
def test_no_cuda_never_initialises_cuda(tmp_path):
    script = ("import torch, valdi, sys\n"
              f"assert valdi.main({[*TINY, '--total-trajectories', '1', '--runs-dir', str(tmp_path)]!r}) == 0\n"
              "print('initialised', torch.cuda.is_initialized())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert "initialised False" in result.stdout, result.stderr


@on_cuda
def test_cuda_bf16_losses_close_to_fp32(cuda_runs):
    if not valdi.has_native_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no native bfloat16")
    cuda = torch.device("cuda")
    args = valdi.Args(batch_size=16)
    buffer = valdi.ReplayBuffer(2, 30, args.horizon, args.action_chunk, np.random.default_rng(0))
    for k in (0, 1):
        buffer.add(valdi.load_trajectory(cuda_runs["diffusion"] / "trajectories" / f"00000{k}.npz"))
    batch = valdi.to_device(buffer.sample(args.batch_size), cuda)
    model = decoder.load_agent(cuda_runs["diffusion"], cuda).model
    target = copy.deepcopy(model).requires_grad_(False)
    parts = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(3)
        with torch.no_grad():
            agent = agent_of(model, dataclasses.replace(args, precision=precision), target, device=cuda)
            parts[precision] = agent.losses(model, target, batch, args)[1]
    for name in valdi.UPDATE_STATS:
        assert parts["bf16"][name].dtype == torch.float32 and torch.isfinite(parts["bf16"][name]), name
        assert float(parts["bf16"][name]) == pytest.approx(float(parts["fp32"][name]), rel=0.05), name


@on_cuda
def test_cuda_evaluation_of_a_compiled_checkpoint_records_the_device(cuda_runs, tmp_path, capsys):
    run_dir = copy_run(cuda_runs["diffusion"], tmp_path)
    state = valdi.load_checkpoint(run_dir)
    state["args"]["compile"] = True
    torch.save(state, run_dir / "checkpoint.pt")
    assert ed.main(["returns", str(run_dir), "--episodes", "2", "--frames", "15"]) == 0
    data = json.loads((run_dir / "eval" / "returns.json").read_text())
    assert data["device"] == "cuda" and data["device_name"] == torch.cuda.get_device_name()
    assert data["float32_matmul_precision"] == "high" and len(data["results"][0]["returns"]) == 2


@on_cuda
def test_cuda_speed_table(tmp_path, capsys):
    path = tmp_path / "speed.json"
    assert ed.main(["speed", "--pop-size", "64", "--num-elites", "8", "--cem-iters", "4", "--batch-size", "16",
                    "--act-frames", "6", "--repeats", "2", "--replay-trajectories", "4", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["device"] == "cuda" and {r["mode"] for r in data["rows"]} == {"eager", "compiled"}
    assert all(r["plan_hz_1"] > 0 and r["update_ms_diffusion"] > 0 for r in data["rows"])


# =============================================================================================
# sweep.py: seed sweeps on Slurm (faked here) or locally, preemption-safe
# =============================================================================================
import sweep  # noqa: E402

SWEEP_RUN = ["--total-trajectories", "4", "--seed-trajectories", "1", "--max-episode-steps", "60",
             "--pop-size", "16", "--num-elites", "4", "--cem-iters", "2", "--batch-size", "4",
             "--updates-per-trajectory", "12", "--threads", "1", "--no-cuda"]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, scontrol, sacct, squeue and srun on PATH that record what they are asked: sbatch keeps the file it
    was given and answers with job 4242, scontrol records requeues."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" {tmp_path}/submitted.sbatch; echo "Submitted batch job 4242"',
               "scontrol": f'echo "scontrol $*" >> {log}', "sacct": "true", "squeue": "true", "srun": '"$@"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_sweep_on_slurm_writes_one_array_and_a_signalled_task_requeues_and_resumes_exactly(fake_slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert sweep.main(["--launcher", "slurm", "--dynamics", "diffusion", "mlp", "--num-seeds", "2", "--workers", "2",
                       "--time-min", "30", "--gpus-per-task", "1", "--cpus-per-task", "4", "--partition", "gpu",
                       "--sweep-dir", str(sweep_dir), "--", *SWEEP_RUN]) == 0
    sbatch = (tmp_path / "submitted.sbatch").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --signal=USR2@90", "#SBATCH --time=30", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --partition=gpu"):
        assert line in sbatch, line
    # Array task 0 (diffusion, seed 1), run as Slurm runs it; USR2 to its whole process group after trajectory 2's
    # checkpoint, as Slurm signals every process of the step.
    (pickle,) = sweep_dir.glob("slurm/**/4242_0_submitted.pkl")
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1"}
    task = [sys.executable, "-u", "-m", "submitit.core._submit", str(pickle.parent)]
    folder = sweep_dir / "diffusion__s1"
    proc = subprocess.Popen(task, env=env, cwd=HERE, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt = lambda: sweep.run_of(folder) and valdi.load_checkpoint(sweep.run_of(folder))["counters"]["trajectories"]
    wait_for(lambda: (ckpt() or 0) >= 2, proc, "trajectory 2's checkpoint", timeout=240)
    os.killpg(proc.pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert "requeued" in out and "scontrol requeue 4242_0" in fake_slurm.read_text(), out
    assert not sweep.held(folder) and 2 <= ckpt() < 4  # the run is free, its checkpoint mid-way
    rerun = subprocess.run(task, env=env, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and ckpt() == 4, rerun.stdout + rerun.stderr
    straight = tmp_path / "straight"
    assert run_cli(*SWEEP_RUN, "--dynamics", "diffusion", "--seed", "1", "--runs-dir", str(straight),
                   timeout=300).returncode == 0
    assert_same_run(only_run_dir(straight), sweep.run_of(folder))


def test_local_sweep_requeued_as_at_its_time_limit_finishes_each_run_once_and_reruns_as_nothing(tmp_path):
    """Two local tasks, each sent the time limit's signal (USR2, what submitit's local controller sends
    --signal-delay-s before --time-min; its _interrupt() is no preemption) once its run has a checkpointed
    trajectory: both requeue, resume and finish, one run per (dynamics, seed); the same command again does nothing."""
    argv = [sys.executable, str(HERE / "sweep.py"), "--dynamics", "mlp", "flow", "--num-seeds", "1", "--workers", "2",
            "--time-min", "10", "--sweep-dir", "sweep", "--", *SWEEP_RUN]  # launched from elsewhere
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folders = [tmp_path / "sweep" / name for name in ("mlp__s1", "flow__s1")]
    done = lambda f: sweep.trajectories_done(f) if sweep.run_of(f) else 0
    wait_for(lambda: all(done(f) >= 1 for f in folders), proc, "a checkpointed trajectory in each run", timeout=240)
    controllers = [p.name for p in (tmp_path / "sweep" / "local").iterdir() if p.name.isdigit()]
    tasks = subprocess.run(["pgrep", "-P", ",".join(controllers)], capture_output=True, text=True).stdout.split()
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(int(pid), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    logs = ["".join(f.read_text() for f in job.glob("*_log.*")) for job in (tmp_path / "sweep" / "local").glob("[0-9]*")]
    assert len(logs) == 2 and all(log.count("sweep.py: requeued") == 1 and "Requeued job" in log for log in logs)
    for folder in folders:
        (run,) = [p.parent for p in (folder / "runs").glob("*/checkpoint.pt")]
        assert [r["trajectory"] for r in read_rows(run)] == ["0", "1", "2", "3"]
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 of 2 runs done; 0 to run" in again.stdout, again.stdout + again.stderr


def test_sweep_bad_input_is_one_line_and_a_running_sweep_is_refused(tmp_path, capsys, monkeypatch):
    def refused(argv, expected):
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a sweep")
    refused(["--sweep-dir", str(other), "--", *SWEEP_RUN], "holds something other than a sweep")
    refused(["--workers", "0", "--sweep-dir", str(tmp_path / "s")], "--workers must be at least 1")
    refused(["--sweep-dir", str(tmp_path / "s"), "--", "--seed", "3"], "--seed is set by the sweep")
    refused(["--sweep-dir", str(tmp_path / "s"), "--", "--num-elites", "1"], "--num-elites must be at least 2")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    refused(["--launcher", "slurm", "--sweep-dir", str(tmp_path / "s")], "sbatch and srun not on PATH")
    with pytest.raises(SystemExit) as exc:  # valdi.py's own wording, before anything is submitted
        sweep.main(["--dynamics", "gru", "--sweep-dir", str(tmp_path / "s")])
    assert exc.value.code == 2 and "invalid choice: 'gru'" in capsys.readouterr().err
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "sweep.json").write_text("{}")
    with sweep.claim(tmp_path / "running" / "mlp__s1"):  # a task of this sweep is running
        refused(["--dynamics", "mlp", "--num-seeds", "1", "--sweep-dir", str(tmp_path / "running")],
                "this sweep is running")
    assert not (tmp_path / "s").exists()  # nothing was made by the refused launches
