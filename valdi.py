"""Valdi: Value Diffusion World Models -- a single-file reference implementation.

Valdi is TD-MPC with one change: the deterministic MLP that rolls the latent state forward is replaced by a
diffusion transformer that denoises the whole H-step latent future at once, conditioned on the current latent and
the action sequence; encoder, reward, value, CEM planning in latent space and online training are TD-MPC's.
`--dynamics mlp` swaps the baseline back in, every other component identical.

Read it beside the paper (Lindenberg & Chitta), in its order: 1. constants, 2. flags (Table 3), 3. environment
(Supp. E), 4. diffusion (Supp. A.2), 5. networks (Supp. B), 6. losses and the update (Eq. 9), 7. replay, 8. the CEM
planner (Eq. 10), 9. the online loop (Algorithm 1), and 10. what is not the method (command line, files, resume).
Importing it does no work: the companion scripts (decoder.py, eval_diagnostics.py) import its pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import fcntl  # POSIX: the run lock
import functools
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# =============================================================================================
# 1. Constants
# =============================================================================================
# The shapes the paper fixes (Supp. B, D, E). The flags below may change the others.
PROPRIO_DIM = 7  # the indicator band's 7 bars: speed, 4 wheel spins, steering, gyroscope
ENV_ACTION_DIM = 3  # steer, gas, brake
TOKEN_WIDTH = 256  # width of the diffusion transformer
TAU_EMBED_DIM = 32  # learned diffusion-timestep embedding, Embedding(1000, 32)
DIFFUSION_T = 1000  # diffusion steps of the noise schedule (Eq. 8)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # pixel normalisation of the encoder's CNN
IMAGENET_STD = (0.229, 0.224, 0.225)


# =============================================================================================
# 2. Flags (Table 3)
# =============================================================================================
def flag(default, help, valid=None):
    """A field with its --help line and its valid values: at least an int, or "(0, 1]", "[0, 1]", ">= 0" or "> 0"
    (finite). check_args (section 10) refuses the rest in one line."""
    return field(default=default, metadata={"help": help, "valid": valid})


@dataclass
class Args:
    # --- the run ---
    dynamics: str = flag("diffusion", "latent dynamics, one of the kinds registered in section 5")
    seed: int = flag(1, "seed of torch, numpy and the training tracks", 0)
    cuda: bool = flag(True, "use CUDA when it is available (--no-cuda forces the CPU)")
    threads: int = flag(0, "torch CPU threads for the whole process (0: torch's default, one per core)", 0)
    compile: bool = flag(False, "torch.compile the CEM search and the update (on CUDA as CUDA graphs)")
    precision: str = flag("fp32", "fp32, or bf16: bfloat16 autocast for planning and updates (losses, SIGReg, "
                                  "EMA and Adam state stay fp32)")
    exp_name: str = flag("valdi", "name prefix of the run directory")
    capture_video: bool = flag(False, "record training episodes to RUN_DIR/videos (gymnasium's RecordVideo)")
    video_every: int = flag(50, "with --capture-video, record every Nth training trajectory", 1)
    runs_dir: str = flag("runs", "parent folder of run directories")
    resume: str = flag("", "continue the run in this RUN_DIR from its checkpoint.pt")
    # --- online loop (Algorithm 1, Table 3) ---
    total_trajectories: int = flag(5000, "trajectories to collect in all, seed trajectories included", 1)
    seed_trajectories: int = flag(10, "trajectories planned by the untrained model before any update", 1)
    max_episode_steps: int = flag(600, "env frames per episode before truncation (Supp. E)", 1)
    updates_per_trajectory: int = flag(60, "gradient updates after each collected trajectory", 1)
    batch_size: int = flag(256, "replay segments per update", 1)
    buffer_size: int = flag(1000, "replay capacity in trajectories (uniform sampling)", 1)
    # --- world model (Supp. B, D) ---
    horizon: int = flag(5, "planning horizon H in world-model steps", 1)
    action_chunk: int = flag(3, "env steps per world-model step (action chunking, Supp. D)", 1)
    gamma: float = flag(0.99, "discount per env step; a world-model step discounts by gamma**chunk", "(0, 1]")
    latent_dim: int = flag(64, "size of the latent state z", 1)
    # --- CEM planner (Supp. D) ---
    pop_size: int = flag(512, "CEM population (candidate action sequences)", 1)
    num_elites: int = flag(64, "CEM elites the sampling distribution is refit to (their std divides by K - 1)", 2)
    cem_iters: int = flag(10, "CEM iterations per plan", 1)
    diffusion_steps: int = flag(1, "DDIM steps used to imagine futures when planning (inference only)")
    # --- optimisation (Eq. 9, Table 3) ---
    lr: float = flag(3e-4, "Adam learning rate", "(0, 1]")
    grad_clip: float = flag(10.0, "gradient-norm clip", "> 0")
    ema_tau: float = flag(0.005, "EMA coefficient of the target network (Algorithm 1 line 21)", "[0, 1]")
    diffusion_coef: float = flag(1.0, "lambda_diff: weight of the dynamics loss", ">= 0")
    reward_coef: float = flag(0.01, "lambda_rew: weight of the reward loss", ">= 0")
    value_coef: float = flag(0.01, "lambda_val: weight of the TD value loss", ">= 0")
    sigreg_coef: float = flag(0.05, "lambda_reg: weight of SIGReg on the first latent", "[0, 1]")
    sigreg_slices: int = flag(1024, "SIGReg random projection directions", 1)
    sigreg_points: int = flag(17, "SIGReg integration points t in [0, 3]", 2)
    # --- exploration (Table 3): pre-tanh Gaussian noise on the executed plan ---
    explore_std_max: float = flag(0.25, "exploration std during seeding and the hold phase", ">= 0")
    explore_std_min: float = flag(0.05, "exploration std after the decay", ">= 0")
    explore_hold: int = flag(250, "trajectories (after seeding) at explore_std_max", 0)
    explore_decay: int = flag(250, "trajectories of linear decay to explore_std_min", 0)

    @property
    def gamma_wm(self) -> float:
        """The discount of one world-model step: gamma ** action_chunk (Supp. D, Eq. 10)."""
        return self.gamma ** self.action_chunk


class ValdiError(Exception):
    """A problem with the user's input; reported as one line, never as a traceback."""


# =============================================================================================
# 3. Environment (Supp. E)
# =============================================================================================
# CarRacing draws speed, wheel spin, steering and gyro as bars in the bottom 12 rows of its 96x96 frame. Valdi
# splits the two modalities (Supp. E): the band is blacked out of the image and its 7 bars are handed to the agent
# as numbers instead: the bars' lengths, read from the band's own pixels, exactly what the paper's agent saw. They
# are bounded by the band (speed and wheels within about [0, 2], steering [-1, 1], gyro [-2.8, 2.8]); the
# simulator's raw car state carries the same signal unbounded and 2-4x larger, which destabilises online training.
INDICATOR_BAND_START = 84
RED, GREEN, BLUE = 0, 1, 2  # channels of a frame


def band_readout(frame: np.ndarray) -> np.ndarray:
    """The 7 bar lengths of CarRacing's indicator band, from a raw (96, 96, 3) uint8 frame. Vertical bars grow
    upwards in one pixel column of rows 84..93: speed (red, column 12) and the four wheels' ABS spin (blue, columns
    18, 20, 22, 24). Horizontal bars grow left or right from a centre in row 88: steering (green, right of column 48
    minus left of it) and the gyroscope (red, right of column 72 minus left of it). Summing a bar's channel over its
    pixels and dividing by 255 counts its lit pixels; the divisors put the bars near unit scale."""
    f = frame.astype(np.float32) / 255.0
    vertical = f[84:94]  # rows of the vertical bars
    row = f[88]  # the row of the horizontal bars
    speed = vertical[:, 12, RED].sum() / 5
    wheels = vertical[:, 18:26:2, BLUE].sum(axis=0) / 5  # columns 18, 20, 22, 24
    steering = (row[48:58, GREEN].sum() - row[38:48, GREEN].sum()) / 10
    gyro = (row[72:86, RED].sum() - row[58:72, RED].sum()) / 5
    return np.array([speed, *wheels, steering, gyro], dtype=np.float32)


def observe(frame: np.ndarray) -> dict:
    """A CarRacing frame -> {'rgb': (96, 96, 3) uint8 with the band blacked out, 'proprio': the band's 7 readings}."""
    proprio = band_readout(frame)  # read the band before it is blacked out
    rgb = frame.copy()
    rgb[INDICATOR_BAND_START:] = 0
    return {"rgb": rgb, "proprio": proprio}


