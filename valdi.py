"""Valdi: Value Diffusion World Models -- a single-file reference implementation.

Read this file beside the paper (Lindenberg & Chitta, "Valdi: Value Diffusion World Models").
It follows the paper's order, top to bottom:

    1. Constants ........ the shapes the paper fixes
    2. Flags ............ every hyperparameter of Table 3, defaults equal to the paper; the
                          speed switches (--compile, --precision) that wrap the method
    3. Environment ...... the modified CarRacing of Supp. E (pixels + the band's 7 readings)
    4. Diffusion ........ linear schedule, v-parameterisation, Eq. 1, DDIM sampler (Supp. A.2)
    5. Networks ......... encoder; the dynamics interface with its kinds (Valdi's diffusion
                          transformer, the MLP baseline, rectified flow); reward; value (Supp. B)
    6. Losses ........... Eq. 9 with SIGReg, Algorithm 1 lines 13-21 (Supp. C)
    7. Replay ........... whole trajectories, segments of H + 2 frames one action chunk apart
    8. Planner .......... CEM over action chunks, Eq. 10 (Supp. D)
    9. Online loop ...... Algorithm 1 from line 1: build, then collect a trajectory and do N
                          updates, until done (Supp. F)
   10. Infrastructure ... command line, atomic files, checkpoints, exact resume (not the method)

Valdi is TD-MPC with one change: the deterministic MLP that rolls the latent state forward is
replaced by a diffusion transformer that denoises the whole H-step latent future at once,
conditioned on the current latent and the action sequence. Everything else (encoder, reward,
value, CEM planning in latent space, online training) is the TD-MPC recipe. `--dynamics mlp`
swaps the baseline back in, with every other component identical; a new kind of dynamics is
one registered class (section 5).

Run `python valdi.py --help` for the flags. Importing this module does no work: the companion
scripts (decoder.py, eval_diagnostics.py) import its pieces.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
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
def flag(default, help):
    """A dataclass field that carries its own --help line."""
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- the run ---
    dynamics: str = flag("diffusion", "latent dynamics: 'diffusion' (Valdi), 'mlp' (the TD-MPC-like baseline) or "
                                      "'flow' (rectified flow on Valdi's transformer)")
    seed: int = flag(1, "seed of torch, numpy and the training tracks")
    cuda: bool = flag(True, "use CUDA when it is available (--no-cuda forces the CPU)")
    threads: int = flag(0, "torch CPU threads for the whole process (0: torch's default, one per core)")
    compile: bool = flag(False, "torch.compile the planner's scoring and the update step (on CUDA with CUDA graphs)")
    precision: str = flag("fp32", "fp32, or bf16: bfloat16 autocast for planning and updates (losses, SIGReg, "
                                  "EMA and Adam state stay fp32)")
    exp_name: str = flag("valdi", "name prefix of the run directory")
    capture_video: bool = flag(False, "record training episodes to RUN_DIR/videos (gymnasium's RecordVideo)")
    video_every: int = flag(50, "with --capture-video, record every Nth training trajectory")
    runs_dir: str = flag("runs", "parent folder of run directories")
    resume: str = flag("", "continue the run in this RUN_DIR from its checkpoint.pt")
    # --- online loop (Algorithm 1, Table 3) ---
    total_trajectories: int = flag(5000, "trajectories to collect in all, seed trajectories included")
    seed_trajectories: int = flag(10, "trajectories planned by the untrained model before any update")
    max_episode_steps: int = flag(600, "env frames per episode before truncation (Supp. E)")
    updates_per_trajectory: int = flag(60, "gradient updates after each collected trajectory")
    batch_size: int = flag(256, "replay segments per update")
    buffer_size: int = flag(1000, "replay capacity in trajectories (uniform sampling)")
    # --- world model (Supp. B, D) ---
    horizon: int = flag(5, "planning horizon H in world-model steps")
    action_chunk: int = flag(3, "env steps per world-model step (action chunking, Supp. D)")
    gamma: float = flag(0.99, "discount per env step; a world-model step discounts by gamma**chunk")
    latent_dim: int = flag(64, "size of the latent state z")
    # --- CEM planner (Supp. D) ---
    pop_size: int = flag(512, "CEM population (candidate action sequences)")
    num_elites: int = flag(64, "CEM elites the sampling distribution is refit to")
    cem_iters: int = flag(10, "CEM iterations per plan")
    diffusion_steps: int = flag(1, "DDIM steps used to imagine futures when planning (inference only)")
    # --- optimisation (Eq. 9, Table 3) ---
    lr: float = flag(3e-4, "Adam learning rate")
    grad_clip: float = flag(10.0, "gradient-norm clip")
    ema_tau: float = flag(0.005, "EMA coefficient of the target network (Algorithm 1 line 21)")
    diffusion_coef: float = flag(1.0, "lambda_diff: weight of the dynamics loss")
    reward_coef: float = flag(0.01, "lambda_rew: weight of the reward loss")
    value_coef: float = flag(0.01, "lambda_val: weight of the TD value loss")
    sigreg_coef: float = flag(0.05, "lambda_reg: weight of SIGReg on the first latent")
    sigreg_slices: int = flag(1024, "SIGReg random projection directions")
    sigreg_points: int = flag(17, "SIGReg integration points t in [0, 3]")
    # --- exploration (Table 3): pre-tanh Gaussian noise on the executed plan ---
    explore_std_max: float = flag(0.25, "exploration std during seeding and the hold phase")
    explore_std_min: float = flag(0.05, "exploration std after the decay")
    explore_hold: int = flag(250, "trajectories (after seeding) at explore_std_max")
    explore_decay: int = flag(250, "trajectories of linear decay to explore_std_min")

    @property
    def gamma_wm(self) -> float:
        """The discount of one world-model step: gamma ** action_chunk (Supp. D, Eq. 10)."""
        return self.gamma ** self.action_chunk


class ValdiError(Exception):
    """A problem with the user's input; reported as one line, never as a traceback."""


# --- speed switches: --compile and --precision wrap the eager code, never change it ---------
_COMPILED: dict = {}


def compiled(fn, args: Args, device: torch.device, fullgraph: bool = True):
    """fn itself, or with --compile fn through torch.compile, built once per function and device
    kind. fullgraph: fn is captured whole or the run stops with one line, never half eager.
    On CUDA the mode is 'reduce-overhead', which records CUDA graphs: a plan's search, or an
    update's parts, then replay as a few graphs instead of hundreds of small launches. A replay
    reuses the memory of the previous replay's outputs, so on CUDA the outputs are cloned."""
    if not args.compile:
        return fn
    cuda_graphs = device.type == "cuda"
    key = (fn, cuda_graphs)
    if key not in _COMPILED:
        graph = torch.compile(fn, mode="reduce-overhead" if cuda_graphs else None, dynamic=False, fullgraph=fullgraph)

        def call(*a, **kw):
            try:
                out = graph(*a, **kw)
            except torch._dynamo.exc.TorchDynamoException as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
                reason = next((line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))), lines[0])
                raise ValdiError(f"--compile failed here ({reason[:160]}); run with --no-compile") from None
            return clone_tensors(out) if cuda_graphs else out
        _COMPILED[key] = call
    return _COMPILED[key]


def clone_tensors(out):
    """Copies of the tensors in a (nested) tuple, list or dict; anything else as it is."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: clone_tensors(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(clone_tensors(v) for v in out)
    return out


def autocast(args: Args, device: torch.device):
    """--precision bf16: matmuls and convolutions in bfloat16; parameters, optimizer state and
    the ops autocast keeps in fp32 (losses, softmax, norms) stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def capturable(args: Args, device: torch.device) -> bool:
    """Adam keeps its step counter on the GPU, as CUDA graphs (--compile on CUDA) need."""
    return args.compile and device.type == "cuda"


# =============================================================================================
# 3. Environment (Supp. E)
# =============================================================================================
# CarRacing draws speed, wheel spin, steering and gyro as bars in the bottom 12 rows of its
# 96x96 frame. Valdi splits the two modalities (Supp. E): the band is blacked out of the image
# and its 7 bars are handed to the agent as numbers instead. The numbers are the bars' lengths
# read from the band's own pixels before it is blacked out, which is exactly what the paper's
# agent saw. They are bounded by the band (speed and wheels within about [0, 2], steering about
# [-1, 1], gyro about [-2.8, 2.8]); the simulator's raw car state would carry the same signal
# unbounded and 2-4x larger, which inflates the latents and destabilises online training.
INDICATOR_BAND_START = 84
RED, GREEN, BLUE = 0, 1, 2  # channels of a frame