def make_env(args: Args, render_mode: str | None = None, video_dir: Path | None = None,
             first_trajectory: int = 0) -> gym.Env:
    """The modified CarRacing: continuous actions, truncated at --max-episode-steps (600, not 1000). Actions in
    [-1, 1]^3 go in unchanged: CarRacing clips gas to [0, 1] itself and treats a negative brake as no brake. With
    video_dir, every --video-every-th trajectory is recorded there (cleanRL's --capture-video); this env's
    episodes are the run's trajectories first_trajectory, first_trajectory + 1, ..., as the file names count."""
    env = gym.make("CarRacing-v3", continuous=True, max_episode_steps=args.max_episode_steps,
                   render_mode="rgb_array" if video_dir else render_mode)
    env.action_space.seed(args.seed)
    if video_dir:
        env = gym.wrappers.RecordVideo(env, str(video_dir), name_prefix=f"from-trajectory-{first_trajectory:06d}",
                                       episode_trigger=lambda e: (first_trajectory + e) % args.video_every == 0,
                                       disable_logger=True)
    space = gym.spaces.Dict({"rgb": gym.spaces.Box(0, 255, (96, 96, 3), np.uint8),
                             "proprio": gym.spaces.Box(-np.inf, np.inf, (PROPRIO_DIM,), np.float32)})
    return gym.wrappers.TransformObservation(env, observe, space)


# =============================================================================================
# 4. Diffusion helpers (Supp. A.2)
# =============================================================================================
def linear_alpha_bar(T: int = DIFFUSION_T, beta_1: float = 1e-4, beta_T: float = 2e-2) -> torch.Tensor:
    """Eq. 8: beta linear from 1e-4 to 2e-2, alpha_bar = cumprod(1 - beta), tau in 0..T-1 (0 is one step of noise)."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(z: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward noising z^tau = sqrt(ab) z + sqrt(1 - ab) eps (Algorithm 1 line 15)."""
    return alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps


def velocity_target(z: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v-parameterisation u = sqrt(ab) eps - sqrt(1 - ab) z (Algorithm 1 line 16; Salimans & Ho). Unlike
    eps-prediction it stays well-conditioned at tau = 999, where one-step sampling starts."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z


def reconstruct(z_noisy: torch.Tensor, u_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the one-step denoised estimate z_hat = sqrt(ab) z^tau - sqrt(1 - ab) u_hat."""
    return alpha_bar.sqrt() * z_noisy - (1 - alpha_bar).sqrt() * u_hat


def noise_estimate(z_noisy: torch.Tensor, u_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps_hat = sqrt(1 - ab) z^tau + sqrt(ab) u_hat: the noise implied by the same prediction."""
    return (1 - alpha_bar).sqrt() * z_noisy + alpha_bar.sqrt() * u_hat


def ddim_timesteps(n: int, T: int = DIFFUSION_T) -> list[int]:
    """tau_k = ceil(k T / n) - 1 for k = n..1: n=1 -> [999], n=2 -> [999, 499], n=4 -> [999, 749, 499, 249]."""
    return [math.ceil(k * T / n) - 1 for k in range(n, 0, -1)]


def ddim_sample(velocity_fn, noise: torch.Tensor, steps: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), v-parameterised; velocity_fn(z_tau, tau) -> u_hat. Each step predicts the clean
    sample (Eq. 1) and the noise, and re-noises it to the next, smaller tau along the same noise direction."""
    taus = ddim_timesteps(steps)
    z = noise
    for i, tau in enumerate(taus):
        ab = alpha_bar[tau]
        u_hat = velocity_fn(z, tau)
        z_hat = reconstruct(z, u_hat, ab)
        if i + 1 < len(taus):
            ab_next = alpha_bar[taus[i + 1]]
            z = ab_next.sqrt() * z_hat + (1 - ab_next).sqrt() * noise_estimate(z, u_hat, ab)
    return z_hat


def euler_sample(velocity_fn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Rectified flow's sampler (--dynamics flow): from x_0 = noise, x <- x + u_hat(x, t) / n at t = 0, 1/n, ..."""
    x = noise
    for i in range(steps):
        x = x + velocity_fn(x, i / steps) / steps
    return x


# =============================================================================================
# 5. Networks (Supp. B, Table 2)
# =============================================================================================
# All nonlinearities are tanh-approximated GELU. Parameter counts (tested exactly):
#   encoder 1,052,896 | diffusion dynamics 3,198,387 | MLP dynamics 3,603,520
#   reward 546,049 | value ensemble 592,898 | Valdi 5,390,230 | MLP baseline 5,795,363
#   (--dynamics flow: dynamics 3,168,499, total 5,360,342)
def gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class Encoder(nn.Module):
    """E_theta: frame and proprio encoded separately, fused by a LayerNorm-prefixed head."""

    def __init__(self, latent_dim: int):
        super().__init__()
        # 96 -> 32 -> 16 -> 8 -> 4 -> 1 spatially; GELU after every conv, then a linear embedding.
        self.pixels = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=3, padding=2), gelu(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), gelu(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), gelu(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), gelu(),
            nn.Conv2d(128, 256, 4, stride=1, padding=0), gelu(),
            nn.Flatten(), nn.Linear(256, 256),
        )
        self.proprio = nn.Sequential(nn.Linear(PROPRIO_DIM, 256), gelu(), nn.Linear(256, 256))
        self.head = nn.Sequential(nn.LayerNorm(512), nn.Linear(512, 512), gelu(), nn.Linear(512, latent_dim))
        # Not parameters and not saved: constants that follow the module to its device.
        self.register_buffer("rgb_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """rgb (..., 96, 96, 3) uint8, proprio (..., 7) -> z (..., latent_dim)."""
        lead = rgb.shape[:-3]
        # uint8 travels to the device (4x less traffic than float); scaling happens there.
        x = rgb.reshape(-1, *rgb.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.rgb_mean) / self.rgb_std
        h = torch.cat([self.pixels(x), self.proprio(proprio.reshape(-1, PROPRIO_DIM))], dim=-1)
        return self.head(h).reshape(*lead, -1)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)); no biases, LayerNorm with a weight only (Supp. B). No
    attention mask: each token sees the whole trajectory ("bidirectional encoder-only transformer", Sec. 3)."""

    def __init__(self, width: int = TOKEN_WIDTH, heads: int = 8, ffn: int = 512):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.norm2 = nn.LayerNorm(width, bias=False)
        self.ffn = nn.Sequential(nn.Linear(width, ffn, bias=False), gelu(), nn.Linear(ffn, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, W/heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, W))
        return x + self.ffn(self.norm2(x))


# --- the dynamics: one interface, one class per kind ----------------------------------------
# Every kind answers the same questions, and nothing else in the file (or the companions) asks which kind it is:
#   loss(z0, z_bar, actions) -> (its loss, z_hat_{1..H}, the future latents the reward and value losses see)
#   imagine(z0, actions, steps, noise) -> z_{1..H}, the imagined future; stochastic, noise_shape(batch): its noise
#   label: its name in figures and tables
# A new kind is one class, registered under the name --dynamics takes; a deterministic kind only defines forward.
DYNAMICS: dict[str, type] = {}


def register(name: str):
    """Make a dynamics class available as --dynamics NAME (and to the companion scripts)."""
    def add(cls):
        DYNAMICS[name] = cls
        return cls
    return add


class Dynamics(nn.Module):
    """The defaults of a deterministic kind: forward(z0 (B, D), actions (B, H, A)) -> the future (B, H, D), trained
    by TD-MPC's latent consistency (match the EMA targets), one future per action sequence."""
    stochastic = False  # its futures depend on sampling noise
    label = "?"

    def loss(self, z0: torch.Tensor, z_bar: torch.Tensor, actions: torch.Tensor):
        future = self(z0, actions)
        return F.mse_loss(future, z_bar), future

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise) -> torch.Tensor:
        return self(z0, actions)  # deterministic: no sampler steps, no noise


class DenoisingTransformer(Dynamics):
    """The network of Valdi's dynamics (Sec. 3): a bidirectional transformer that reads the noised future z^t_{1..H}
    conditioned on z_t, the H action chunks and the noise level t, and predicts a velocity for every future latent.
    Tokens (width 256), one per world-model step, conditioning by channel concatenation:
      token 0      = [z_t (D), learned vector (256 - D)]                       the condition
      token k=1..H = [time embedding (32), learned position k, action chunk k-1, noised latent k]
    The learned position is the only positional encoding. Subclasses embed the noise level, train and sample."""
    stochastic = True

    def __init__(self, latent_dim: int, action_dim: int, horizon: int, depth: int = 6):
        super().__init__()
        self.horizon, self.latent_dim = horizon, latent_dim
        self.make_time_embedding()  # first: a seed gives the same initial weights as it always did
        self.cond_fill = nn.Parameter(0.02 * torch.randn(TOKEN_WIDTH - latent_dim))
        self.position = nn.Parameter(
            0.02 * torch.randn(horizon, TOKEN_WIDTH - TAU_EMBED_DIM - action_dim - latent_dim))
        self.blocks = nn.ModuleList(TransformerBlock() for _ in range(depth))
        self.norm = nn.LayerNorm(TOKEN_WIDTH, bias=False)
        self.readout = nn.Linear(TOKEN_WIDTH, latent_dim, bias=False)

    def make_time_embedding(self) -> None:
        """Register the module that embeds the noise level."""
        raise NotImplementedError

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) or (1,) noise levels -> (B or 1, 32)."""
        raise NotImplementedError

    def forward(self, z0: torch.Tensor, z_noisy: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z0 (B, D), z_noisy (B, H, D), actions (B, H, A), t (B,) or (1,) -> velocity (B, H, D)."""
        B, H, _ = z_noisy.shape
        condition = torch.cat([z0, self.cond_fill.expand(B, -1)], dim=-1).unsqueeze(1)
        t_emb = self.embed_time(t).reshape(-1, 1, TAU_EMBED_DIM).expand(B, H, -1)
        future = torch.cat([t_emb, self.position.expand(B, -1, -1), actions, z_noisy], dim=-1)
        x = torch.cat([condition, future], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.norm(x[:, 1:]))  # token 0's output is discarded

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.horizon, self.latent_dim)


@register("diffusion")
class DiffusionDynamics(DenoisingTransformer):
    """D_theta of Valdi: the H future latents diffused jointly (Supp. A.2), the network predicting the velocity u
    (Eq. 7) at a discrete timestep tau, embedded by a learned Embedding(1000, 32); sampled with deterministic DDIM."""
    label = "Valdi"

    def __init__(self, latent_dim: int, action_dim: int, horizon: int, depth: int = 6):
        super().__init__(latent_dim, action_dim, horizon, depth)
        self.register_buffer("alpha_bar", linear_alpha_bar(), persistent=False)

    def make_time_embedding(self) -> None:
        self.tau_embed = nn.Embedding(DIFFUSION_T, TAU_EMBED_DIM)

    def embed_time(self, tau: torch.Tensor) -> torch.Tensor:
        return self.tau_embed(tau)

    def loss(self, z0: torch.Tensor, z_bar: torch.Tensor, actions: torch.Tensor):
        """Algorithm 1 lines 14-18: one random tau per segment, shared by its H future tokens."""
        tau = torch.randint(0, DIFFUSION_T, (z0.shape[0],), device=z0.device)
        ab = self.alpha_bar[tau].view(-1, 1, 1)
        eps = torch.randn_like(z_bar)
        z_noisy = add_noise(z_bar, eps, ab)
        u_hat = self(z0, z_noisy, actions, tau)
        # Eq. 7 writes the norm ||u - u_hat||; the published implementation realises it as the mean squared error
        # (the same minimiser; its gradient shrinks with the error, where the norm's stays of unit size).
        loss = F.mse_loss(u_hat, velocity_target(z_bar, eps, ab))
        return loss, reconstruct(z_noisy, u_hat, ab)  # Eq. 1: reward and value see denoised latents

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """z_{1..H} from the pure noise z^999 = `noise` (given: a pure function) in `steps` DDIM steps (Sec. 4)."""
        def velocity(z: torch.Tensor, tau: int) -> torch.Tensor:
            return self(z0, z, actions, torch.full((1,), tau, dtype=torch.long, device=z0.device))
        return ddim_sample(velocity, noise, steps, self.alpha_bar)


class FourierTime(nn.Module):
    """t in [0, 1] -> sin and cos of 2 pi t f, 16 frequencies f from 1 to 1000, then Linear, SiLU, Linear (32)."""

    def __init__(self, frequencies: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, 3, frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, TAU_EMBED_DIM), nn.SiLU(),
                                 nn.Linear(TAU_EMBED_DIM, TAU_EMBED_DIM))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


@register("flow")
class FlowDynamics(DenoisingTransformer):
    """Rectified flow on the same network (a third kind of the published implementation, not in
    the paper's tables): x_t = (1 - t) noise + t z on the straight line from noise (t = 0) to data
    (t = 1); the network predicts the line's velocity u = z - noise; sampling integrates it with
    Euler steps from t = 0 to 1."""
    label = "Flow"

    def make_time_embedding(self) -> None:
        self.time_embed = FourierTime()

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t)

    def loss(self, z0: torch.Tensor, z_bar: torch.Tensor, actions: torch.Tensor):
        """One t ~ U[0, 1] per segment, MSE to the velocity; reward and value see x_t + (1 - t) u_hat (cf. Eq. 1)."""
        t = torch.rand(z0.shape[0], device=z0.device)
        noise = torch.randn_like(z_bar)
        t_ = t.view(-1, 1, 1)
        x_t = (1 - t_) * noise + t_ * z_bar
        u_hat = self(z0, x_t, actions, t)
        return F.mse_loss(u_hat, z_bar - noise), x_t + (1 - t_) * u_hat

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """z_{1..H} from `noise` with `steps` Euler steps (--diffusion-steps)."""
        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            return self(z0, x, actions, torch.full((1,), t, device=z0.device))
        return euler_sample(velocity, noise, steps)


class ResidualMLP(nn.Module):
    """Linear in, n blocks x + Linear(GELU(Linear(LN(x)))) at width w (FFN 2w), Linear out; with biases. The MLP
    dynamics and the reward model (Table 2)."""

    def __init__(self, d_in: int, width: int, n_blocks: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), gelu(), nn.Linear(2 * width, width))
            for _ in range(n_blocks))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