def band_readout(frame: np.ndarray) -> np.ndarray:
    """The 7 bar lengths of CarRacing's indicator band, from a raw (96, 96, 3) uint8 frame.

    Vertical bars grow upwards in one pixel column of rows 84..93: speed (red, column 12) and
    the four wheels' ABS spin (blue, columns 18, 20, 22, 24). Horizontal bars grow left or right
    from a centre in row 88: steering (green, right of column 48 minus left of it) and the
    gyroscope (red, right of column 72 minus left of it). Summing a bar's channel over its
    pixels and dividing by 255 counts its lit pixels; the divisors put the bars near unit scale."""
    f = frame.astype(np.float32) / 255.0
    vertical = f[84:94]  # rows of the vertical bars
    row = f[88]  # the row of the horizontal bars
    speed = vertical[:, 12, RED].sum() / 5
    wheels = vertical[:, 18:26:2, BLUE].sum(axis=0) / 5  # columns 18, 20, 22, 24
    steering = (row[48:58, GREEN].sum() - row[38:48, GREEN].sum()) / 10
    gyro = (row[72:86, RED].sum() - row[58:72, RED].sum()) / 5
    return np.array([speed, *wheels, steering, gyro], dtype=np.float32)


class ValdiCarRacing(gym.ObservationWrapper):
    """CarRacing-v3 with observation {'rgb': (96, 96, 3) uint8, band zeroed; 'proprio': (7,)}."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Dict({
            "rgb": gym.spaces.Box(0, 255, (96, 96, 3), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (PROPRIO_DIM,), np.float32),
        })

    def observation(self, frame: np.ndarray) -> dict:
        proprio = band_readout(frame)  # read the band before it is blacked out
        rgb = frame.copy()
        rgb[INDICATOR_BAND_START:] = 0
        return {"rgb": rgb, "proprio": proprio}


def make_env(args: Args, render_mode: str | None = None, video_dir: Path | None = None,
             first_trajectory: int = 0) -> gym.Env:
    """The modified CarRacing: continuous actions, truncated at --max-episode-steps (600, not
    1000). Actions in [-1, 1]^3 go in unchanged: CarRacing clips gas to [0, 1] itself and
    treats a negative brake as no brake, so the planner needs no per-dimension squashing.
    With video_dir, every --video-every-th trajectory is recorded there as the full-size view
    (as cleanRL's --capture-video); the episodes this env plays are trajectories
    first_trajectory, first_trajectory + 1, ... of the run, which the file names count from."""
    env = gym.make("CarRacing-v3", continuous=True, max_episode_steps=args.max_episode_steps,
                   render_mode="rgb_array" if video_dir else render_mode)
    env.action_space.seed(args.seed)
    if video_dir:
        env = gym.wrappers.RecordVideo(env, str(video_dir), name_prefix=f"from-trajectory-{first_trajectory:06d}",
                                       episode_trigger=lambda e: (first_trajectory + e) % args.video_every == 0,
                                       disable_logger=True)
    return ValdiCarRacing(env)


# =============================================================================================
# 4. Diffusion helpers (Supp. A.2)
# =============================================================================================
def linear_alpha_bar(T: int = DIFFUSION_T, beta_1: float = 1e-4, beta_T: float = 2e-2) -> torch.Tensor:
    """Eq. 8: beta linear from 1e-4 to 2e-2, alpha_bar = cumprod(1 - beta). Index tau in 0..T-1,
    where index 0 is already one step of noise. Computed in float64, stored in float32."""
    betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(z: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward noising z^tau = sqrt(ab) z + sqrt(1 - ab) eps (Algorithm 1 line 15)."""
    return alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps


def velocity_target(z: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v-parameterisation u = sqrt(ab) eps - sqrt(1 - ab) z (Algorithm 1 line 16; Salimans & Ho).
    Unlike eps-prediction it stays well-conditioned at tau = 999, where one-step sampling starts."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z


def reconstruct(z_noisy: torch.Tensor, u_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the one-step denoised estimate z_hat = sqrt(ab) z^tau - sqrt(1 - ab) u_hat."""
    return alpha_bar.sqrt() * z_noisy - (1 - alpha_bar).sqrt() * u_hat


def noise_estimate(z_noisy: torch.Tensor, u_hat: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps_hat = sqrt(1 - ab) z^tau + sqrt(ab) u_hat: the noise implied by the same prediction."""
    return (1 - alpha_bar).sqrt() * z_noisy + alpha_bar.sqrt() * u_hat


def ddim_timesteps(n: int, T: int = DIFFUSION_T) -> list[int]:
    """tau_k = ceil(k T / n) - 1 for k = n..1: n=1 -> [999], n=2 -> [999, 499], n=4 -> [999, 749, 499, 249]."""
    return [-(-k * T // n) - 1 for k in range(n, 0, -1)]


def ddim_sample(velocity_fn, noise: torch.Tensor, steps: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) in the v-parameterisation. velocity_fn(z_tau, tau) -> u_hat.
    Each step predicts the clean sample (Eq. 1) and the noise; the last step returns the clean
    estimate, earlier ones re-noise it to the next, smaller tau along the same noise direction."""
    taus = ddim_timesteps(steps)
    z = noise
    for i, tau in enumerate(taus):
        ab = alpha_bar[tau]
        u_hat = velocity_fn(z, tau)
        z_hat = reconstruct(z, u_hat, ab)
        if i == len(taus) - 1:
            return z_hat
        ab_next = alpha_bar[taus[i + 1]]
        z = ab_next.sqrt() * z_hat + (1 - ab_next).sqrt() * noise_estimate(z, u_hat, ab)
    raise ValueError("steps must be >= 1")


def euler_sample(velocity_fn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The sampler of rectified flow (the --dynamics flow alternative): from x_0 = noise, Euler
    steps x <- x + u_hat(x, t) / n at t = 0, 1/n, ..., (n-1)/n, ending at t = 1 (data)."""
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
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)). No biases anywhere, LayerNorm with a
    weight only (Supp. B). No attention mask: the H future latents are denoised jointly, each
    token sees the whole trajectory ("bidirectional encoder-only transformer", Sec. 3)."""

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
# Every kind of latent dynamics answers the same questions, and nothing else in the file (or in
# the companion scripts) asks which kind it is:
#   loss(z0, z_bar, actions) -> (dynamics loss, z_hat_{1..H})  training: the loss of this kind and
#       the estimate of the future latents that the reward and value losses see (Algorithm 1
#       lines 14-18 for Valdi)
#   sample(z0, actions, steps, noise) -> z_{1..H}               planning: the imagined future
#   noise_shape(batch)                                          the noise sample() starts from
#                                                               (None for a deterministic kind)
#   stochastic, label                                           for evaluations and figures
# A new kind is one class with these, registered under the name --dynamics takes.
DYNAMICS: dict[str, type] = {}


def register(name: str):
    """Make a dynamics class available as --dynamics NAME (and to the companion scripts)."""
    def add(cls):
        DYNAMICS[name] = cls
        return cls
    return add


class DenoisingTransformer(nn.Module):
    """The network of Valdi's dynamics (Sec. 3, "Dynamics"): a bidirectional transformer that
    reads the noised future z^t_{1..H} conditioned on z_t, the H action chunks and the noise
    level t, and predicts a velocity for every future latent. Tokens (width 256), one per
    world-model step, conditioning by channel concatenation:
      token 0      = [z_t (D), learned vector (256 - D)]                       the condition
      token k=1..H = [time embedding (32), learned position k, action chunk k-1, noised latent k]
    The learned per-position vector is the only positional encoding. Subclasses say how the
    noise level is embedded, how the network is trained and how it is sampled."""
    stochastic = True  # its futures depend on the sampling noise
    label = "?"  # the name figures and tables give it

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

    def forward(self, z0: torch.Tensor, z_noisy: torch.Tensor, actions: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
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
    """D_theta of Valdi: the H future latents diffused jointly (Supp. A.2), the network trained
    to predict the velocity u of the v-parameterisation (Eq. 7) at a discrete timestep tau,
    embedded by a learned Embedding(1000, 32); sampled with deterministic DDIM."""
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
        # Eq. 7 writes the loss as the norm ||u - u_hat||; the mean squared error is how it is
        # realised, as in the published implementation (the same minimiser; its gradient shrinks
        # with the error, where the norm's stays of unit size).
        loss = F.mse_loss(u_hat, velocity_target(z_bar, eps, ab))
        return loss, reconstruct(z_noisy, u_hat, ab)  # Eq. 1: reward and value see denoised latents

    def sample(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """Imagine z_{1..H} from the pure noise z^999 = `noise` with `steps` deterministic DDIM
        steps (Sec. 4). The noise comes in from outside, so that this is a pure function."""
        def velocity(z: torch.Tensor, tau: int) -> torch.Tensor:
            return self(z0, z, actions, torch.full((1,), tau, dtype=torch.long, device=z0.device))
        return ddim_sample(velocity, noise, steps, self.alpha_bar)


class FourierTime(nn.Module):
    """A continuous time t in [0, 1] -> 32 features: sin and cos of 2 pi t f for 16 frequencies
    f log-spaced from 1 to 1000, then Linear(32, 32), SiLU, Linear(32, 32)."""

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
    label = "flow"

    def make_time_embedding(self) -> None:
        self.time_embed = FourierTime()

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t)

    def loss(self, z0: torch.Tensor, z_bar: torch.Tensor, actions: torch.Tensor):
        """One flow time t ~ U[0, 1] per segment; MSE to the velocity; reward and value see the
        one-step estimate z_hat = x_t + (1 - t) u_hat (the analogue of Eq. 1)."""
        t = torch.rand(z0.shape[0], device=z0.device)
        noise = torch.randn_like(z_bar)
        t_ = t.view(-1, 1, 1)
        x_t = (1 - t_) * noise + t_ * z_bar
        u_hat = self(z0, x_t, actions, t)
        return F.mse_loss(u_hat, z_bar - noise), x_t + (1 - t_) * u_hat

    def sample(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """Imagine z_{1..H} from `noise` with `steps` Euler steps (--diffusion-steps)."""
        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            return self(z0, x, actions, torch.full((1,), t, device=z0.device))
        return euler_sample(velocity, noise, steps)


class ResidualMLP(nn.Module):
    """Linear in -> n blocks of x + Linear(GELU(Linear(LN(x)))) at width w (FFN 2w) -> Linear out.
    Used for the MLP dynamics baseline and for the reward model (Table 2); all layers have biases."""

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
class MLPDynamics(nn.Module):
    """The TD-MPC-style baseline, Eq. 4's z_{k+1} = D(z_k, a_k), rolled out autoregressively.
    D is realised as a residual step z_k + f([z_k, a_k]), as in the published implementation: f
    learns the change of the latent, which starts near zero. One future per action sequence."""
    stochastic = False  # no sampling noise: one future per action sequence
    label = "MLP"

    def __init__(self, latent_dim: int, action_dim: int, horizon: int):
        super().__init__()
        self.f = ResidualMLP(latent_dim + action_dim, 384, 6, latent_dim)

    def forward(self, z0: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z0 (B, D), actions (B, H, A) -> z_{1..H} (B, H, D)."""
        z, future = z0, []
        for k in range(actions.shape[1]):
            z = z + self.f(torch.cat([z, actions[:, k]], dim=-1))
            future.append(z)
        return torch.stack(future, dim=1)

    def loss(self, z0: torch.Tensor, z_bar: torch.Tensor, actions: torch.Tensor):
        """TD-MPC's latent consistency: roll out from z_t, match the EMA targets."""
        future = self(z0, actions)
        return F.mse_loss(future, z_bar), future

    def sample(self, z0: torch.Tensor, actions: torch.Tensor, steps: int, noise) -> torch.Tensor:
        return self(z0, actions)  # deterministic: no steps, no noise

    def noise_shape(self, batch: int) -> None:
        return None


class ValueEnsemble(nn.Module):
    """V_theta: two independent state-value heads (no policy prior, hence V rather than Q;
    Supp. A.1). Wherever one value is needed we take the element-wise minimum of the two,
    the usual guard against overestimation (Supp. C)."""

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
        self.horizon = args.horizon
        action_dim = ENV_ACTION_DIM * args.action_chunk  # 9: one world-model step = 3 env actions
        self.encoder = Encoder(args.latent_dim)
        self.dynamics = DYNAMICS[args.dynamics](args.latent_dim, action_dim, args.horizon)
        self.reward_head = ResidualMLP(args.latent_dim + action_dim, 256, 2, 1)
        self.value_heads = ValueEnsemble(args.latent_dim)

    def encode(self, rgb: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.encoder(rgb, proprio)

    def imagine(self, z0: torch.Tensor, actions: torch.Tensor, diffusion_steps: int = 1,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent trajectory [z_0, z_1..z_H] (B, H+1, D) for actions (B, H, A). Valdi denoises
        the H future latents jointly with `diffusion_steps` DDIM steps; the MLP rolls out."""
        return self.rollout(z0, actions, diffusion_steps, self.sampling_noise(z0, generator))

    def sampling_noise(self, z0: torch.Tensor, generator: torch.Generator | None = None):
        """The pure noise a stochastic dynamics samples from, (B, H, D); None for a deterministic one."""
        shape = self.dynamics.noise_shape(z0.shape[0])
        return None if shape is None else torch.randn(shape, device=z0.device, generator=generator)

    def rollout(self, z0: torch.Tensor, actions: torch.Tensor, diffusion_steps: int, noise) -> torch.Tensor:
        """imagine() with its randomness given: a pure function of its inputs."""
        future = self.dynamics.sample(z0, actions, diffusion_steps, noise)
        return torch.cat([z0.unsqueeze(1), future], dim=1)

    def reward(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """R_theta(z, a): predicted discounted reward of one action chunk, shape z.shape[:-1]."""
        return self.reward_head(torch.cat([z, actions], dim=-1)).squeeze(-1)

    def values(self, z: torch.Tensor) -> torch.Tensor:
        """Both value heads, (2, ...)."""
        return self.value_heads(z)

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """min over the two heads: the one value used for TD targets, planning and diagnostics."""
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
    """SIGReg (Balestriero & LeCun, 2025): pushes the batch of latents towards an isotropic
    Gaussian, which rules out the collapsed solution where every frame maps to one point.

    Project the N latents onto fresh random unit directions; on each 1-D projection compare the
    empirical characteristic function with the standard normal's, exp(-t^2/2), by the
    Epps-Pulley statistic  N * integral w(t) |phi_N(t) - exp(-t^2/2)|^2 dt  over t in [0, 3]
    (the integrand is even, so the negative half folds into a doubled trapezoid weight),
    weighted by exp(-t^2/2). Averaged over directions."""
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
def td_targets(model: WorldModel, target: WorldModel, batch: dict, reward_target: torch.Tensor,
               args: Args) -> torch.Tensor:
    """TD targets of latents 0..H: r_k + g_wm * min(target heads)(E(s_{k+1})), frames 1..H+1
    encoded by the online encoder, no gradient. A termination (off the playfield, lap done) ends
    the return, so it masks the bootstrap; a truncation at 600 frames does not: the car would
    have driven on, and its value is still there to bootstrap from."""
    v_next = target.value(model.encode(batch["rgb"][:, 1:], batch["proprio"][:, 1:]))
    return reward_target + args.gamma_wm * (~batch["terminal"]) * v_next


LOSS_NAMES = ("total", "dynamics", "reward", "value", "sigreg")
# What an update reports: compute_losses's `parts`, by name. To log one more statistic, add its
# value to `parts` and its name here: progress.csv, TensorBoard and the plots follow by name.
UPDATE_STATS = (*LOSS_NAMES, "latent_norm")


def stat_column(name: str) -> str:
    """progress.csv's column of an update statistic: loss_<name> for the terms of Eq. 9."""
    return f"loss_{name}" if name in LOSS_NAMES else name


def compute_losses(model: WorldModel, target: WorldModel, batch: dict, args: Args):
    """Eq. 9 on one batch of replay segments. Returns (total loss, dict of its parts).

    batch: rgb (B, H+2, 96, 96, 3) uint8, proprio (B, H+2, 7), actions (B, H+1, chunk*3),
    rewards (B, H+1, chunk) raw, terminal (B, H+1) bool. Frame 0 gives z_t; frames 1..H are the
    dynamics targets; frames 1..H+1 bootstrap the TD targets of latents 0..H.
    """
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
    v1, v2 = model.values(trajectory)
    value_loss = 0.5 * (F.mse_loss(v1, td_target) + F.mse_loss(v2, td_target))
    with torch.autocast(z0.device.type, enabled=False):  # its statistics in fp32 under --precision bf16
        reg_loss = sigreg(z0.float(), args.sigreg_slices, args.sigreg_points)  # on the first latent only

    total = ((1 - args.sigreg_coef) * (args.diffusion_coef * dynamics_loss + args.reward_coef * reward_loss
                                       + args.value_coef * value_loss)
             + args.sigreg_coef * reg_loss)  # Eq. 9
    parts = {"total": total, "dynamics": dynamics_loss, "reward": reward_loss, "value": value_loss,
             "sigreg": reg_loss,
             # Not a loss: the mean norm of z_t, logged because a growing latent scale is the first
             # sign of the representation drifting (an isotropic Gaussian in 64-d has norm ~8).
             "latent_norm": z0.detach().float().norm(dim=-1).mean()}
    return total, parts


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Algorithm 1 line 21: target <- (1 - tau) target + tau online, for every parameter."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online, tau)


def forward_losses(model: WorldModel, target: WorldModel, batch: dict, args: Args):
    """compute_losses in the run's precision (--precision bf16: the forward passes only)."""
    with autocast(args, batch["rgb"].device):
        return compute_losses(model, target, batch, args)


def apply_gradients(model: WorldModel, target: WorldModel, optimizer: torch.optim.Optimizer, args: Args) -> None:
    """Algorithm 1 lines 20-21: clip the gradient norm, take the Adam step, move the EMA target."""
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    ema_update(target, model, args.ema_tau)


def update(model: WorldModel, target: WorldModel, optimizer: torch.optim.Optimizer, batch: dict,
           args: Args) -> torch.Tensor:
    """One gradient step (Algorithm 1 lines 13-21). Returns UPDATE_STATS as one tensor, left
    on the device so the caller syncs once per trajectory rather than once per update.
    What --compile (section 2) captures: the forward pass as one whole graph, and with it
    (AOT autograd) its backward, which backward() runs; then, on CUDA, the gradient clip, the
    Adam step and the EMA, split into separate graphs only where torch's Optimizer.step breaks
    the graph around itself on purpose. zero_grad runs eagerly between them (it only drops
    references). On a CPU the step stays eager: compiling Adam over the model's parameter
    tensors took 71 s (cold) on this project's 2-core machine, and what it would gain there is
    unmeasured; on CUDA it is what lets the step replay as CUDA graphs."""
    device = batch["rgb"].device
    total, parts = compiled(forward_losses, args, device)(model, target, batch, args)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    step = compiled(apply_gradients, args, device, fullgraph=False) if device.type == "cuda" else apply_gradients
    step(model, target, optimizer, args)
    return torch.stack([parts[name].detach() for name in UPDATE_STATS])


# =============================================================================================
# 7. Replay (Algorithm 1 line 12)
# =============================================================================================
class ReplayBuffer:
    """Whole trajectories in preallocated arrays (uint8 frames), oldest overwritten first.

    A sample is a segment of H + 2 frames spaced one action chunk c apart (t, t+c, ...,
    t+c(H+1)), the H + 1 action chunks and chunk rewards between them. Batches are gathered with
    one fancy-indexing call per array: no Python loop over samples."""

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
    """numpy batch -> tensors on `device`. For a GPU the arrays are first copied into pinned
    (page-locked) memory, from which the copy to the GPU runs without blocking the host."""
    pin = device.type == "cuda"
    return {key: (torch.from_numpy(value).pin_memory() if pin else torch.from_numpy(value)).to(device, non_blocking=True)
            for key, value in batch.items()}


def replay_batches(buffer: ReplayBuffer, batch_size: int, n: int, device: torch.device):
    """n batches for n updates. Each is gathered (and on a GPU pinned and copied) on a worker
    thread while the previous update runs, since numpy's gather of ~50 MB of frames releases the
    GIL. The batches are drawn one after the other from the buffer's own generator, exactly as
    without the worker, so a run and its resumed continuation see the same batches."""
    def prepare():
        return to_device(buffer.sample(batch_size), device)
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(prepare)
        for i in range(n):
            batch = pending.result()
            if i + 1 < n:
                pending = worker.submit(prepare)
            yield batch


# =============================================================================================
# 8. CEM planner (Supp. D, Eq. 10)
# =============================================================================================
def trajectory_return(model: WorldModel, latents: torch.Tensor, actions: torch.Tensor,
                      discounts: torch.Tensor) -> torch.Tensor:
    """Eq. 10: sum_{h<H} g^h R(z_h, a_h) + g^H min V(z_H), with discounts = (g^0, ..., g^H) and
    g = gamma^chunk the discount of one world-model step."""
    H = actions.shape[1]
    return model.reward(latents[:, :H], actions) @ discounts[:H] + discounts[H] * model.value(latents[:, H])


def score_population(model: WorldModel, z_pop: torch.Tensor, samples: torch.Tensor, noise,
                     discounts: torch.Tensor, steps: int) -> torch.Tensor:
    """Eq. 10 for every candidate of the population: pre-tanh samples (B, P, H*chunk, 3) ->
    actions -> imagined latents (Valdi: denoised from `noise`) -> discounted return (B*P,).
    The bulk of a plan's work. It sets no grad mode of its own: plan() calls it under inference
    mode (eager) or no_grad (compiled), because torch.compile cannot trace a function that
    enters inference mode itself."""
    H = discounts.shape[0] - 1
    actions = torch.tanh(samples).reshape(z_pop.shape[0], H, -1)  # H chunks of chunk*3
    latents = model.rollout(z_pop, actions, steps, noise)
    return trajectory_return(model, latents, actions, discounts)


def cem_search(model: WorldModel, z_pop: torch.Tensor, sample_noise: torch.Tensor, dynamics_noise,
               discounts: torch.Tensor, steps: int, num_elites: int, score_fn=score_population) -> torch.Tensor:
    """The CEM iterations of one plan (Supp. D), given all their random draws: sample_noise
    (I, B, P, H*chunk, 3) standard normal for I iterations, dynamics_noise (I, B*P, H, D) for
    Valdi's sampler or None. Returns the best pre-tanh sequence seen, (B, H*chunk, 3).
    A pure function of its inputs, with no host-device sync: --compile captures it whole."""
    B, P = sample_noise.shape[1:3]
    # Supp. F: (mu0, sigma0) = (0, 1) at every plan; no warm start from the previous plan.
    mean = torch.zeros_like(sample_noise[0, :, :1])  # (B, 1, H*chunk, 3)
    std = torch.ones_like(mean)
    best_score = torch.full((B,), -torch.inf, device=z_pop.device)
    best = torch.zeros_like(sample_noise[0, :, 0])
    for i in range(sample_noise.shape[0]):
        samples = mean + std * sample_noise[i]
        noise = None if dynamics_noise is None else dynamics_noise[i]
        score = score_fn(model, z_pop, samples, noise, discounts, steps).view(B, P).float()
        elite_score, elite_idx = score.topk(num_elites, dim=1)  # sorted: column 0 is this iteration's best
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


def plan(model: WorldModel, z: torch.Tensor, args: Args, noise_std: float = 0.0,
         diffusion_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """CEM from each latent in z (B, D). Returns the planned action sequences (B, H, chunk*3)
    in [-1, 1]: tanh(best + noise_std * N(0, I)). The agent executes the first chunk.

    Everything stays on the device: the population is sampled, imagined, scored, ranked and
    refit without a single host-device synchronisation; the caller syncs once on the result."""
    # No gradients in planning. torch.compile's AOT autograd refuses to trace under inference
    # mode, so the compiled planner runs under no_grad (in eager, inference mode is a little faster).
    with torch.no_grad() if args.compile else torch.inference_mode(), autocast(args, z.device):
        B, D = z.shape
        P, H, c = args.pop_size, args.horizon, args.action_chunk
        steps = diffusion_steps or args.diffusion_steps
        # Once per plan, not per iteration: the start latent for every candidate, the discounts.
        z_pop = z.unsqueeze(1).expand(B, P, D).reshape(B * P, D)
        discounts = args.gamma_wm ** torch.arange(H + 1, device=z.device, dtype=z.dtype)
        # Every random draw of the search, made up front in the order the iterations use them
        # (candidates, then Valdi's sampling noise, per iteration): the same numbers as drawing
        # them inside the loop, and the search itself becomes a pure function.
        draws = [(torch.randn((B, P, H * c, ENV_ACTION_DIM), device=z.device, generator=generator),
                  model.sampling_noise(z_pop, generator)) for _ in range(args.cem_iters)]
        sample_noise = torch.stack([candidates for candidates, _ in draws])
        dynamics_noise = None if draws[0][1] is None else torch.stack([noise for _, noise in draws])
        # --compile (section 2): on CUDA the whole search is one graph, replayed as one CUDA graph
        # per plan; on a CPU, where a kernel launch costs nothing and compile time grows with the
        # unrolled iterations, each iteration's scoring is compiled instead.
        whole = z.device.type == "cuda"
        search = compiled(cem_search, args, z.device) if whole else cem_search
        score_fn = score_population if whole else compiled(score_population, args, z.device)
        best = search(model, z_pop, sample_noise, dynamics_noise, discounts, steps, args.num_elites, score_fn)
        if noise_std > 0:  # exploration (Table 3): pre-tanh Gaussian noise on the chosen plan
            best = best + noise_std * torch.randn(best.shape, device=z.device, generator=generator)
        return torch.tanh(best).reshape(B, H, c * ENV_ACTION_DIM)


def encode_observation(model: WorldModel, obs: dict, device: torch.device) -> torch.Tensor:
    """One env observation -> its latent (1, D)."""
    with torch.inference_mode():
        rgb = torch.from_numpy(obs["rgb"]).to(device).unsqueeze(0)
        proprio = torch.from_numpy(obs["proprio"]).to(device).unsqueeze(0)
        return model.encode(rgb, proprio)


# =============================================================================================
# 9. Online loop (Algorithm 1, Table 3)
# =============================================================================================
def build_agent(args: Args, device: torch.device) -> tuple[WorldModel, WorldModel, torch.optim.Optimizer]:
    """Algorithm 1 lines 1-2: the online network theta, its EMA target theta_bar (a copy that
    only the EMA moves), and Adam with the learning rate eta (Table 3)."""
    torch.manual_seed(args.seed)
    model = WorldModel(args).to(device)
    target = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                 capturable=capturable(args, device))
    return model, target, optimizer


def exploration_std(trajectory: int, args: Args) -> float:
    """Table 3: pre-tanh noise 0.25 while seeding and for the next 250 trajectories, then linear
    to 0.05 over 250 trajectories, then 0.05."""
    j = trajectory - args.seed_trajectories
    if j < args.explore_hold:
        return args.explore_std_max
    frac = 1.0 if args.explore_decay <= 0 else min(1.0, (j - args.explore_hold) / args.explore_decay)
    return args.explore_std_max + frac * (args.explore_std_min - args.explore_std_max)


def collect_trajectory(env: gym.Env, model: WorldModel, args: Args, device: torch.device,
                       noise_std: float, track_seed: int, diffusion_steps: int | None = None,
                       generator: torch.Generator | None = None, on_plan=None) -> tuple[dict, dict]:
    """Algorithm 1 lines 5-9 with action chunking: plan, execute the first chunk (--action-chunk
    env steps), replan; 200 plans per 600-frame episode at the paper's settings. Returns the
    trajectory and its statistics. on_plan(z, actions), if given, sees every plan: the latent (1, D) and the whole planned
    sequence (1, H, chunk*3) the agent acted on (the value diagnostics of Table 1 need them)."""
    obs, _ = env.reset(seed=track_seed)
    rgb, proprio, actions, rewards = [obs["rgb"]], [obs["proprio"]], [], []
    terminated = truncated = False
    plan_seconds, plans = 0.0, 0
    while not (terminated or truncated):
        t0 = time.perf_counter()
        z = encode_observation(model, obs, device)
        planned = plan(model, z, args, noise_std, diffusion_steps, generator)
        chunk = planned[0, 0].view(args.action_chunk, ENV_ACTION_DIM).cpu().numpy()  # the one sync per plan
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


# Lines 3-23 need somewhere to keep what one iteration hands the next: the networks, the buffer,
# the generators and the counters. The Run holds them; section 10 saves and restores it.
CHECKPOINT_NAME = "checkpoint.pt"  # in RUN_DIR: the run, as of its last finished trajectory


@dataclass
class Run:
    """The state of one training run. Its checkpoint, written after every trajectory's updates,
    holds all of it except the replay buffer, which is rebuilt from the trajectory files; so a
    run stopped at any moment and resumed is the same run (see resume_run)."""
    args: Args
    dir: Path
    device: torch.device
    model: WorldModel
    target: WorldModel
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    rng: np.random.Generator
    counters: dict
    rows: list  # progress.csv rows so far, as written
    env: gym.Env | None  # made by start_run, once the run knows which trajectory comes next
    lock: object = None  # the open RUN_DIR/lock while this process owns the run
    wall_start: float = 0.0

    def trajectory_path(self, k: int) -> Path:
        return self.dir / "trajectories" / f"{k:06d}.npz"


def learn(run: Run) -> dict[str, float]:
    """Algorithm 1 lines 11-22: N updates on segments sampled uniformly from the replay buffer.
    Returns the mean of each of UPDATE_STATS over them; stops the run, before anything is saved,
    if a loss or a weight is no longer finite."""
    args = run.args
    per_update = []
    for batch in replay_batches(run.buffer, args.batch_size, args.updates_per_trajectory, run.device):
        per_update.append(update(run.model, run.target, run.optimizer, batch, args))
    run.counters["updates"] += len(per_update)
    learned = dict(zip(UPDATE_STATS, torch.stack(per_update).mean(0).tolist()))  # the one sync of the update phase
    losses_ok = all(math.isfinite(x) for x in learned.values())
    # One host sync for all weights, not one per tensor.
    weights_ok = bool(torch.stack([torch.isfinite(p).all() for p in (*run.model.parameters(),
                                                                     *run.target.parameters())]).all())
    if not (losses_ok and weights_ok):
        k = run.counters["trajectories"]
        raise FloatingPointError(
            f"non-finite {'weights' if losses_ok else 'loss'} after trajectory {k} "
            f"({', '.join(f'{n} {v:.4g}' for n, v in learned.items())}); stopped before saving "
            f"them: {run.dir / CHECKPOINT_NAME} holds the run up to trajectory {k - 1}")
    return learned


def train(args: Args) -> Path:
    """Algorithm 1: seed trajectories planned by the untrained model, then alternate one
    trajectory and N updates. Returns RUN_DIR."""
    run, log = start_run(args)  # fresh, or resumed exactly where its checkpoint left it
    try:
        while run.counters["trajectories"] < args.total_trajectories:
            k = run.counters["trajectories"]
            noise_std = exploration_std(k, args)
            # Lines 4-9: one episode with the MPC policy on a fresh track, stored whole.
            traj, stats = collect_trajectory(run.env, run.model, args, run.device, noise_std,
                                             track_seed=int(run.rng.integers(2**31 - 1)))
            save_trajectory(run.trajectory_path(k), traj)
            run.buffer.add(traj)
            # Lines 10-22: updates, none while seeding (Table 3: 10 seed trajectories).
            learned = learn(run) if k >= args.seed_trajectories and run.buffer.can_sample() else None
            finish_trajectory(run, log, stats, noise_std, learned)  # log it, then checkpoint
    except KeyboardInterrupt:
        k = run.counters["trajectories"]
        log.bar.close()
        print(f"\ninterrupted during trajectory {k}: {run.dir / CHECKPOINT_NAME} holds the run up to "
              f"trajectory {k - 1}; continue with: python valdi.py --resume {run.dir}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        log.close()
        run.env.close()
        if run.lock is not None:
            run.lock.close()  # the run directory is free for the next valdi.py
    return run.dir


# =============================================================================================
# 10. Infrastructure: command line, files, checkpoints, the run
# =============================================================================================
# Not part of the method: the command line, files, checkpoints and the bookkeeping that lets a
# run of many hours survive Ctrl-C, kill -9 and full disks, and resume as the same run.


# --- command line ----------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; we print the error alone."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """One --flag per Args field. With suppress_defaults, only flags given on the command line
    appear in the result (used by --resume to know what the user overrides)."""
    parser = OneLineParser(
        prog="valdi.py",
        description="Valdi: Value Diffusion World Models on CarRacing (online training).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    for f in dataclasses.fields(Args):
        name = "--" + f.name.replace("_", "-")
        kwargs = {"help": f.metadata["help"]}
        if not suppress_defaults:
            kwargs["default"] = f.default
        if isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "dynamics":
            parser.add_argument(name, choices=list(DYNAMICS), **kwargs)
        elif f.name == "precision":
            parser.add_argument(name, choices=["fp32", "bf16"], **kwargs)
        elif f.name == "resume":
            parser.add_argument(name, metavar="RUN_DIR", **kwargs)
        else:
            parser.add_argument(name, type=type(f.default), **kwargs)
    return parser


# Flags that fix the shapes of the networks and of the replay buffer: a resumed run keeps them.
SHAPE_FLAGS = ("dynamics", "horizon", "action_chunk", "latent_dim", "max_episode_steps")


def parse_args(argv: list[str] | None = None) -> Args:
    """Flags -> Args. With --resume, the run's saved flags are the base and only the flags
    given on this command line override them; the flags that fix shapes must not change."""
    args = Args(**vars(build_parser().parse_args(argv)))  # handles --help and bad flags
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    if args.resume:
        run_dir = resolve_run_dir(args.resume)
        saved = dict(load_checkpoint(run_dir)["args"])
        for key in SHAPE_FLAGS:
            if key in given and key in saved and given[key] != saved[key]:
                raise ValdiError(f"--{key.replace('_', '-')} cannot change on --resume: {run_dir} was trained "
                                 f"with {saved[key]}, not {given[key]}")
        saved.update(given, resume=str(run_dir))
        args = Args(**{f.name: saved.get(f.name, f.default) for f in dataclasses.fields(Args)})
    check_args(args)
    return args


def check_args(args: Args) -> None:
    """Refuse bad or inconsistent settings before any work starts, naming the flag. Every check is
    written as 'not (good)' so that a NaN, which fails every comparison, is refused too."""
    def refuse(key: str, rule: str):
        raise ValdiError(f"--{key.replace('_', '-')} must be {rule}, got {getattr(args, key)}")

    # Two elites at least: the planner refits a sample std, which divides by K - 1.
    at_least = {"total_trajectories": 1, "seed_trajectories": 1, "max_episode_steps": 1,
                "updates_per_trajectory": 1, "batch_size": 1, "buffer_size": 1, "horizon": 1,
                "action_chunk": 1, "latent_dim": 1, "pop_size": 1, "num_elites": 2, "cem_iters": 1,
                "sigreg_slices": 1, "sigreg_points": 2, "seed": 0, "threads": 0,
                "explore_hold": 0, "explore_decay": 0, "video_every": 1}
    for key, low in at_least.items():
        if not getattr(args, key) >= low:
            refuse(key, f"at least {low}")
    for key in ("gamma", "lr"):  # a discount and a step size: (0, 1]
        if not 0 < getattr(args, key) <= 1:
            refuse(key, "in (0, 1]")
    for key in ("ema_tau", "sigreg_coef"):  # Eq. 9 weighs the task losses by 1 - lambda_reg
        if not 0 <= getattr(args, key) <= 1:
            refuse(key, "in [0, 1]")
    for key in ("diffusion_coef", "reward_coef", "value_coef", "explore_std_max", "explore_std_min"):
        if not 0 <= getattr(args, key) < math.inf:
            refuse(key, "non-negative and finite")
    if not 0 < args.grad_clip < math.inf:
        refuse("grad_clip", "positive and finite")
    segment = args.action_chunk * (args.horizon + 1)  # env steps spanned by one replay segment
    problems = [
        (args.dynamics not in DYNAMICS, f"unknown dynamics {args.dynamics!r} ({', '.join(DYNAMICS)})"),
        (args.precision not in ("fp32", "bf16"), f"unknown precision {args.precision!r} (fp32 or bf16)"),
        (args.num_elites > args.pop_size, f"--num-elites {args.num_elites} exceeds --pop-size {args.pop_size}"),
        (args.max_episode_steps < segment,
         f"--max-episode-steps {args.max_episode_steps} is shorter than one replay segment "
         f"({segment} env steps = action chunk x (horizon + 1))"),
        (args.max_episode_steps % args.action_chunk != 0,
         f"--max-episode-steps {args.max_episode_steps} is not a multiple of --action-chunk {args.action_chunk}"),
        (not 1 <= args.diffusion_steps <= DIFFUSION_T, diffusion_steps_error(args.diffusion_steps)),
        (TOKEN_WIDTH - TAU_EMBED_DIM - ENV_ACTION_DIM * args.action_chunk - args.latent_dim < 1,
         f"--latent-dim {args.latent_dim} leaves no room in the {TOKEN_WIDTH}-wide transformer token"),
    ]
    for bad, message in problems:
        if bad:
            raise ValdiError(message)
    need, have = replay_bytes(args), available_memory()
    if have is not None and need > have:
        raise ValdiError(f"the replay buffer needs {need / 1e9:.1f} GB ({min(args.buffer_size, args.total_trajectories)} "
                         f"trajectories of {args.max_episode_steps + 1} frames) but {have / 1e9:.1f} GB of memory is "
                         f"available: lower --buffer-size")


def diffusion_steps_error(value) -> str:
    """The one wording of the sampler's step limit, in all three scripts."""
    return f"--diffusion-steps must be between 1 and {DIFFUSION_T} (the noise schedule's length), got {value}"


def replay_bytes(args: Args) -> int:
    """Memory the replay buffer fills once it holds min(--buffer-size, --total-trajectories)
    trajectories: uint8 frames dominate (96 * 96 * 3 bytes each, 16.6 GB at the paper's 1000 x 601)."""
    frames = args.max_episode_steps + 1
    per_trajectory = (frames * (96 * 96 * 3 + 4 * PROPRIO_DIM)
                      + args.max_episode_steps * 4 * (ENV_ACTION_DIM + 1) + 8 + 1)
    return min(args.buffer_size, args.total_trajectories) * per_trajectory


def available_memory() -> int | None:
    """Bytes of memory the OS can still give us (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pick_device(cuda: bool = True) -> torch.device:
    """CUDA when present and allowed (--cuda, the default), else CPU: the same code runs on both.
    --no-cuda never touches CUDA. On a GPU, "fp32" matmuls run as TF32 (10-bit mantissa inputs,
    fp32 accumulation) on Ampere and later, as cuDNN's convolutions do by default: results
    record it (float32_matmul_precision) so that they are not mixed with true fp32 ones."""
    if cuda and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model as Linux reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def device_record(device: torch.device) -> dict:
    """What an evaluation ran on: the device, its name, and how fp32 matmuls were computed."""
    return {"device": device.type, "device_name": device_name(device),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def check_device(args: Args, device: torch.device) -> None:
    """Refuse at start what would fail mid-run: bf16 where the device has none, and --compile
    where torch.compile cannot build anything (no C++ compiler, an unsupported platform)."""
    if args.precision == "bf16" and not has_native_bf16(device):
        raise ValdiError(f"--precision bf16: this {device.type} device has no native bfloat16 arithmetic; use fp32")
    if args.compile:
        try:
            torch.compile(lambda x: torch.tanh(x) * 2 + 1)(torch.ones(4, device=device))
        except Exception as exc:  # whatever the toolchain raises, the advice is the same
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ValdiError(f"--compile does not work on this machine ({reason}); run with --no-compile") from None


def has_native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 natively. Emulated bf16 (older GPUs, CPUs with
    only AVX2) is slower than fp32, so it does not count."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 knows no emulation and answers for the hardware
            return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# --- files: every write is atomic ------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside `path`, flush it to disk, then rename it over `path`.
    A crash, a kill or a full disk at any moment leaves either the old file or the new one, never
    half of one, and no temporary file behind (a kill -9 can leave one; resume removes it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ValdiError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def write_json(path: Path, data) -> Path:
    """Atomic JSON; NaN and infinity, which JSON lacks, become null."""
    def plain(x):
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (float, np.floating)):
            return float(x) if math.isfinite(x) else None
        if isinstance(x, np.integer):
            return int(x)
        return str(x) if isinstance(x, Path) else x
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValdiError(f"cannot write {path}: {exc.strerror or exc}") from None
    atomic_write(path, lambda f: f.write(json.dumps(plain(data), indent=2).encode()))
    return Path(path)


def result_path(path: Path, settings: dict) -> tuple[Path, dict | None]:
    """Where a result measured with `settings` goes, and the stored result there (or None).
    PATH when it is free or holds a result of the same settings; otherwise beside it, named
    after the settings that differ (returns__1ep_15f.json): a stored result is never replaced
    by one measured differently. Settings are compared as JSON would store them."""
    plain = lambda v: json.loads(json.dumps(v))
    settings = {k: plain(v) for k, v in settings.items()}

    def stored(p):
        try:
            return json.loads(Path(p).read_text())
        except (OSError, ValueError):
            raise ValdiError(f"cannot read {p}: not a result file (move it away to write here)") from None
    if not path.exists():
        return path, None
    old = stored(path)
    if all(old.get(k) == v for k, v in settings.items()):
        return path, old
    differing = [k for k, v in settings.items() if old.get(k) != v]
    if "device" in differing:  # the device's kind says enough
        differing = [k for k in differing if k not in ("device_name", "float32_matmul_precision")]
    label = "_".join(setting_label(k, settings[k]) for k in differing)
    for n in range(1, 1000):
        candidate = path.with_name(f"{path.stem}__{label}{'' if n == 1 else f'_{n}'}{path.suffix}")
        if not candidate.exists():
            return candidate, None
        other = stored(candidate)
        if all(other.get(k) == v for k, v in settings.items()):
            return candidate, other
    raise ValdiError(f"too many results beside {path}")


def setting_label(key: str, value) -> str:
    """A short file-name part for one setting of a result."""
    if key == "track_seeds":
        return f"{len(value)}ep"
    if key == "planner" and isinstance(value, dict):
        return f"{value.get('pop_size')}x{value.get('num_elites')}x{value.get('cem_iters')}"
    text = "-".join(str(v) for v in value) if isinstance(value, list) else str(value)
    unit = {"frames": "f", "wm_steps": "wm", "num_states": "states", "diffusion_steps": "steps", "seed": "seed",
            "num_starts": "starts", "num_futures": "futures"}.get(key, "")
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text + unit)[:40]


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through memory, so that a failing disk shows its own error (a full disk says
    "No space left on device") rather than the serializer's."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def safe_torch_load(path: Path, what: str, map_location: str | torch.device = "cpu"):
    """torch.load with weights_only=True: tensors and plain containers only, so a file from
    elsewhere cannot run code. Any failure (truncated file, foreign pickle) is one ValdiError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first or "Weights only" in first:
            first = "not a checkpoint of plain tensors (corrupt, or a pickle from elsewhere)"
        raise ValdiError(f"cannot read {what} {path}: {first[:160]}") from None


TRAJECTORY_KEYS = ("rgb", "proprio", "actions", "rewards", "terminated", "track_seed")


def save_trajectory(path: Path, traj: dict) -> None:
    """One finished trajectory as a compressed .npz, written once and atomically. The zip entries
    carry a fixed date, so the same trajectory always gives the same bytes (a resumed run can be
    compared with an uninterrupted one file by file)."""
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as archive:
            for key, value in traj.items():
                entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                entry.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(entry, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    atomic_write(path, write)


def load_trajectory(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """An .npz as a dict of arrays (no pickles). A truncated or foreign file, or one without
    `keys`, is one ValdiError naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            traj = {key: data[key] for key in data.files}
    except Exception as exc:
        raise ValdiError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:120]}") from None
    missing = [key for key in keys if key not in traj]
    if missing:
        raise ValdiError(f"{path} lacks {', '.join(missing)}")
    return traj


# --- checkpoints -----------------------------------------------------------------------------
CHECKPOINT_KEYS = ("args", "model", "target", "optimizer", "counters", "rng")


def resolve_run_dir(path: str | Path) -> Path:
    """--resume takes RUN_DIR or RUN_DIR/checkpoint.pt."""
    path = Path(path)
    return path.parent if path.name == CHECKPOINT_NAME and path.is_file() else path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """Read RUN_DIR/checkpoint.pt (or a .pt path) safely (weights_only). Any problem is one
    clear ValdiError. Evaluation needs only the flags and the model (`required`), so a file of
    just those two, a tenth of the size, is a usable run too."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise ValdiError(not_a_run(path))
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValdiError(f"no checkpoint at {path}")
    if path.suffix == ".npz":
        raise ValdiError(f"{path} is a trajectory file, not a run: give its run directory ({path.parent.parent})")
    state = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("valdi_checkpoint") != 1:
        raise ValdiError(f"{path} is not a Valdi checkpoint")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValdiError(f"{path} is not a complete Valdi checkpoint (it lacks {', '.join(missing)})")
    return state


def not_a_run(folder: Path) -> str:
    """What a folder without a checkpoint is, and which run directory was probably meant."""
    if (folder.parent / CHECKPOINT_NAME).is_file():  # RUN/decoder, RUN/eval, RUN/trajectories
        return f"{folder} is a folder inside a run, not a run: give the run directory {folder.parent}"
    runs = sorted(p.parent.name for p in folder.glob(f"*/{CHECKPOINT_NAME}"))
    if runs:
        return f"{folder} is a folder of runs, not a run: give one of them, e.g. {folder / runs[0]}"
    return f"no checkpoint at {folder / CHECKPOINT_NAME} (expected a run directory made by valdi.py)"


def args_from_checkpoint(state: dict) -> Args:
    return Args(**{f.name: state["args"].get(f.name, f.default) for f in dataclasses.fields(Args)})


def load_weights(module: nn.Module, weights: dict, path) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError):
        raise ValdiError(f"{path}: its weights do not fit the model (other flags or another model)") from None


def load_run(path: str | Path, device: torch.device | str = "cpu", dynamics: str | None = None):
    """Load a run's checkpoint for evaluation: returns (args, model). With `dynamics`, refuse a
    checkpoint of the other kind."""
    state = load_checkpoint(path, map_location=device, required=("args", "model"))
    args = args_from_checkpoint(state)
    if dynamics is not None and args.dynamics != dynamics:
        raise ValdiError(f"{path} holds a '{args.dynamics}' model, not '{dynamics}'")
    model = WorldModel(args).to(device)
    load_weights(model, state["model"], path)
    return args, model.eval()


def save_checkpoint(run: Run) -> None:
    """Everything needed to continue, RNG states included, written atomically."""
    state = {
        "valdi_checkpoint": 1,
        "args": dataclasses.asdict(run.args),
        "model": run.model.state_dict(),
        "target": run.target.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "counters": dict(run.counters),
        # The run's own device's generator only: a CPU run never initialises CUDA, and a run
        # saved with 8 GPUs visible resumes with one.
        "rng": {"numpy": run.rng.bit_generator.state, "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None},
    }
    atomic_torch_save(state, run.dir / CHECKPOINT_NAME)


def code_version(path: Path = Path(__file__)) -> dict:
    """Which code ran a run: the git commit of the checkout holding valdi.py and whether its
    tracked files had uncommitted changes; "unknown" for both outside git (or without git)."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(Path(path).resolve().parent), *argv], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted_changes": "unknown"}


def code_history(run: Run) -> list[dict]:
    """args.json's record of the code that ran this run: one entry per code version, each with
    the first trajectory it ran. A resume from the same commit adds nothing; from another one,
    or with uncommitted changes, adds an entry, so the earlier code stays on record."""
    history = []
    if run.args.resume:
        try:
            history = json.loads((run.dir / "args.json").read_text()).get("code", [])
        except (OSError, ValueError, AttributeError):
            pass
        if not (isinstance(history, list) and all(isinstance(entry, dict) for entry in history)):
            history = []
    now = code_version()
    if not history or {k: history[-1].get(k) for k in now} != now or now["uncommitted_changes"] is not False:
        history = [*history, {**now, "from_trajectory": int(run.counters["trajectories"])}]
    return history


# --- the run: fresh or resumed, and its log --------------------------------------------------
CSV_FIELDS = ["trajectory", "env_steps", "return", "length", "explore_std",
              *(stat_column(name) for name in UPDATE_STATS), "planner_hz", "wall_seconds"]


def new_run(args: Args, device: torch.device, run_dir: Path | None = None) -> Run:
    """Fresh networks and Adam (build_agent, Algorithm 1 line 1), an empty buffer, and one numpy
    generator for the tracks and replay sampling."""
    model, target, optimizer = build_agent(args, device)
    rng = np.random.default_rng(args.seed)
    buffer = ReplayBuffer(min(args.buffer_size, args.total_trajectories), args.max_episode_steps,
                          args.horizon, args.action_chunk, rng)
    counters = {"trajectories": 0, "env_steps": 0, "updates": 0, "wall_seconds": 0.0}
    run_dir = run_dir or new_run_dir(args)
    lock = lock_run_dir(run_dir)
    return Run(args, run_dir, device, model, target, optimizer, buffer, rng, counters, rows=[], env=None, lock=lock)


def lock_run_dir(run_dir: Path):
    """Own RUN_DIR for the life of this process: an exclusive lock on RUN_DIR/lock, which holds
    our process id. A second valdi.py on the same run is refused before it touches a file; a
    lock left by a killed process is gone with it (the OS drops it), so a resume takes over."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # Windows: runs are not locked
        return None
    try:
        f = open(run_dir / "lock", "a+")
    except OSError as exc:
        raise ValdiError(f"cannot open {run_dir / 'lock'}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise ValdiError(f"{run_dir} is in use by process {owner} (another valdi.py); wait for it or stop it "
                         f"first") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def fit_optimizer_to_device(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Adam state loaded from a checkpoint of another device or --compile setting: the saved
    groups carry that run's `capturable`, and Adam asserts its step counters live where that
    flag says (with the parameters when capturable, on the CPU otherwise). Set both for here."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if capturable else "cpu", torch.float32)


def new_run_dir(args: Args) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.runs_dir) / f"{args.exp_name}__{args.dynamics}__s{args.seed}__{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}_{n}")
    try:
        (run_dir / "trajectories").mkdir(parents=True)
    except OSError as exc:
        raise ValdiError(f"cannot create a run directory in --runs-dir {args.runs_dir}: "
                         f"{exc.strerror or exc}") from None
    return run_dir


def resume_run(args: Args, device: torch.device) -> Run:
    """The run in --resume as its last checkpoint left it. The checkpoint is written after each
    trajectory's updates, so anything newer (a trajectory whose updates a kill cut short, its
    CSV row) is set aside and done again: with the RNG states restored, the redone trajectory
    is the same, byte for byte, and the run goes on exactly as if it had never stopped."""
    run_dir = Path(args.resume)
    state = load_checkpoint(run_dir)  # on the CPU: RNG states must stay there; weights get copied
    run = new_run(args, device, run_dir)
    for module, key in ((run.model, "model"), (run.target, "target"), (run.optimizer, "optimizer")):
        load_weights(module, state[key], run_dir / CHECKPOINT_NAME)
    fit_optimizer_to_device(run.optimizer, capturable=capturable(args, device))
    for group in run.optimizer.param_groups:  # a learning rate given with --resume wins
        group["lr"] = args.lr
    run.counters.update(state["counters"])
    done = int(run.counters["trajectories"])
    for stale in [*run_dir.glob("*.tmp"), *(run_dir / "trajectories").glob("*.tmp")]:
        stale.unlink()  # a kill -9 mid-write leaves these; the file they were replacing is intact
    set_aside_newer_trajectories(run_dir, done)

    buffer = run.buffer
    first = max(0, done - buffer.capacity)
    buffer.added = first  # trajectory k goes to ring slot k % capacity, as it did before the stop
    for k in range(first, done):
        path = run_dir / "trajectories" / f"{k:06d}.npz"
        if not path.is_file():
            raise ValdiError(f"{path} is missing: the replay buffer needs it to resume (restore it from a backup)")
        traj = load_trajectory(path, TRAJECTORY_KEYS)
        n = len(traj["actions"])
        if n > args.max_episode_steps or traj["rgb"].shape != (n + 1, 96, 96, 3) or traj["proprio"].shape != (n + 1, PROPRIO_DIM):
            raise ValdiError(f"{path} does not hold a trajectory of at most {args.max_episode_steps} steps")
        buffer.add(traj)

    run.rng.bit_generator.state = state["rng"]["numpy"]
    torch.set_rng_state(state["rng"]["torch"])
    cuda_rng = state["rng"].get("cuda")
    if isinstance(cuda_rng, (list, tuple)):  # older checkpoints kept one state per visible GPU
        cuda_rng = cuda_rng[0] if cuda_rng else None
    if device.type == "cuda" and cuda_rng is not None:  # bit-identical continuation needs the same device
        torch.cuda.set_rng_state(cuda_rng, device)
    run.rows = read_progress_rows(run_dir / "progress.csv", done)
    print(f"resumed {run_dir} after trajectory {done - 1} ({run.counters['updates']} updates)", file=sys.stderr)
    return run


def set_aside_newer_trajectories(run_dir: Path, done: int) -> None:
    """Trajectory files the checkpoint does not count go to RUN_DIR/set_aside/ (never deleted,
    never overwritten); the resumed run collects them again."""
    newer = [p for p in sorted((run_dir / "trajectories").glob("*.npz"))
             if not p.stem.isdigit() or int(p.stem) >= done]
    if newer:
        aside = run_dir / "set_aside"
        aside.mkdir(exist_ok=True)
        for p in newer:
            dest, n = aside / p.name, 1
            while dest.exists():
                n += 1
                dest = aside / f"{p.stem}_{n}{p.suffix}"
            os.replace(p, dest)
        print(f"set aside {len(newer)} trajectory file(s) newer than the checkpoint in {aside}", file=sys.stderr)


def read_progress_rows(path: Path, done: int) -> list[dict]:
    """progress.csv rows of the trajectories the checkpoint counts (0..done-1), in order. A row
    written after the checkpoint, or a line cut by a kill, is dropped with what it described."""
    rows = {}
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    k = int(row["trajectory"])
                except (TypeError, ValueError):
                    continue
                if 0 <= k < done and k not in rows and None not in row.values():
                    rows[k] = {key: row.get(key, "") for key in CSV_FIELDS}
    if len(rows) != done:
        print(f"note: {path} has rows for {len(rows)} of the {done} trajectories the checkpoint counts",
              file=sys.stderr)
    return [rows[k] for k in sorted(rows)]


class NothingToDo(Exception):
    """--resume of a run that already has --total-trajectories trajectories."""


def start_run(args: Args) -> tuple[Run, RunLog]:
    """Everything before Algorithm 1's loop: threads, device, the run (fresh or resumed), its
    first checkpoint, the log, and Ctrl-C / SIGTERM handling."""
    if args.resume:  # a finished run: say so, and write nothing (no lock, no log, no checkpoint)
        done = int(load_checkpoint(args.resume, required=("counters",))["counters"]["trajectories"])
        if done >= args.total_trajectories:
            raise NothingToDo(f"nothing to do: {args.resume} has {done} of {args.total_trajectories} trajectories; "
                              f"raise --total-trajectories to continue")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.cuda)
    check_device(args, device)
    run = resume_run(args, device) if args.resume else new_run(args, device)
    run.env = make_env(args, video_dir=run.dir / "videos" if args.capture_video else None,
                       first_trajectory=run.counters["trajectories"])
    write_json(run.dir / "args.json", {**dataclasses.asdict(args), "code": code_history(run)})
    if not args.resume:
        save_checkpoint(run)  # resumable from the first moment: a kill before trajectory 0 loses nothing
    n_params = count_parameters(run.model)
    print(f"device {device} | dynamics {args.dynamics} | trainable parameters {n_params['total']:,} "
          + " ".join(f"({k} {v:,})" for k, v in n_params.items() if k != "total"))
    print(f"run directory {run.dir}")
    run.wall_start = time.time() - run.counters["wall_seconds"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    return run, RunLog(run)


def finish_trajectory(run: Run, log: RunLog, stats: dict, noise_std: float, learned: dict | None) -> None:
    """Count the trajectory, write its progress.csv row, then the checkpoint: from that moment it
    is done, and a resume starts after it."""
    k = run.counters["trajectories"]
    run.counters["trajectories"] += 1
    run.counters["env_steps"] += stats["length"]
    run.counters["wall_seconds"] = time.time() - run.wall_start
    learned = learned or {}  # seed trajectories: no updates, empty cells
    row = {"trajectory": k, "env_steps": run.counters["env_steps"], "return": stats["return"],
           "length": stats["length"], "explore_std": noise_std,
           **{stat_column(name): learned.get(name, "") for name in UPDATE_STATS},
           "planner_hz": stats["planner_hz"], "wall_seconds": run.counters["wall_seconds"]}
    log.write(row)
    run.rows.append(row)
    save_checkpoint(run)


class RunLog:
    """RUN_DIR/progress.csv, one row per trajectory, appended and flushed before the checkpoint
    that counts it; the same scalars in TensorBoard in RUN_DIR; and the progress bar. On resume
    the CSV is rewritten with the rows the checkpoint counts, and TensorBoard drops later steps."""

    def __init__(self, run: Run):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm  # imported here so that importing valdi stays light
        path = run.dir / "progress.csv"
        atomic_write(path, lambda f: f.write(csv_text(run.rows, header=True).encode()))
        self.file = open(path, "a", newline="")
        self.tensorboard = SummaryWriter(str(run.dir), purge_step=run.counters["trajectories"] or None)
        self.bar = tqdm(total=run.args.total_trajectories, initial=run.counters["trajectories"], unit="traj",
                        desc="trajectory", dynamic_ncols=True)

    def write(self, row: dict) -> None:
        try:
            self.file.write(csv_text([row]))
            self.file.flush()
        except OSError as exc:
            raise ValdiError(f"cannot write {self.file.name}: {exc.strerror}") from None
        for key, value in row.items():
            if key != "trajectory" and value != "":
                tag = f"losses/{key[5:]}" if key.startswith("loss_") else f"charts/{key}"
                self.tensorboard.add_scalar(tag, value, row["trajectory"])
        self.bar.set_postfix(ret=f"{row['return']:.1f}", hz=f"{row['planner_hz']:.1f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.tensorboard.close()
        self.file.close()


def csv_text(rows: list[dict], header: bool = False) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def interrupt(signum, frame):
    """Ctrl-C, and a scheduler's SIGTERM, stop the run. Nothing needs saving (the checkpoint
    after the last finished trajectory is on disk), and a second Ctrl-C while we close the
    files is ignored rather than turned into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = parse_args(argv)
        run_dir = train(args)
    except ValdiError as exc:
        print(f"valdi.py: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"valdi.py: {exc}", file=sys.stderr)
        return 1
    except NothingToDo as exc:
        print(f"valdi.py: {exc}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # before the loop started: nothing of the run is lost
        print("valdi.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if signal.getsignal(signal.SIGINT) is interrupt:  # not interrupted: hand the handlers back
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