@register("mlp")
class MLPDynamics(Dynamics):
    """The TD-MPC-style baseline, Eq. 4's z_{k+1} = D(z_k, a_k), rolled out autoregressively. D is the residual step
    z_k + f([z_k, a_k]) of the published implementation: f learns the change of the latent, which starts near zero.
    Trained and imagined by the defaults of Dynamics."""
    label = "MLP"

    def __init__(self, latent_dim: int, action_dim: int, horizon: int):
        super().__init__()
        self.f = ResidualMLP(latent_dim + action_dim, 384, 6, latent_dim)

    def forward(self, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        z, future = z0, []
        for k in range(actions.shape[1]):
            z = z + self.f(torch.cat([z, actions[:, k]], dim=-1))
            future.append(z)
        return torch.stack(future, dim=1)


class ValueEnsemble(nn.Module):
    """V_theta: two independent state-value heads (no policy prior, hence V rather than Q; Supp. A.1). Where one
    value is needed, the element-wise minimum of the two, the usual guard against overestimation (Supp. C)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(latent_dim, 512), gelu(), nn.Linear(512, 512), gelu(), nn.Linear(512, 1))
            for _ in range(2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> (2, ...) values of both heads."""
        return torch.stack([head(z).squeeze(-1) for head in self.heads])


class WorldModel(nn.Module):
    """The four TOLD components of Sec. 3: representation, dynamics, reward, value."""

    def __init__(self, args: Args):
        super().__init__()
        self.kind = args.dynamics  # the --dynamics name, for labels
        action_dim = ENV_ACTION_DIM * args.action_chunk  # 9: one world-model step = 3 env actions
        self.encoder = Encoder(args.latent_dim)
        self.dynamics = DYNAMICS[args.dynamics](args.latent_dim, action_dim, args.horizon)
        self.reward_head = ResidualMLP(args.latent_dim + action_dim, 256, 2, 1)
        self.value_heads = ValueEnsemble(args.latent_dim)

    def encode(self, rgb: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.encoder(rgb, proprio)

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, diffusion_steps: int = 1,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[z_0, z_1..z_H] (B, H+1, D) for actions (B, H, A): Valdi denoises the H future latents jointly in
        `diffusion_steps` DDIM steps from `noise` (drawn from `generator` unless given); the MLP rolls out."""
        if noise is None and self.dynamics.stochastic:
            noise = torch.randn(self.dynamics.noise_shape(z0.shape[0]), device=z0.device, generator=generator)
        return torch.cat([z0.unsqueeze(1), self.dynamics.imagine(z0, actions, diffusion_steps, noise)], dim=1)

    def reward(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """R_theta(z, a): predicted discounted reward of one action chunk, shape z.shape[:-1]."""
        return self.reward_head(torch.cat([z, actions], dim=-1)).squeeze(-1)

    def both_values(self, z: torch.Tensor) -> torch.Tensor:
        """The two value heads' estimates, (2, ...): each is trained on its own (Eq. 9)."""
        return self.value_heads(z)

    def min_value(self, z: torch.Tensor) -> torch.Tensor:
        """The smaller of the two heads: the one value used for TD targets, planning and diagnostics."""
        return self.value_heads(z).min(dim=0).values


def count_parameters(model: WorldModel) -> dict[str, int]:
    """Trainable parameters per component and in total (Supp. B)."""
    parts = {"encoder": model.encoder, "dynamics": model.dynamics, "reward": model.reward_head,
             "value": model.value_heads, "total": model}
    return {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in parts.items()}


# =============================================================================================
# 6. Losses (Supp. C, Eq. 9) and the update (Algorithm 1 lines 12-21)
# =============================================================================================
def sigreg(z: torch.Tensor, num_slices: int = 1024, num_points: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """SIGReg (Balestriero & LeCun, 2025): pushes the batch of latents towards an isotropic Gaussian, which rules
    out the collapsed solution where every frame maps to one point. The N latents are projected onto fresh random
    unit directions; on each, the empirical characteristic function is compared with the standard normal's by the
    Epps-Pulley statistic  N * integral w(t) |phi_N(t) - exp(-t^2/2)|^2 dt  over t in [0, 3] with w = exp(-t^2/2)
    (the integrand is even: the negative half folds into a doubled trapezoid weight); averaged over directions."""
    N, D = z.shape
    directions = torch.randn(D, num_slices, device=z.device, dtype=z.dtype)
    directions = directions / directions.norm(dim=0, keepdim=True)
    t = torch.linspace(0.0, t_max, num_points, device=z.device, dtype=z.dtype)
    dt = t_max / (num_points - 1)
    trapezoid = torch.full_like(t, 2 * dt)
    trapezoid[0] = trapezoid[-1] = dt
    gaussian_cf = torch.exp(-0.5 * t**2)
    tx = (z @ directions).unsqueeze(-1) * t  # (N, slices, points)
    sq_err = (tx.cos().mean(0) - gaussian_cf) ** 2 + tx.sin().mean(0) ** 2  # (slices, points)
    return N * (sq_err @ (trapezoid * gaussian_cf)).mean()


def chunk_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """(..., chunk) raw env rewards -> (...,) r0 + g r1 + g^2 r2: the reward of one WM step."""
    discounts = gamma ** torch.arange(rewards.shape[-1], device=rewards.device, dtype=rewards.dtype)
    return (rewards * discounts).sum(-1)


@torch.no_grad()
def td_targets(model: WorldModel, target: WorldModel, batch: dict, reward_target: torch.Tensor, args: Args):
    """TD targets of latents 0..H: r_k + g_wm * min(target heads)(E(s_{k+1})), frames 1..H+1 encoded by the online
    encoder. A termination (off the playfield, lap done) ends the return and masks the bootstrap; a truncation at
    600 frames does not: the car would have driven on."""
    v_next = target.min_value(model.encode(batch["rgb"][:, 1:], batch["proprio"][:, 1:]))
    return reward_target + args.gamma_wm * (~batch["terminal"]) * v_next


LOSS_NAMES = ("total", "dynamics", "reward", "value", "sigreg")
# What an update reports: compute_losses's `parts`, by name. To log one more statistic, add its value to `parts`
# and its name here: progress.csv, TensorBoard and the training-curve figure follow by name.
UPDATE_STATS = (*LOSS_NAMES, "latent_norm")


def stat_column(name: str) -> str:
    """progress.csv's column of an update statistic: loss_<name> for the terms of Eq. 9."""
    return f"loss_{name}" if name in LOSS_NAMES else name


def compute_losses(model: WorldModel, target: WorldModel, batch: dict, args: Args):
    """Eq. 9 on one batch of replay segments -> (total loss, dict of its parts). batch: rgb (B, H+2, 96, 96, 3) uint8,
    proprio (B, H+2, 7), actions (B, H+1, chunk*3), rewards (B, H+1, chunk) raw, terminal (B, H+1) bool. Frame 0
    gives z_t; frames 1..H are the dynamics targets; frames 1..H+1 bootstrap the TD targets of latents 0..H."""
    H = args.horizon
    rgb, proprio, actions = batch["rgb"], batch["proprio"], batch["actions"]
    reward_target = chunk_returns(batch["rewards"], args.gamma)  # (B, H+1)

    # Algorithm 1 line 13. Only z_t carries gradient into the encoder.
    z0 = model.encode(rgb[:, 0], proprio[:, 0])
    with torch.no_grad():
        z_bar = target.encode(rgb[:, 1:H + 1], proprio[:, 1:H + 1])  # EMA targets of the dynamics
    td_target = td_targets(model, target, batch, reward_target, args)

    # Lines 14-18: the dynamics' own loss (Valdi: Eq. 7) and its estimate of z_{1..H} (Eq. 1).
    dynamics_loss, future = model.dynamics.loss(z0, z_bar, actions[:, :H])
    trajectory = torch.cat([z0.unsqueeze(1), future], dim=1)  # (B, H+1, D)

    reward_loss = F.mse_loss(model.reward(trajectory, actions), reward_target)
    v1, v2 = model.both_values(trajectory)
    value_loss = 0.5 * (F.mse_loss(v1, td_target) + F.mse_loss(v2, td_target))
    with torch.autocast(z0.device.type, enabled=False):  # its statistics in fp32 under --precision bf16
        reg_loss = sigreg(z0.float(), args.sigreg_slices, args.sigreg_points)  # on the first latent only

    total = ((1 - args.sigreg_coef) * (args.diffusion_coef * dynamics_loss + args.reward_coef * reward_loss
                                       + args.value_coef * value_loss)
             + args.sigreg_coef * reg_loss)  # Eq. 9
    parts = {"total": total, "dynamics": dynamics_loss, "reward": reward_loss, "value": value_loss, "sigreg": reg_loss,
             # Not a loss: the mean norm of z_t, as a growing latent scale is the first sign of the representation
             # drifting (an isotropic Gaussian in 64-d has norm ~8).
             "latent_norm": z0.detach().float().norm(dim=-1).mean()}
    return total, parts


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Algorithm 1 line 21: target <- (1 - tau) target + tau online, for every parameter."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online, tau)


def optimizer_step(model: WorldModel, target: WorldModel, optimizer: torch.optim.Optimizer, args: Args) -> None:
    """Algorithm 1 lines 20-21: clip the gradient norm, take the Adam step, move the EMA target."""
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    ema_update(target, model, args.ema_tau)


def update(agent: Agent, batch: dict) -> torch.Tensor:
    """One gradient step (Algorithm 1 lines 13-21) of the agent (section 9): its losses (compute_losses) and its
    optimizer step. Returns UPDATE_STATS as one tensor, left on the device: the caller syncs once per trajectory."""
    total, parts = agent.losses(agent.model, agent.target, batch, agent.args)
    agent.optimizer.zero_grad(set_to_none=True)
    total.backward()
    agent.step(agent.model, agent.target, agent.optimizer, agent.args)
    return torch.stack([parts[name].detach() for name in UPDATE_STATS])


# =============================================================================================
# 7. Replay (Algorithm 1 line 12)
# =============================================================================================
class ReplayBuffer:
    """Whole trajectories in preallocated arrays (uint8 frames), oldest overwritten first. A sample is a segment of
    H + 2 frames one action chunk c apart (t, t+c, ..., t+c(H+1)), with the H + 1 action chunks and chunk rewards
    between them, gathered by one fancy-indexing call per array: no Python loop over samples."""

    def __init__(self, capacity: int, max_steps: int, horizon: int, chunk: int, rng: np.random.Generator):
        self.capacity, self.horizon, self.chunk, self.rng = capacity, horizon, chunk, rng
        # np.zeros asks the OS for zeroed pages that are only backed by memory once written.
        self.rgb = np.zeros((capacity, max_steps + 1, 96, 96, 3), np.uint8)
        self.proprio = np.zeros((capacity, max_steps + 1, PROPRIO_DIM), np.float32)
        self.actions = np.zeros((capacity, max_steps, ENV_ACTION_DIM), np.float32)
        self.rewards = np.zeros((capacity, max_steps), np.float32)
        self.length = np.zeros(capacity, np.int64)  # env steps; the trajectory has length+1 frames
        self.terminated = np.zeros(capacity, bool)
        self.added = 0

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, traj: dict) -> None:
        slot, n = self.added % self.capacity, len(traj["actions"])
        self.rgb[slot, : n + 1] = traj["rgb"]
        self.proprio[slot, : n + 1] = traj["proprio"]
        self.actions[slot, :n] = traj["actions"]
        self.rewards[slot, :n] = traj["rewards"]
        self.length[slot], self.terminated[slot] = n, bool(traj["terminated"])
        self.added += 1

    @property
    def span(self) -> int:
        return self.chunk * (self.horizon + 1)  # env steps covered by one segment: c (H + 1)

    def can_sample(self) -> bool:
        return bool((self.length[: len(self)] >= self.span).any())

    def sample(self, batch_size: int) -> dict:
        """Uniform trajectory, then uniform start t with t + chunk (H + 1) <= length."""
        span = self.span
        usable = np.flatnonzero(self.length[: len(self)] >= span)
        if len(usable) == 0:
            raise ValdiError(f"no trajectory in the buffer is {span} env steps long yet")
        traj = usable[self.rng.integers(len(usable), size=batch_size)]
        length = self.length[traj]
        start = (self.rng.random(batch_size) * (length - span + 1)).astype(np.int64)
        frames = start[:, None] + self.chunk * np.arange(self.horizon + 2)  # (B, H+2)
        steps = start[:, None] + np.arange(span)  # (B, c (H + 1))
        rows = traj[:, None]
        # A chunk is terminal when the trajectory ended in a termination right at its last step.
        chunk_ends = start[:, None] + self.chunk * np.arange(1, self.horizon + 2)
        B = batch_size
        return {
            "rgb": self.rgb[rows, frames],  # (B, H+2, 96, 96, 3)
            "proprio": self.proprio[rows, frames],
            "actions": self.actions[rows, steps].reshape(B, self.horizon + 1, self.chunk * ENV_ACTION_DIM),
            "rewards": self.rewards[rows, steps].reshape(B, self.horizon + 1, self.chunk),
            "terminal": self.terminated[rows] & (chunk_ends == length[:, None]),
        }


def to_device(batch: dict, device: torch.device) -> dict:
    """numpy batch -> tensors on `device`; for a GPU through pinned memory, so the copy does not block the host."""
    pin = device.type == "cuda"
    return {key: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)).to(device, non_blocking=True)
            for key, v in batch.items()}


def replay_batches(buffer: ReplayBuffer, batch_size: int, n: int, device: torch.device):
    """n batches for n updates, each gathered (and on a GPU copied) on a worker thread while the previous update runs
    (numpy's gather of ~50 MB of frames releases the GIL); drawn in order from the buffer's own generator, as without
    the worker, so that a resumed run sees the same batches."""
    def prepare():
        return to_device(buffer.sample(batch_size), device)
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(prepare)
        for i in range(n):
            batch = pending.result()
            if i + 1 < n:
                pending = worker.submit(prepare)
            yield batch


# Each trajectory is also kept as a file, from which a resumed run rebuilds the buffer (section 10).
TRAJECTORY_KEYS = ("rgb", "proprio", "actions", "rewards", "terminated", "track_seed")


def save_trajectory(path: Path, traj: dict) -> None:
    """A compressed .npz whose zip entries carry a fixed date: the same trajectory, the same bytes."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for key, value in traj.items():
                entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(entry, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    atomic_write(path, write)


def load_trajectory(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """An .npz as a dict of arrays (no pickles); a broken file, or one without `keys`, is one line."""
    try:
        with np.load(path, allow_pickle=False) as data:
            traj = {key: data[key] for key in data.files}
    except Exception as exc:
        raise ValdiError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:120]}") from None
    if missing := [key for key in keys if key not in traj]:
        raise ValdiError(f"{path} lacks {', '.join(missing)}")
    return traj


# =============================================================================================
# 8. CEM planner (Supp. D, Eq. 10)
# =============================================================================================
def trajectory_return(model: WorldModel, latents: torch.Tensor, actions: torch.Tensor, discounts: torch.Tensor):
    """Eq. 10: sum_{h<H} g^h R(z_h, a_h) + g^H min V(z_H); discounts = (g^0, ..., g^H), g = gamma^chunk."""
    H = actions.shape[1]
    return model.reward(latents[:, :H], actions) @ discounts[:H] + discounts[H] * model.min_value(latents[:, H])


def cem_search(model: WorldModel, z: torch.Tensor, sample_noise: torch.Tensor, dynamics_noise, steps: int,
               args: Args) -> torch.Tensor:
    """The CEM iterations of one plan (Supp. D) from each latent in z (B, D), given all their random draws:
    sample_noise (I, B, P, H*chunk, 3) for I iterations, dynamics_noise (I, B*P, H, D) (None for the MLP). Each
    iteration samples P action sequences, imagines their futures, scores them (Eq. 10) and refits the sampling
    distribution to the best K. Returns the best pre-tanh sequence seen, (B, H*chunk, 3); no host-device sync."""
    B, P = sample_noise.shape[1:3]
    H = args.horizon
    # Once per plan, not per iteration: the start latent of every candidate, the discounts.
    z_pop = z.unsqueeze(1).expand(B, P, -1).reshape(B * P, -1)
    discounts = args.gamma_wm ** torch.arange(H + 1, device=z.device, dtype=z.dtype)
    # Supp. F: (mu0, sigma0) = (0, 1) at every plan; no warm start from the previous plan.
    mean = torch.zeros_like(sample_noise[0, :, :1])  # (B, 1, H*chunk, 3)
    std = torch.ones_like(mean)
    best_score = torch.full((B,), -torch.inf, device=z.device)
    best = torch.zeros_like(sample_noise[0, :, 0])
    for i in range(args.cem_iters):
        samples = mean + std * sample_noise[i]
        actions = torch.tanh(samples).reshape(B * P, H, -1)  # H chunks of chunk*3
        latents = model.imagine(z_pop, actions, steps, noise=None if dynamics_noise is None else dynamics_noise[i])
        score = trajectory_return(model, latents, actions, discounts).view(B, P).float()
        elite_score, elite_idx = score.topk(args.num_elites, dim=1)  # sorted: column 0 is this iteration's best
        elites = samples.gather(1, elite_idx[:, :, None, None].expand(-1, -1, *samples.shape[2:]))
        mean = elites.mean(dim=1, keepdim=True)
        # The sample std (Bessel's correction, dividing by K - 1), as the published planner
        # refits it; the 1e-6 floor keeps a collapsed dimension sampling.
        std = elites.std(dim=1, keepdim=True) + 1e-6
        # Keep the best sample seen in any iteration, not just the last one.
        improved = elite_score[:, 0] > best_score
        best_score = torch.where(improved, elite_score[:, 0], best_score)
        best = torch.where(improved[:, None, None], elites[:, 0], best)
    return best


@torch.no_grad()
def plan(agent: Agent, z: torch.Tensor, noise_std: float = 0.0, diffusion_steps: int | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """CEM from each latent in z (B, D) with the agent's model and flags -> the planned action sequences (B, H,
    chunk*3), tanh(best + noise_std * N(0, I)), of which the first chunk is executed; the caller syncs once."""
    args, model = agent.args, agent.model
    B, P, H, c = z.shape[0], args.pop_size, args.horizon, args.action_chunk
    # Every random draw of the search, made up front in the order the iterations use them (candidates, then the
    # dynamics' noise, per iteration): the numbers drawn inside the loop, and the search becomes a pure function.
    sample_noise, dynamics_noise = [], []
    for _ in range(args.cem_iters):
        sample_noise.append(torch.randn((B, P, H * c, ENV_ACTION_DIM), device=z.device, generator=generator))
        if model.dynamics.stochastic:
            dynamics_noise.append(torch.randn(model.dynamics.noise_shape(B * P), device=z.device, generator=generator))
    best = agent.search(model, z, torch.stack(sample_noise), torch.stack(dynamics_noise) if dynamics_noise else None,
                        diffusion_steps or args.diffusion_steps, args)  # cem_search
    if noise_std > 0:  # exploration (Table 3): pre-tanh Gaussian noise on the chosen plan
        best = best + noise_std * torch.randn(best.shape, device=z.device, generator=generator)
    return torch.tanh(best).reshape(B, H, c * ENV_ACTION_DIM)


@torch.no_grad()
def encode_observation(model: WorldModel, obs: dict, device: torch.device) -> torch.Tensor:
    """One env observation -> its latent (1, D)."""
    rgb = torch.from_numpy(obs["rgb"]).to(device).unsqueeze(0)
    proprio = torch.from_numpy(obs["proprio"]).to(device).unsqueeze(0)
    return model.encode(rgb, proprio)


# =============================================================================================
# 9. Online loop (Algorithm 1, Table 3)
# =============================================================================================
@dataclass
class Agent:
    """What Algorithm 1 trains and acts with: theta, its EMA target theta_bar and Adam (lines 1-2; an evaluated agent
    has neither), and the functions that do a plan's and an update's work: this file's, or speed_up's versions."""
    args: Args
    device: torch.device
    model: WorldModel
    target: WorldModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    search: Callable = cem_search
    losses: Callable = compute_losses
    step: Callable = optimizer_step


def make_agent(args: Args, device: torch.device, model: WorldModel | None = None) -> Agent:
    """Algorithm 1 lines 1-2: theta, theta_bar (a copy that only the EMA moves) and Adam with the
    learning rate eta (Table 3). With `model` (a trained one, to evaluate): that model alone."""
    if model is not None:
        return speed_up(Agent(args, device, model.to(device)))
    torch.manual_seed(args.seed)
    model = WorldModel(args).to(device)
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    return speed_up(Agent(args, device, model, target, optimizer))


def exploration_std(trajectory: int, args: Args) -> float:
    """Table 3: pre-tanh noise 0.25 while seeding and 250 trajectories more, then linear to 0.05 over 250."""
    j = trajectory - args.seed_trajectories
    if j < args.explore_hold:
        return args.explore_std_max
    frac = 1.0 if args.explore_decay <= 0 else min(1.0, (j - args.explore_hold) / args.explore_decay)
    return args.explore_std_max + frac * (args.explore_std_min - args.explore_std_max)


def collect_trajectory(env: gym.Env, agent: Agent, noise_std: float, track_seed: int,
                       diffusion_steps: int | None = None, generator: torch.Generator | None = None,
                       on_plan=None) -> tuple[dict, dict]:
    """Algorithm 1 lines 5-9 with action chunking: plan, execute the first chunk (--action-chunk env steps), replan;
    200 plans per 600-frame episode. Returns the trajectory and its statistics. on_plan(z, actions), if given, sees
    every plan: the latent (1, D) and the planned sequence (1, H, chunk*3) (Table 1's diagnostics need them)."""
    obs, _ = env.reset(seed=track_seed)
    rgb, proprio, actions, rewards = [obs["rgb"]], [obs["proprio"]], [], []
    terminated = truncated = False
    plan_seconds, plans = 0.0, 0
    while not (terminated or truncated):
        t0 = time.perf_counter()
        z = encode_observation(agent.model, obs, agent.device)
        planned = plan(agent, z, noise_std, diffusion_steps, generator)
        chunk = planned[0, 0].view(-1, ENV_ACTION_DIM).cpu().numpy()  # the one sync per plan: action_chunk actions
        plan_seconds += time.perf_counter() - t0
        plans += 1
        if on_plan is not None:
            on_plan(z, planned)
        for action in chunk:
            obs, reward, terminated, truncated, _ = env.step(action)
            rgb.append(obs["rgb"])
            proprio.append(obs["proprio"])
            actions.append(action)
            rewards.append(reward)
            if terminated or truncated:
                break
    traj = {"rgb": np.stack(rgb), "proprio": np.stack(proprio), "actions": np.stack(actions).astype(np.float32),
            "rewards": np.asarray(rewards, np.float32), "terminated": np.bool_(terminated),
            "track_seed": np.int64(track_seed)}
    stats = {"return": float(np.sum(rewards)), "length": len(rewards), "planner_hz": plans / plan_seconds}
    return traj, stats


def learn(agent: Agent, buffer: ReplayBuffer) -> dict[str, float]:
    """Algorithm 1 lines 11-22: N updates on segments sampled uniformly from the buffer; the mean of each of
    UPDATE_STATS. A non-finite loss or weight stops the run before anything of this trajectory is saved."""
    args = agent.args
    per_update = [update(agent, batch)
                  for batch in replay_batches(buffer, args.batch_size, args.updates_per_trajectory, agent.device)]
    learned = dict(zip(UPDATE_STATS, torch.stack(per_update).mean(0).tolist()))  # the one sync of the update phase
    weights = (*agent.model.parameters(), *agent.target.parameters())
    weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in weights]).all())  # one sync for all weights
    losses_ok = all(math.isfinite(x) for x in learned.values())
    if not (losses_ok and weights_ok):
        raise FloatingPointError(f"non-finite {'weights' if losses_ok else 'loss'}",
                                 ", ".join(f"{n} {v:.4g}" for n, v in learned.items()))
    return learned


@dataclass
class Run:
    """What one iteration of Algorithm 1 hands the next: the agent, the buffer, the generator of tracks and batches,
    the counters. Its checkpoint after each trajectory holds all but the buffer (section 10): it resumes exactly."""
    args: Args
    dir: Path
    agent: Agent
    buffer: ReplayBuffer
    rng: np.random.Generator
    counters: dict
    wall_start: float = 0.0
    lock = env = progress = tensorboard = bar = None  # opened by start_run; progress: progress.csv, appended


def train(run: Run) -> None:
    """Algorithm 1 from line 3: seed trajectories planned by the untrained model, then one trajectory and N updates
    at a time, until --total-trajectories; `run` is fresh, or resumed exactly where its checkpoint left it."""
    args = run.args
    while run.counters["trajectories"] < args.total_trajectories:
        k = run.counters["trajectories"]
        noise_std = exploration_std(k, args)
        # Lines 4-9: one episode with the MPC policy on a fresh track, stored whole.
        traj, stats = collect_trajectory(run.env, run.agent, noise_std, track_seed=int(run.rng.integers(2**31 - 1)),
                                         on_plan=watch_plans(run))  # the progress bar (section 10)
        save_trajectory(run.dir / "trajectories" / f"{k:06d}.npz", traj)
        run.buffer.add(traj)
        # Lines 10-22: updates, none while seeding (Table 3: 10 seed trajectories).
        learned = learn(run.agent, run.buffer) if k >= args.seed_trajectories and run.buffer.can_sample() else {}
        finish_trajectory(run, stats, noise_std, learned)  # log it, then checkpoint


# --- speed: --compile and --precision, applied once, where the agent is built (make_agent) ----
def speed_up(agent: Agent) -> Agent:
    """The agent's work, swapped for faster versions of the same arithmetic (docs/speed.md says what is captured):
    bf16 autocast for the search and the losses; torch.compile of the whole CEM search and of the losses' forward
    pass (AOT autograd compiles its backward), on CUDA as CUDA graphs; on CUDA of the optimizer step too."""
    kind, cuda = agent.device.type, agent.device.type == "cuda"
    agent.search = faster(agent.search, kind, agent.args.precision, agent.args.compile)
    agent.losses = faster(agent.losses, kind, agent.args.precision, agent.args.compile)
    agent.step = faster(agent.step, kind, "fp32", agent.args.compile and cuda, whole=False)
    if agent.optimizer is not None:
        place_adam_state(agent.optimizer, capturable=agent.args.compile and cuda)
    return agent


@functools.cache  # one version per function and setting, shared by every agent
def faster(fn, device_type: str, precision: str, compile: bool, whole: bool = True):
    """fn under bf16 autocast and/or torch.compile. whole: captured whole (else the run stops with one line, never half
    eager), on CUDA as a CUDA graph, whose next replay reuses its outputs' memory: they are cloned. Not whole: the
    optimizer step, which torch's optimizer splits and which must not be a CUDA graph: a second graphed function called
    after the backward's graph starts a new generation of torch's CUDA-graph trees, which frees the gradients."""
    def in_bf16(*a, **kw):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*a, **kw)
    run, graphed = fn if precision == "fp32" else in_bf16, device_type == "cuda" and whole
    if not compile:
        return run
    graph = torch.compile(run, mode="reduce-overhead" if graphed else None, dynamic=False, fullgraph=whole)

    def call(*a, **kw):
        try:
            out = graph(*a, **kw)
        except torch._dynamo.exc.TorchDynamoException as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            reason = next((line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))), lines[0])
            raise ValdiError(f"--compile failed ({reason[:160]}); run with --no-compile") from None
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out) if graphed else out
    return call


def place_adam_state(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Adam's step counters with the parameters when capturable, else on the CPU, whatever wrote them."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for state in (optimizer.state[p] for p in group["params"] if torch.is_tensor(optimizer.state[p].get("step"))):
            state["step"] = state["step"].to(group["params"][0].device if capturable else "cpu", torch.float32)


# =============================================================================================
# 10. Infrastructure: device, command line, files, checkpoints, the run (not the method)
# =============================================================================================
def pick_device(cuda: bool = True) -> torch.device:
    """CUDA when present and allowed, else the CPU; "fp32" matmuls on a GPU as TF32, as cuDNN's convolutions."""
    if cuda and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda")
    return torch.device("cpu")


def has_native_bf16(device: torch.device) -> bool:
    """Emulated bf16 (older GPUs, CPUs with only AVX2) is slower than fp32: it does not count."""
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with contextlib.suppress(TypeError):  # torch < 2.3 knows no emulation and answers for the hardware
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.is_bf16_supported()


def check_device(args: Args, device: torch.device) -> None:
    """Refuse at start, in one line, what would fail mid-run: bf16 without native bf16, --compile without a compiler."""
    if args.precision == "bf16" and not has_native_bf16(device):
        raise ValdiError(f"--precision bf16: this {device.type} device has no native bfloat16 arithmetic; use fp32")
    if args.compile:
        faster(lambda x: torch.tanh(x) * 2 + 1, device.type, "fp32", True)(torch.ones(4, device=device))


# --- command line ----------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # the error alone, not argparse's whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> Args:
    """One --flag per Args field; the parser returns only the flags given, so that --resume takes
    the run's saved flags and overrides those given (but not those that fix the networks' and buffer's shapes)."""
    parser = OneLineParser(prog="valdi.py", description="Valdi: Value Diffusion World Models on CarRacing",
                           argument_default=argparse.SUPPRESS)
    kinds = ": " + ", ".join(f"{name} ({cls.label})" for name, cls in DYNAMICS.items())
    special = {"dynamics": {"choices": list(DYNAMICS)}, "precision": {"choices": ["fp32", "bf16"]},
               "resume": {"metavar": "RUN_DIR"}}
    for f in dataclasses.fields(Args):
        kw = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {"type": type(f.default)}
        text = f"{f.metadata['help']}{kinds if f.name == 'dynamics' else ''} (default: {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), help=text, **kw, **special.get(f.name, {}))
    given = vars(parser.parse_args(argv))  # handles --help and bad flags
    saved, run_dir = {}, Path(given.get("resume", ""))
    if given.get("resume"):
        run_dir = run_dir.parent if run_dir.name == CHECKPOINT_NAME else run_dir
        saved = load_checkpoint(run_dir)["args"]
        shapes = ("dynamics", "horizon", "action_chunk", "latent_dim", "max_episode_steps")
        for key in (k for k in shapes if k in given and k in saved and given[k] != saved[k]):
            raise ValdiError(f"--{key.replace('_', '-')} cannot change on --resume: {run_dir} was trained "
                             f"with {saved[key]}, not {given[key]}")
        given["resume"] = str(run_dir)
    flags = {**saved, **given}
    args = Args(**{f.name: flags.get(f.name, f.default) for f in dataclasses.fields(Args)})
    check_args(args)
    return args


def check_args(args: Args) -> None:
    """One line naming the flag, before any work: each flag's `valid` (section 2), then the rules
    across flags. Every rule says what is good, so that a NaN, which fails them all, is refused."""
    ranges = {"(0, 1]": lambda v: 0 < v <= 1, "[0, 1]": lambda v: 0 <= v <= 1,
              ">= 0": lambda v: 0 <= v < math.inf, "> 0": lambda v: 0 < v < math.inf}
    words = {">= 0": "non-negative and finite", "> 0": "positive and finite"}
    for f in (f for f in dataclasses.fields(Args) if f.metadata["valid"] is not None):
        valid, value = f.metadata["valid"], getattr(args, f.name)
        if not (value >= valid if isinstance(valid, int) else ranges[valid](value)):
            rule = f"at least {valid}" if isinstance(valid, int) else words.get(valid, f"in {valid}")
            raise ValdiError(f"--{f.name.replace('_', '-')} must be {rule}, got {value}")
    segment = args.action_chunk * (args.horizon + 1)  # env steps spanned by one replay segment
    need, have = replay_bytes(args), available_memory()
    for message, bad in [
            (f"--num-elites {args.num_elites} exceeds --pop-size {args.pop_size}", args.num_elites > args.pop_size),
            (f"--max-episode-steps {args.max_episode_steps} is shorter than one replay segment ({segment} env steps "
             f"= action chunk x (horizon + 1))", args.max_episode_steps < segment),
            (f"--max-episode-steps {args.max_episode_steps} is not a multiple of --action-chunk {args.action_chunk}",
             args.max_episode_steps % args.action_chunk),
            (diffusion_steps_error(args.diffusion_steps), not 1 <= args.diffusion_steps <= DIFFUSION_T),
            (f"--latent-dim {args.latent_dim} leaves no room in the {TOKEN_WIDTH}-wide transformer token",
             TOKEN_WIDTH - TAU_EMBED_DIM - ENV_ACTION_DIM * args.action_chunk - args.latent_dim < 1),
            (f"the replay buffer needs {need / 1e9:.1f} GB ({min(args.buffer_size, args.total_trajectories)} "
             f"trajectories of {args.max_episode_steps + 1} frames) but {(have or 0) / 1e9:.1f} GB of memory is "
             f"available: lower --buffer-size", have is not None and need > have)]:
        if bad:
            raise ValdiError(message)


def diffusion_steps_error(value) -> str:  # the one wording, in all three scripts
    return f"--diffusion-steps must be between 1 and {DIFFUSION_T} (the noise schedule's length), got {value}"


def replay_bytes(args: Args) -> int:
    """The replay buffer's memory once full: uint8 frames dominate (16.6 GB at the paper's 1000 x 601)."""
    per_trajectory = (args.max_episode_steps + 1) * (96 * 96 * 3 + 4 * PROPRIO_DIM) + args.max_episode_steps * 16 + 9
    return min(args.buffer_size, args.total_trajectories) * per_trajectory


def available_memory() -> int | None:
    """Linux's MemAvailable in bytes; None where unknown."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return None


# --- files: every write is atomic ------------------------------------------------------------
def atomic_write(path: Path, data: bytes | Callable) -> None:
    """data (or write(f)) to PATH.tmp, flushed, renamed over PATH: a crash, kill or full disk leaves
    the old file or the new one, never half of one."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ValdiError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()  # through memory: a full disk then says so, not the serializer
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def safe_torch_load(path: Path, what: str, map_location: str | torch.device = "cpu"):
    """torch.load of plain tensors only (weights_only): a file from elsewhere cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "eights only" in first or "weights_only" in first:
            first = "not a checkpoint of plain tensors (corrupt, or a pickle from elsewhere)"
        raise ValdiError(f"cannot read {what} {path}: {first[:160]}") from None


# --- checkpoints and the code that ran -------------------------------------------------------
CHECKPOINT_NAME = "checkpoint.pt"  # in RUN_DIR: the run, as of its last finished trajectory


def load_checkpoint(path: str | Path, map_location="cpu",
                    required=("args", "model", "target", "optimizer", "counters", "rng")) -> dict:
    """RUN_DIR/checkpoint.pt (or that file), read safely; any problem is one ValdiError."""
    path = Path(path) / CHECKPOINT_NAME if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise ValdiError(f"no checkpoint at {path}")
    state = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("valdi_checkpoint") != 1:
        raise ValdiError(f"{path} is not a Valdi checkpoint")
    if missing := [key for key in required if key not in state]:
        raise ValdiError(f"{path} is not a complete Valdi checkpoint (it lacks {', '.join(missing)})")
    return state


def load_weights(module: nn.Module, weights: dict, path) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError):
        raise ValdiError(f"{path}: its weights do not fit the model (other flags or another model)") from None


def code_version(path: Path = Path(__file__)) -> dict:
    """The git commit of valdi.py's checkout and whether its tracked files have uncommitted changes."""
    git = lambda *argv: subprocess.run(["git", "-C", str(Path(path).resolve().parent), *argv], capture_output=True,
                                       text=True, timeout=30, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted_changes": "unknown"}


# --- the run: fresh or resumed, its log, and main ---------------------------------------------
CSV_FIELDS = ["trajectory", "env_steps", "return", "length", "explore_std",
              *(stat_column(name) for name in UPDATE_STATS), "planner_hz", "wall_seconds"]


def save_checkpoint(run: Run) -> None:
    """Everything needed to continue, RNG states included (CUDA's: a CUDA run's own device's only)."""
    agent = run.agent
    rng = {"numpy": run.rng.bit_generator.state, "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(agent.device) if agent.device.type == "cuda" else None}
    atomic_torch_save({"valdi_checkpoint": 1, "args": dataclasses.asdict(run.args), "counters": dict(run.counters),
                       "rng": rng, "model": agent.model.state_dict(), "target": agent.target.state_dict(),
                       "optimizer": agent.optimizer.state_dict()}, run.dir / CHECKPOINT_NAME)


def start_run(args: Args) -> Run | None:
    """Everything before Algorithm 1's loop: the run, fresh or as its checkpoint left it (RNG states, Adam, the buffer
    from the files of the trajectories it counts; any later one is collected again, identically), its log, signals."""
    state = load_checkpoint(args.resume) if args.resume else None
    if state and state["counters"]["trajectories"] >= args.total_trajectories:  # finished: write nothing
        print(f"valdi.py: nothing to do: {args.resume} has {state['counters']['trajectories']} of "
              f"{args.total_trajectories} trajectories; raise --total-trajectories to continue", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.cuda)
    check_device(args, device)
    run_dir, rng = Path(args.resume) if args.resume else new_run_dir(args), np.random.default_rng(args.seed)
    run = Run(args, run_dir, make_agent(args, device), ReplayBuffer(min(args.buffer_size, args.total_trajectories),
              args.max_episode_steps, args.horizon, args.action_chunk, rng), rng,
              counters={"trajectories": 0, "env_steps": 0, "updates": 0, "wall_seconds": 0.0})
    run.lock, rows, code = lock_run_dir(run_dir), [], []
    if state:
        agent, buffer, done = run.agent, run.buffer, int(state["counters"]["trajectories"])
        for module, key in ((agent.model, "model"), (agent.target, "target"), (agent.optimizer, "optimizer")):
            load_weights(module, state[key], run_dir / CHECKPOINT_NAME)
        place_adam_state(agent.optimizer, capturable=args.compile and device.type == "cuda")
        for group in agent.optimizer.param_groups:  # a learning rate given with --resume wins
            group["lr"] = args.lr
        run.counters.update(state["counters"])
        buffer.added = max(0, done - buffer.capacity)  # trajectory k goes to ring slot k % capacity
        for path in (run_dir / "trajectories" / f"{k:06d}.npz" for k in range(buffer.added, done)):
            if not path.is_file():
                raise ValdiError(f"{path} is missing: the replay buffer needs it to resume (restore it from a backup)")
            traj = load_trajectory(path, TRAJECTORY_KEYS)
            n = len(traj["actions"])
            if n > args.max_episode_steps or traj["rgb"].shape[0] != n + 1 or traj["proprio"].shape != (n + 1, 7):
                raise ValdiError(f"{path} does not hold a trajectory of at most {args.max_episode_steps} steps")
            buffer.add(traj)
        rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and torch.is_tensor(state["rng"].get("cuda")):  # bit-exact on the same device kind
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(run_dir / "progress.csv") as f:
            rows = [r for r in csv.DictReader(f) if None not in r.values() and int(r["trajectory"] or done) < done]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            code = list(json.loads((run_dir / "args.json").read_text())["code"])
        print(f"resumed {run_dir} after trajectory {done - 1} ({run.counters['updates']} updates)", file=sys.stderr)
    changed = {k: v for k, v in dataclasses.asdict(args).items() if state and state["args"].get(k) != v}
    code.append({**code_version(), "from_trajectory": run.counters["trajectories"], "flags_changed": changed})
    atomic_write(run_dir / "args.json", json.dumps({**dataclasses.asdict(args), "code": code}, indent=2).encode())
    if not state:
        save_checkpoint(run)  # resumable from the first moment: a kill before trajectory 0 loses nothing
    table, header = io.StringIO(), dict(zip(CSV_FIELDS, CSV_FIELDS))  # the header, written as a row
    csv.DictWriter(table, CSV_FIELDS, extrasaction="ignore", lineterminator="\n").writerows([header, *rows])
    atomic_write(run_dir / "progress.csv", table.getvalue().encode())  # the rows the checkpoint counts; more appended
    from torch.utils.tensorboard import SummaryWriter  # imported here: importing valdi stays light
    from tqdm import tqdm
    run.progress = open(run_dir / "progress.csv", "a", newline="")
    run.tensorboard = SummaryWriter(str(run_dir), purge_step=run.counters["trajectories"] or None)
    run.env = make_env(args, video_dir=run_dir / "videos" if args.capture_video else None,
                       first_trajectory=run.counters["trajectories"])
    sizes = count_parameters(run.agent.model)
    print(f"device {device} | dynamics {args.dynamics} | trainable parameters {sizes.pop('total'):,} "
          + " ".join(f"({k} {v:,})" for k, v in sizes.items()) + f"\nrun directory {run_dir}")
    run.bar = tqdm(total=args.total_trajectories, initial=run.counters["trajectories"], unit="traj", desc="trajectory",
                   dynamic_ncols=True, mininterval=1, bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<"
                   "{remaining}, {rate_fmt}{postfix}]")  # plans move it by fractions of a trajectory
    run.wall_start = time.time() - run.counters["wall_seconds"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    return run


def new_run_dir(args: Args) -> Path:
    run_dir = Path(args.runs_dir) / f"{args.exp_name}__{args.dynamics}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        (run_dir / "trajectories").mkdir(parents=True)  # a second run started in the same second is refused
    except OSError as exc:
        raise ValdiError(f"cannot create a run directory in --runs-dir {args.runs_dir}: {exc.strerror}") from None
    return run_dir


def lock_run_dir(run_dir: Path):
    """Own RUN_DIR while this process lives (an exclusive lock on RUN_DIR/lock, which holds our pid): a second
    valdi.py on it is refused before it touches a file; the OS drops a killed process's lock, so a resume takes over."""
    f = open(run_dir / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise ValdiError(f"{run_dir} is in use by process {f.read().strip() or 'unknown'} (another valdi.py); "
                         f"wait for it or stop it first") from None
    except OSError as exc:  # ENOSYS, ENOLCK, EOPNOTSUPP: no locks on this file system (Lustre without -o flock)
        raise ValdiError(f"{run_dir}: its file system has no file locks ({exc.strerror}); use a --runs-dir on one "
                         f"that has them") from None
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)
    return f


def finish_trajectory(run: Run, stats: dict, noise_std: float, learned: dict) -> None:
    """Count the trajectory, log its row (progress.csv, TensorBoard), then checkpoint: from that
    moment it is done, and a resume starts after it."""
    k, counters = run.counters["trajectories"], run.counters
    counters["trajectories"] += 1
    counters["env_steps"] += stats["length"]
    counters["updates"] += run.args.updates_per_trajectory if learned else 0
    counters["wall_seconds"] = time.time() - run.wall_start
    row = {"trajectory": k, "env_steps": counters["env_steps"], "return": stats["return"], "length": stats["length"],
           "explore_std": noise_std, **{stat_column(name): learned.get(name, "") for name in UPDATE_STATS},
           "planner_hz": stats["planner_hz"], "wall_seconds": counters["wall_seconds"]}
    csv.DictWriter(run.progress, CSV_FIELDS, lineterminator="\n").writerow(row)
    run.progress.flush()
    for key, value in ((key, value) for key, value in row.items() if key != "trajectory" and value != ""):
        run.tensorboard.add_scalar(f"losses/{key[5:]}" if key.startswith("loss_") else f"charts/{key}", value, k)
    run.bar.set_postfix(ret=f"{stats['return']:.1f}", hz=f"{stats['planner_hz']:.1f}")
    run.bar.update(counters["trajectories"] - run.bar.n)  # to the whole trajectory, however many plans it had
    save_checkpoint(run)


def watch_plans(run: Run) -> Callable:
    """collect_trajectory's on_plan in training: each plan moves the bar by its share of a trajectory, and the second
    plan this process makes prints one line: the run's length projected from the time between its first two plans."""
    args, times = run.args, []
    plans = args.max_episode_steps // args.action_chunk  # per trajectory, unless the car leaves the playfield
    duration = lambda s: next((f"{s / n:.1f} {unit}" for unit, n in (("days", 86400), ("h", 3600), ("min", 60))
                               if s >= 1.5 * n), f"{s:.1f} s")

    def on_plan(z, planned):
        times.append(time.perf_counter())
        run.bar.update(run.counters["trajectories"] + len(times) / (plans + 1) - run.bar.n)  # short of the next
        if len(times) == 2 and run.bar.n < run.bar.initial + 1:
            each, left = times[1] - times[0], args.total_trajectories - run.counters["trajectories"]
            run.bar.write(f"valdi.py: projection from the first plans: a plan and its {args.action_chunk} env steps "
                          f"every {each:.2f} s, so {duration(each * plans)} a trajectory ({plans} plans) and "
                          f"{duration(each * plans * left)} for the {left} left, before their updates"
                          + ("; over a day: see the README's 'A CPU-sized run'" if each * plans * left > 86400 else ""),
                          file=sys.stderr)
    return on_plan


def interrupt(signum, frame):
    """Ctrl-C or SIGTERM: stop (the checkpoint is on disk); a second one, while the files close, is ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    handlers, run = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}, None
    try:
        run = start_run(parse_args(argv))
        if run is not None:  # None: nothing to do
            train(run)
            print(f"done: {run.dir}")
        return 0
    except (ValdiError, OSError) as exc:  # bad input, or a disk that fails: one line
        print(f"valdi.py: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, KeyboardInterrupt) as exc:
        if run is None:  # before the loop: nothing of the run is lost
            print("valdi.py: interrupted", file=sys.stderr)
            return 130
        run.bar.close()
        ckpt = run.dir / CHECKPOINT_NAME  # what it holds, read from it: a stop may come in the middle of saving it
        k = int(load_checkpoint(ckpt, required=("counters",))["counters"]["trajectories"])
        held = f"{ckpt} holds the run up to trajectory {k - 1}" if k else f"{ckpt} holds no finished trajectory yet"
        print(f"valdi.py: {exc.args[0]} after trajectory {k} ({exc.args[1]}); stopped before saving them: {held}"
              if isinstance(exc, FloatingPointError) else
              f"\ninterrupted during trajectory {k}: {held}; continue with: python valdi.py --resume {run.dir}",
              file=sys.stderr)
        return 1 if isinstance(exc, FloatingPointError) else 130
    finally:
        for part in (run.bar, run.tensorboard, run.progress, run.env, run.lock) if run else ():  # the lock last
            if part is not None:
                part.close()
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # interrupted: stay deaf until exit
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
