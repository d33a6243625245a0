"""decoder.py -- look at Valdi's imagined futures: the post-hoc pixel decoder (Supp. G), LPIPS
diversity against inference diffusion steps (Sec. 4, Fig. 3 right) and the diverse-futures
figure (Supp. G.2, Fig. 5).

Latents cannot be looked at. The paper therefore trains, after the agent is finished, a small
Vision Transformer that maps one 64-d latent back to a 96x96 frame, and uses it for two things:

    * Fig. 3 (right): from several real start states, imagine N = 100 futures with the same
      planned action sequence, decode the final imagined latent of each, and report the mean
      pairwise LPIPS between those frames for 1, 2, 4 and 8 DDIM steps ("more variety");
    * Fig. 5: from one start state, keep the 4 of 100 futures whose decoded final frames are
      most different from each other and draw each of their 6 latents (start + 5 imagined).

The decoder never feeds back into the agent: it is trained on the *frozen* encoder's latents of
an on-policy dataset that the same trained model collected (Supp. G, "Decoder"), so it learns
exactly the latent distribution its own model visits.

Five subcommands, each taking a RUN_DIR made by valdi.py and writing into RUN_DIR/decoder/:

    python decoder.py collect   RUN_DIR   # dataset.npz: on-policy frames, split by episode
    python decoder.py train     RUN_DIR   # decoder.pt, train.json, reconstructions.png, validation_curve.png
    python decoder.py slim      RUN_DIR   # decoder.pt without its training state: the weights, to share
    python decoder.py diversity RUN_DIR   # diversity.json, diversity.png + a table (Fig. 3 right)
    python decoder.py futures   RUN_DIR   # futures.png + futures.json (Fig. 5)

Everything about the agent (flags, environment, networks, planner, checkpoints) is imported from
valdi.py; this file only adds the decoder and the measurements built on it. Importing it does
no work.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import valdi
from valdi import ValdiError

DECODER_DIR = "decoder"
DATASET_NAME = "dataset.npz"
DECODER_NAME = "decoder.pt"
IMAGE_SIZE = 96  # CarRacing frames are 96 x 96 RGB (Supp. E)

# Fig. 3 (right), mean pairwise LPIPS of decoded final states, read off the published figure
# (Sec. 4, Fig. 3 right). Printed next to our numbers; comparable only with the pretrained
# AlexNet LPIPS and a fully trained agent.
PAPER_LPIPS = {1: 0.006, 2: 0.025, 4: 0.033, 8: 0.039}


def decoder_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DECODER_DIR


# =============================================================================================
# 1. The decoder (Supp. G, "Decoder")
# =============================================================================================
class ViTDecoder(nn.Module):
    """A Vision Transformer from one latent (64) to one frame (3, 96, 96) in [0, 1].

    A single latent has no spatial layout, so every one of the 24 x 24 = 576 patch tokens (4 x 4
    pixels each) starts as the *same* projection of z; only the learned position embedding tells
    the tokens apart, and the 3 transformer blocks let each patch work out what belongs at its
    place given the whole latent. The blocks are valdi's own pre-norm, bias-free blocks (width 256,
    8 heads, FFN 512) without a mask: every patch sees every other one. Each token is finally
    read out as its 4 x 4 x 3 = 48 pixels, squashed into [0, 1] by a sigmoid (the encoder's input
    range before its ImageNet normalisation), and the patches are folded back into the image.

    Parameters (tested exactly: 1,750,784):
      embed 64*256 = 16,384 | position 576*256 = 147,456 | 3 blocks x 524,800 = 1,574,400
      | final LayerNorm 256 | readout 256*48 = 12,288
    """

    def __init__(self, latent_dim: int = 64, width: int = 256, depth: int = 3, heads: int = 8,
                 ffn: int = 512, patch: int = 4, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.patch, self.grid = patch, image_size // patch  # 24 patches per side
        self.embed = nn.Linear(latent_dim, width, bias=False)
        self.position = nn.Parameter(0.02 * torch.randn(self.grid * self.grid, width))
        self.blocks = nn.ModuleList(valdi.TransformerBlock(width, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(width, bias=False)
        self.readout = nn.Linear(width, patch * patch * 3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 64) -> images (B, 3, 96, 96) in [0, 1]."""
        B = z.shape[0]
        x = self.embed(z).unsqueeze(1) + self.position  # (B, 576, 256): one latent, copied
        for block in self.blocks:
            x = block(x)
        pixels = torch.sigmoid(self.readout(self.norm(x)))  # (B, 576, 48)
        # Fold: token (row i, column j) holds the 4 x 4 x 3 block at rows 4i.., columns 4j...
        g, p = self.grid, self.patch
        return pixels.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


def frames_to_float(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, 96, 96, 3) -> the decoder's target (B, 3, 96, 96) in [0, 1]. The band
    of rows 84.. is already black in every frame (Supp. E), so the decoder learns to draw it black."""
    return rgb.permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def decode(decoder: ViTDecoder, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Decode any number of latents (N, 64) in chunks: attention over 576 tokens costs
    8 x 576^2 floats per image, so a few hundred images at once would not fit in memory."""
    return torch.cat([decoder(chunk) for chunk in z.split(batch_size)]) if len(z) else z.new_zeros(0, 3, 96, 96)


def save_decoder(path: Path, decoder: ViTDecoder, meta: dict) -> None:
    """Atomic (temporary file, then rename), and only tensors and plain containers inside, so
    that torch.load(weights_only=True) can read it without running any pickled code."""
    valdi.atomic_torch_save({"valdi_decoder": 1, "decoder": decoder.state_dict(), **meta}, path)


def load_decoder(run_dir: str | Path, device: torch.device, latent_dim: int) -> tuple[ViTDecoder, dict]:
    path = decoder_dir(run_dir) / DECODER_NAME
    if not path.is_file():
        raise ValdiError(f"no decoder at {path}; run `python decoder.py train {run_dir}` first")
    state = valdi.safe_torch_load(path, "decoder", device)
    if not isinstance(state, dict) or state.get("valdi_decoder") != 1:
        raise ValdiError(f"{path} is not a decoder checkpoint")
    decoder = ViTDecoder(latent_dim).to(device)
    valdi.load_weights(decoder, state["decoder"], path)
    return decoder.eval(), state


# =============================================================================================
# 2. The on-policy dataset (Supp. G: "collected by rolling out exactly the model whose latents
#    it reconstructs")
# =============================================================================================
DATASET_KEYS = ("rgb", "proprio", "episode", "step", "is_val")


def dataset_path(run_dir: str | Path) -> Path:
    return decoder_dir(run_dir) / DATASET_NAME


def load_dataset(run_dir: str | Path, path: Path | None = None) -> dict:
    """RUN_DIR/decoder/dataset.npz (or `path`) as a dict of arrays (also read by
    eval_diagnostics.py for Table 1): rgb (N, 96, 96, 3) uint8, proprio (N, 7) float32, episode
    (N,) int32, step (N,) int32 (env step of the frame in its episode, 0 = after reset), is_val
    (N,) bool (whole episodes)."""
    path = Path(path) if path is not None else dataset_path(run_dir)
    if not path.is_file():
        raise ValdiError(f"no on-policy dataset at {path}; make one with `python decoder.py collect {run_dir}`")
    return valdi.load_trajectory(path, DATASET_KEYS)  # the same plain-npz reader as the replay files


def load_agent(path: str | Path, device: torch.device | str = "cpu", dynamics: str | None = None,
               **overrides) -> valdi.Agent:
    """A run's trained model as an agent to evaluate (valdi.Agent, no target or Adam), with the
    run's flags and `overrides` of them (None: keep the run's). With `dynamics`, a checkpoint of
    another kind is refused. A path of the wrong kind says which path was meant, in one line."""
    path, device = Path(path), torch.device(device)
    if path.suffix == ".npz":
        raise ValdiError(f"{path} is a trajectory file, not a run: give its run directory ({path.parent.parent})")
    if path.is_dir() and not (path / valdi.CHECKPOINT_NAME).is_file():
        runs = sorted(p.parent.name for p in path.glob(f"*/{valdi.CHECKPOINT_NAME}"))
        if (path.parent / valdi.CHECKPOINT_NAME).is_file():  # RUN/decoder, RUN/eval, RUN/trajectories
            raise ValdiError(f"{path} is a folder inside a run, not a run: give the run directory {path.parent}")
        if runs:
            raise ValdiError(f"{path} is a folder of runs, not a run: give one of them, e.g. {path / runs[0]}")
        raise ValdiError(f"no checkpoint at {path / valdi.CHECKPOINT_NAME} (expected a run directory made by valdi.py)")
    state = valdi.load_checkpoint(path, map_location=device, required=("args", "model"))
    given = {k: v for k, v in overrides.items() if v is not None}
    flags = {**state["args"], **given}
    args = valdi.Args(**{f.name: flags.get(f.name, f.default) for f in dataclasses.fields(valdi.Args)})
    if dynamics is not None and args.dynamics != dynamics:
        raise ValdiError(f"{path} holds a '{args.dynamics}' model, not '{dynamics}'")
    if given:  # refuse inconsistent overrides as training would (--num-elites above --pop-size, ...)
        valdi.check_args(args)
    valdi.check_device(args, device)
    model = valdi.WorldModel(args)
    valdi.load_weights(model, state["model"], path)
    return valdi.make_agent(args, device, model.eval())


def load_run(opts, device: torch.device) -> valdi.Agent:
    """The run's agent, with --compile/--no-compile (when given) in place of the run's."""
    return load_agent(opts.run_dir, device, compile=opts.compile)


def count(n: int, noun: str) -> str:
    """'1 episode', '2 episodes': a count with its noun in the right number."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


# --- result files, shared with eval_diagnostics.py -------------------------------------------
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
    valdi.atomic_write(path, json.dumps(plain(data), indent=2).encode())
    return Path(path)


def result_path(path: Path, settings: dict) -> tuple[Path, dict | None]:
    """Where a result measured with `settings` goes, and the stored result there (or None).
    PATH when it is free or holds a result of the same settings; otherwise beside it, named
    after the settings that differ (returns__1ep_15f.json): a stored result is never replaced
    by one measured differently. Settings are compared as JSON would store them."""
    settings = {k: json.loads(json.dumps(v)) for k, v in settings.items()}

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
    """What a measurement ran on: the device, its name, and how fp32 matmuls were computed (a GPU
    computes "fp32" matmuls as TF32): results that differ in any are kept apart."""
    return {"device": device.type, "device_name": device_name(device),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def collect(opts) -> Path:
    """Roll out the run's own planner with no exploration noise on --episodes fresh tracks and
    keep every frame (with its proprio), episode by episode."""
    from tqdm import tqdm

    device = valdi.pick_device(opts.cuda)
    agent = load_run(opts, device)
    args, model = agent.args, agent.model
    if opts.max_episode_steps is not None:
        args.max_episode_steps = opts.max_episode_steps
        valdi.check_args(args)
    out = decoder_dir(opts.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    # Tracks of their own: neither the training tracks (seeded by --seed of the run) nor the 100
    # evaluation tracks (default_rng(12345), Sec. 4) are reused unless the seeds collide.
    track_seeds = np.random.default_rng(opts.seed).integers(2**31 - 1, size=opts.episodes)
    n_val = max(1, round(opts.val_fraction * opts.episodes))
    env = valdi.make_env(args)
    parts: dict[str, list] = {key: [] for key in DATASET_KEYS}
    returns = []
    bar = tqdm(range(opts.episodes), unit="episode", desc="collect", dynamic_ncols=True)
    try:
        for e in bar:
            # Noise 0: the dataset should show what the trained agent itself does, which is the
            # latent distribution the decoder will later be asked to draw.
            traj, stats = valdi.collect_trajectory(env, agent, 0.0, int(track_seeds[e]), generator=generator)
            n = len(traj["rgb"])  # L + 1 frames: the reset frame and one per env step
            parts["rgb"].append(traj["rgb"])
            parts["proprio"].append(traj["proprio"].astype(np.float32))
            parts["episode"].append(np.full(n, e, np.int32))
            parts["step"].append(np.arange(n, dtype=np.int32))
            # Split by whole episodes (the last n_val): neighbouring frames of one episode are
            # near-duplicates, so a per-frame split would leak the training set into validation.
            parts["is_val"].append(np.full(n, e >= opts.episodes - n_val, bool))
            returns.append(stats["return"])
            bar.set_postfix(ret=f"{stats['return']:.1f}", frames=sum(map(len, parts["step"])))
    finally:
        bar.close()
        env.close()
    data = {key: np.concatenate(value) for key, value in parts.items()}
    data["track_seeds"] = track_seeds.astype(np.int64)  # per episode
    data["returns"] = np.asarray(returns, np.float32)  # per episode
    path = dataset_path(opts.run_dir)
    valdi.save_trajectory(path, data)  # compressed npz, temporary file + os.replace
    print(f"{count(len(data['rgb']), 'frame')} from {count(opts.episodes, 'episode')} ({n_val} for validation), "
          f"mean return {np.mean(returns):.1f} -> {path}")
    return path


# =============================================================================================
# 3. Training the decoder on frozen latents
# =============================================================================================
@torch.inference_mode()
def encode_frames(model: valdi.WorldModel, rgb: np.ndarray, proprio: np.ndarray, device: torch.device,
                  batch_size: int = 256, desc: str | None = None) -> torch.Tensor:
    """Latents of dataset frames under inference mode: no graph, so the encoder cannot be
    updated by the decoder's loss. Computed once, since a frozen encoder always gives the same z."""
    from tqdm import tqdm

    zs = []
    for i in tqdm(range(0, len(rgb), batch_size), desc=desc, unit="batch", disable=desc is None,
                  dynamic_ncols=True):
        zs.append(model.encode(torch.from_numpy(rgb[i:i + batch_size]).to(device),
                               torch.from_numpy(proprio[i:i + batch_size]).to(device)))
    return torch.cat(zs) if zs else torch.zeros(0, model.encoder.head[-1].out_features, device=device)


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k indices spread over range(n) (all of them if k >= n)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def plateaued(steps: list[int], val_loss: list[float], tolerance: float) -> bool:
    """Supp. G trains the decoder to convergence; we call it converged when the best validation
    loss of the last fifth of training is less than `tolerance` (1%) below the loss at the start
    of that fifth. Undecided until five validations have followed the untrained one."""
    if tolerance <= 0 or len(steps) < 6:
        return False
    start = max(i for i, s in enumerate(steps) if s <= 0.8 * steps[-1])  # where the last fifth begins
    return start < len(steps) - 1 and min(val_loss[start + 1:]) > (1 - tolerance) * val_loss[start]


# The flags a resumed training takes from its checkpoint, so that it goes on with the same
# batches and learning rate; --steps (the cap) may be raised on resume.
RESUMED_SETTINGS = ("batch_size", "lr", "seed", "eval_every", "val_max_frames", "plateau")


def resume_state(out: Path, opts) -> dict:
    """The saved training state of RUN_DIR/decoder/decoder.pt, with its settings put into opts."""
    path = out / DECODER_NAME
    if not path.is_file():
        raise ValdiError(f"nothing to resume: no decoder at {path}; train without --resume first")
    state = valdi.safe_torch_load(path, "decoder", "cpu")
    if not isinstance(state, dict) or state.get("valdi_decoder") != 1:
        raise ValdiError(f"{path} is not a decoder checkpoint")
    if "optimizer" not in state:
        raise ValdiError(f"{path} holds the decoder's weights only (decoder.py slim), not its training state: "
                         f"nothing to resume; to train afresh, move it aside and train without --resume")
    for key, value in state["settings"].items():
        setattr(opts, key, value)
    if state["steps"] > opts.steps:
        raise ValdiError(f"the decoder has trained {count(state['steps'], 'step')}, beyond --steps {opts.steps}")
    return state


TRAINING_STATE = ("optimizer", "generator", "running", "seen")  # what only train --resume reads


def slim(opts) -> Path:
    """RUN_DIR/decoder/decoder.pt without its training state (Adam's moments, the batch generator): the weights and
    their record, a third of the size, as a repository ships them; every reader of the decoder loads it as before."""
    path = decoder_dir(opts.run_dir) / DECODER_NAME
    if not path.is_file():
        raise ValdiError(f"no decoder at {path}; run `python decoder.py train {opts.run_dir}` first")
    state = valdi.safe_torch_load(path, "decoder", "cpu")
    if not isinstance(state, dict) or state.get("valdi_decoder") != 1:
        raise ValdiError(f"{path} is not a decoder checkpoint")
    before = path.stat().st_size
    valdi.atomic_torch_save({k: v for k, v in state.items() if k not in TRAINING_STATE}, path)
    print(f"{path}: {before / 1e6:.1f} MB -> {path.stat().st_size / 1e6:.1f} MB, the weights without their training "
          f"state (train --resume can no longer go on from it)")
    return path


def train(opts) -> Path:
    """Supp. G: fit the ViT decoder to map each frame's latent back to the frame (pixel MSE, Adam),
    with the run's encoder frozen, until the validation loss (held-out episodes, every
    --eval-every steps, each time with an atomic checkpoint) stops improving or --steps is reached.
    Then the yardstick: LPIPS between validation frames and their reconstructions, the
    reconstruction PNG and the validation curve."""
    device = valdi.pick_device(opts.cuda)
    agent = load_run(opts, device)
    out = decoder_dir(opts.run_dir)
    saved = resume_state(out, opts) if opts.resume else None  # also puts the saved settings into opts
    if saved is None and (out / DECODER_NAME).is_file():  # hours of CPU training are not overwritten by mistake
        raise ValdiError(f"{out / DECODER_NAME} exists; go on training it with --resume, or delete it to train afresh")
    data, latents, train_idx, val_idx = frozen_latents(opts, agent.model, device)
    rgb = torch.from_numpy(data["rgb"])  # stays on the host as uint8; batches travel
    torch.manual_seed(opts.seed)
    lp = make_lpips(opts.lpips_random_backbone, device)  # early: a missing trunk fails before training
    decoder, history, done, converged = fit(opts, out, saved, agent.args.latent_dim, latents, rgb, train_idx, val_idx,
                                            device)
    stop = (f"validation loss on a plateau (< {opts.plateau:.0%} better over the last fifth)" if converged
            else f"the --steps cap, not yet on a plateau")
    print(f"validation MSE per pixel: {history['val_loss'][0]:.5f} (untrained) -> "
          f"{history['val_loss'][-1]:.5f} after {count(done, 'step')}, stopped by {stop}; "
          f"decoder -> {out / DECODER_NAME}")

    # The yardstick for every LPIPS number made with this decoder: how far is a reconstruction
    # from its real frame? Diversity below this level is within the decoder's own blur.
    decoder.eval()
    val, b = torch.from_numpy(val_idx), opts.batch_size
    recon = decode(decoder, latents[val.to(device)], b)
    with torch.inference_mode():
        per_frame = torch.cat([lp(frames_to_float(rgb[val[i:i + b]].to(device)), recon[i:i + b], normalize=True).flatten()
                               for i in range(0, len(val), b)]).double().cpu().numpy()
    episodes = data["episode"][val_idx]
    per_episode = np.array([per_frame[episodes == e].mean() for e in np.unique(episodes)])
    summary = {
        "steps": int(done), "stopped_by": "plateau" if converged else "steps cap",
        "plateau_tolerance": opts.plateau, "val_mse_untrained": history["val_loss"][0],
        "val_mse": history["val_loss"][-1], "train_frames": int(len(train_idx)), "val_frames": int(len(val_idx)),
        "val_episodes": int(len(per_episode)), "lpips_recon_mean": float(per_frame.mean()),
        # Frames of one episode are alike, so the standard error is taken over validation episodes.
        "lpips_recon_sem_over_episodes": sem(per_episode),
        **lpips_record(opts.lpips_random_backbone), **device_record(device)}
    write_json(out / "train.json", summary)
    print(f"LPIPS(validation frame, its reconstruction) = {summary['lpips_recon_mean']:.4f}"
          f" ± {fmt_sem(summary['lpips_recon_sem_over_episodes'])} (s.e. over {count(len(per_episode), 'episode')}, "
          f"{summary['lpips_trunk']})")

    # Look at it: validation frames (top) above the decoder's reading of their latents (bottom).
    pick = evenly_spaced(len(val_idx), opts.num_images)
    show = val_idx[pick]
    save_grid(out / "reconstructions.png", [to_hwc(frames_to_float(rgb[show])), to_hwc(recon[torch.from_numpy(pick)])],
              row_labels=["validation frame", "decoded E(frame)"],
              col_titles=[f"ep {data['episode'][i]} t={data['step'][i]}" for i in show],
              title=f"decoder reconstructions, validation episodes (MSE {history['val_loss'][-1]:.4f}, "
                    f"LPIPS {summary['lpips_recon_mean']:.3f}, {summary['lpips_trunk_short']})")
    save_curve(out / "validation_curve.png", history, stop)
    print(f"reconstructions -> {out / 'reconstructions.png'}, curve -> {out / 'validation_curve.png'}")
    return out / DECODER_NAME


def fit(opts, out: Path, saved: dict | None, latent_dim: int, latents: torch.Tensor, rgb: torch.Tensor,
        train_idx: np.ndarray, val_idx: np.ndarray, device: torch.device):
    """The training loop of `train`, from scratch or from `saved` (--resume): Adam on the pixel MSE of random
    training frames, validated every --eval-every steps with a checkpoint each time; Ctrl-C saves the step it is in.
    Returns (decoder, history, the last step, whether the validation loss reached its plateau)."""
    from tqdm import tqdm
    generator = torch.Generator().manual_seed(opts.seed)
    decoder = ViTDecoder(latent_dim).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=opts.lr)
    history = {"step": [], "train_loss": [], "val_loss": []}
    dataset_shape = {"frames": int(len(rgb)), "train_frames": int(len(train_idx)), "val_frames": int(len(val_idx))}
    running, seen, done = torch.zeros((), device=device), 0, 0  # summed on the device: no sync per step
    if saved is not None:
        if saved["dataset"] != dataset_shape:
            raise ValdiError(f"{out / DECODER_NAME} was trained on another dataset ({saved['dataset']}, now "
                             f"{dataset_shape}); train afresh without --resume")
        valdi.load_weights(decoder, saved["decoder"], out / DECODER_NAME)
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        history, done, seen = saved["history"], saved["steps"], saved["seen"]
        running = saved["running"].to(device)

    def save(step: int) -> None:
        """Everything a later --resume needs to go on exactly as if never stopped."""
        save_decoder(out / DECODER_NAME, decoder, {
            "latent_dim": latent_dim, "steps": step, "val_loss": history["val_loss"][-1],
            "history": history, "train_frames": int(len(train_idx)), "val_frames": int(len(val_idx)),
            "dataset": dataset_shape, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "running": running.detach().cpu(), "seen": seen,
            "settings": {k: getattr(opts, k) for k in RESUMED_SETTINGS}})

    def record(step: int, train_loss: float) -> None:
        val = validation_loss(decoder, latents, rgb, val_idx, opts.batch_size)
        for key, value in zip(history, (step, train_loss, val)):
            history[key].append(value)
        lines = [",".join(history)] + [",".join(map(str, row)) for row in zip(*history.values())]
        valdi.atomic_write(out / "train_log.csv", ("\n".join(lines) + "\n").encode())

    stop_requested = []
    previous = signal.signal(signal.SIGINT, lambda *_: stop_requested.append(True))  # finish the step, then stop
    if saved is None:
        record(0, float("nan"))  # the untrained decoder's validation loss: the number to beat
        save(0)
    converged = plateaued(history["step"], history["val_loss"], opts.plateau)
    bar = tqdm(range(done + 1, opts.steps + 1), unit="step", desc="train decoder", dynamic_ncols=True,
               initial=done, total=opts.steps, disable=converged)
    try:
        for step in (() if converged else bar):
            pick = torch.from_numpy(train_idx)[torch.randint(len(train_idx), (opts.batch_size,), generator=generator)]
            target = frames_to_float(rgb[pick].to(device, non_blocking=True))
            loss = F.mse_loss(decoder(latents[pick.to(device)]), target)  # pixel MSE (Supp. G)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, seen, done = running + loss.detach(), seen + 1, step
            if step % opts.eval_every == 0 or step == opts.steps:
                record(step, running.item() / seen)
                running, seen = torch.zeros((), device=device), 0
                save(step)
                bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}", val=f"{history['val_loss'][-1]:.4f}")
                if plateaued(history["step"], history["val_loss"], opts.plateau):
                    converged = True
                    break
            if stop_requested:
                save(step)  # between validations: resumable from exactly this step
                bar.close()
                print(f"\ninterrupted: the decoder after step {step} is in {out / DECODER_NAME}; continue "
                      f"with: python decoder.py train {opts.run_dir} --resume", file=sys.stderr)
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
    bar.close()
    return decoder, history, done, converged


def sem(values: np.ndarray) -> float | None:
    """Standard error of the mean (sample std / sqrt(n)); None for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def fmt_sem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@torch.inference_mode()
def validation_loss(decoder: ViTDecoder, latents: torch.Tensor, rgb: torch.Tensor, val_idx: np.ndarray,
                    batch_size: int) -> float:
    """Pixel MSE of the decoder on the validation frames, per pixel and channel."""
    decoder.eval()
    total = 0.0
    for chunk in torch.from_numpy(val_idx).split(batch_size):
        target = frames_to_float(rgb[chunk].to(latents.device))
        total += F.mse_loss(decoder(latents[chunk.to(latents.device)]), target, reduction="sum").item()
    decoder.train()
    return total / (len(val_idx) * 3 * IMAGE_SIZE * IMAGE_SIZE)


def frozen_latents(opts, model: valdi.WorldModel, device: torch.device):
    """The dataset, the frozen encoder's latent of every frame, and the frame indices of the
    training episodes and of (at most --val-max-frames of) the validation episodes."""
    data = load_dataset(opts.run_dir)
    is_val = data["is_val"].astype(bool)
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValdiError("the dataset needs both training and validation episodes; collect with --episodes >= 2")
    model.requires_grad_(False)  # frozen: the decoder explains the latents, never reshapes them
    # .clone() turns the inference-mode result into an ordinary tensor that autograd may read
    # (it still carries no gradient: the encoder is out of the decoder's graph for good).
    latents = encode_frames(model, data["rgb"], data["proprio"], device, desc="encode").clone()
    return data, latents, train_idx, val_idx[evenly_spaced(len(val_idx), opts.val_max_frames)]


# =============================================================================================
# 4. LPIPS, batched over all pairs (Zhang et al., 2018)
# =============================================================================================
def make_lpips(random_backbone: bool, device: torch.device):
    """LPIPS with the AlexNet trunk, as is standard. Its linear heads ship with the `lpips`
    package; the trunk's ImageNet weights are downloaded by torchvision on first use. For
    offline machines and tests, --lpips-random-backbone keeps the heads but a randomly
    initialised trunk: it still measures image differences, but on another scale."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes about `pretrained=`
        try:  # a random trunk from a fixed seed: every LPIPS of a run (the decoder's yardstick included) is one scale
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = lpips.LPIPS(net="alex", pnet_rand=random_backbone, verbose=False)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValdiError(f"cannot load the pretrained AlexNet that LPIPS needs (torchvision downloads "
                             f"it once): {reason[:150]}; --lpips-random-backbone works offline") from None
    if random_backbone:
        print("note: LPIPS with a RANDOM AlexNet trunk (--lpips-random-backbone): its numbers are "
              "not comparable with the paper's")
    return model.to(device).eval().requires_grad_(False)


def lpips_record(random_backbone: bool) -> dict:
    """Which LPIPS made a number, for every JSON that holds one: only the pretrained trunk's
    values can stand beside the paper's."""
    if random_backbone:
        return {"lpips_backbone": "random", "lpips_trunk": "AlexNet with random weights "
                "(--lpips-random-backbone), not comparable with the paper", "lpips_trunk_short":
                "LPIPS on a RANDOM AlexNet", "comparable_with_paper": False}
    return {"lpips_backbone": "alexnet", "lpips_trunk": "AlexNet with torchvision's ImageNet weights "
            "(lpips v0.1 heads), as in the paper", "lpips_trunk_short": "LPIPS on the pretrained AlexNet",
            "comparable_with_paper": True}


@torch.inference_mode()
def pairwise_lpips(lp, images: torch.Tensor) -> torch.Tensor:
    """All pairwise LPIPS distances between N images (N, 3, H, W) in [0, 1] -> (N, N) float64.

    LPIPS(x, y) = sum over trunk layers l of mean over positions of
                  sum_c w_lc (f_lc(x) - f_lc(y))^2,   f = channel-normalised trunk features.
    Expanding the square, sum_c w (a - b)^2 = <a, wa> + <b, wb> - 2 <a, wb>, so for all pairs at
    once it is a weighted Gram matrix per layer: one trunk pass over the N images and one matrix
    product, instead of recomputing AlexNet for each of the N (N - 1) / 2 pairs (4,950 for
    N = 100). Same weights and normalisation as lpips.LPIPS.forward (tested against it); float64
    keeps the cancellation harmless even at the paper's LPIPS of 0.006."""
    import lpips

    x = lp.scaling_layer(images * 2 - 1)  # LPIPS expects images in [-1, 1]
    distance = torch.zeros(len(images), len(images), dtype=torch.float64, device=images.device)
    for feature, head in zip(lp.net(x), lp.lins):
        f = lpips.normalize_tensor(feature).double()  # (N, C, h, w), unit norm over channels
        w = head.model[-1].weight.double().view(1, -1, 1, 1)  # the 1x1 conv of the linear head
        N, hw = f.shape[0], f.shape[2] * f.shape[3]
        gram = (f * w).reshape(N, -1) @ f.reshape(N, -1).T / hw  # <f_i, w f_j>, spatially averaged
        self_term = gram.diagonal()
        distance += self_term[:, None] + self_term[None, :] - 2 * gram
    distance.fill_diagonal_(0.0)
    return distance.clamp_(min=0.0)


def mean_pairwise(distance: torch.Tensor) -> float:
    """Mean over the N (N - 1) / 2 distinct pairs."""
    i, j = torch.triu_indices(len(distance), len(distance), offset=1, device=distance.device)
    return float(distance[i, j].mean())


def most_different_four(distance: np.ndarray) -> tuple[tuple[int, int, int, int], float]:
    """The 4-subset with the largest sum of its 6 pairwise distances (Supp. G.2: "the subset of
    4 trajectories that minimizes mutual similarity"). Exact search over all C(N, 4) subsets
    (3,921,225 for N = 100), done with arrays: fix the smallest index a in a Python loop (N
    iterations); for all b < c < d above it at once, the score
        D_ab + D_ac + D_ad + D_bc + D_bd + D_cd
    is one broadcast (N - a - 1)^3 array, masked to b < c < d, and its argmax is the best subset
    with smallest index a. The best of these N candidates is the exact optimum; about N^4 / 4
    additions in all, well under a second for N = 100. Ties go to the first in index order."""
    D = np.asarray(distance, dtype=np.float64)
    N = len(D)
    if N < 4:
        raise ValdiError(f"need at least 4 futures to choose 4, got {N}")
    upper = np.triu(np.ones((N, N), bool), k=1)
    best_score, best = -np.inf, None
    for a in range(N - 3):
        m = N - a - 1
        r, S = D[a, a + 1:], D[a + 1:, a + 1:]  # distances from a, and among the later indices
        score = (r[:, None, None] + r[None, :, None] + r[None, None, :]
                 + S[:, :, None] + S[:, None, :] + S[None, :, :])  # axes (b, c, d)
        ordered = upper[:m, :m, None] & upper[None, :m, :m]  # b < c and c < d
        score = np.where(ordered, score, -np.inf)
        flat = int(np.argmax(score))
        if score.flat[flat] > best_score:
            b, c, d = np.unravel_index(flat, score.shape)
            best_score, best = float(score.flat[flat]), (a, a + 1 + int(b), a + 1 + int(c), a + 1 + int(d))
    return best, best_score


# =============================================================================================
# 5. Imagining futures (Sec. 4, "Performance and Multimodality")
# =============================================================================================
def start_frames(data: dict, skip: int) -> np.ndarray:
    """Candidate start states: validation frames past each episode's first `skip` frames.
    CarRacing zooms in from far above during its first second (50 frames), so those frames
    look like no other state the agent plans from."""
    candidates = np.flatnonzero(data["is_val"].astype(bool) & (data["step"] >= skip))
    if len(candidates) == 0:
        raise ValdiError(f"no validation frame has step >= {skip}; lower --skip-frames or collect longer episodes")
    return candidates


def imagine_futures(model: valdi.WorldModel, z0: torch.Tensor, actions: torch.Tensor, n: int,
                    steps: int, generator: torch.Generator) -> torch.Tensor:
    """N futures (N, H+1, D) of one start latent z0 (1, D) under one action sequence (1, H, A).
    Repeating the pair N times is enough: the diffusion sampler draws fresh Gaussian noise for
    every row, so the rows differ only by the sampler's noise; the MLP returns N copies."""
    with torch.inference_mode():
        return model.imagine(z0.expand(n, -1), actions.expand(n, -1, -1), steps, generator)


def diversity(opts) -> dict:
    """Fig. 3 (right): mean pairwise LPIPS of the decoded final states of --num-futures futures,
    per number of DDIM steps, averaged over --num-starts start states (± the standard error over
    start states), as a table, diversity.json and diversity.png."""
    from tqdm import tqdm

    if opts.num_futures < 2:
        raise ValdiError("--num-futures must be at least 2 (LPIPS compares pairs)")
    if opts.num_starts < 1:
        raise ValdiError("--num-starts must be at least 1")
    bad = [s for s in opts.diffusion_steps if not 1 <= s <= valdi.DIFFUSION_T]
    if bad:
        raise ValdiError(valdi.diffusion_steps_error(bad[0]))
    device = valdi.pick_device(opts.cuda)
    agent = load_run(opts, device)
    args, model = agent.args, agent.model
    data = load_dataset(opts.run_dir)
    decoder, _ = load_decoder(opts.run_dir, device, args.latent_dim)
    candidates = start_frames(data, opts.skip_frames)
    if opts.num_starts > len(candidates):
        raise ValdiError(f"--num-starts {opts.num_starts} exceeds the {len(candidates)} eligible validation frames")
    starts = candidates[evenly_spaced(len(candidates), opts.num_starts)]
    torch.manual_seed(opts.seed)  # before LPIPS: its random trunk, if asked for, is seeded too
    lp = make_lpips(opts.lpips_random_backbone, device)
    generator = torch.Generator(device=device).manual_seed(opts.seed)

    z0 = encode_frames(model, data["rgb"][starts], data["proprio"][starts], device)
    # One action sequence per start, planned as the agent would act (noise 0, the run's own
    # inference steps), and kept fixed across step counts: only the sampler varies.
    actions = valdi.plan(agent, z0, 0.0, None, generator)
    per_start = np.zeros((len(opts.diffusion_steps), len(starts)))
    bar = tqdm(total=per_start.size, unit="set", desc="diversity", dynamic_ncols=True)
    for s, z, a in zip(range(len(starts)), z0, actions):
        for k, steps in enumerate(opts.diffusion_steps):
            finals = imagine_futures(model, z[None], a[None], opts.num_futures, steps, generator)[:, -1]
            images = decode(decoder, finals, opts.decode_batch)
            per_start[k, s] = mean_pairwise(pairwise_lpips(lp, images))
            bar.update(1)
    bar.close()

    result = {
        "diffusion_steps": [int(s) for s in opts.diffusion_steps],
        "lpips_mean": per_start.mean(axis=1).tolist(),
        "lpips_std": per_start.std(axis=1).tolist(),  # spread over start states
        "lpips_sem": [sem(row) for row in per_start],  # standard error of the mean over start states
        "lpips_per_start": per_start.tolist(),  # [step count][start]
        "num_starts": int(len(starts)), "num_futures": int(opts.num_futures),
        "start_indices": starts.tolist(),  # rows of dataset.npz
        "dynamics": model.kind, **lpips_record(opts.lpips_random_backbone),
        "paper_lpips": {str(k): v for k, v in PAPER_LPIPS.items()}, **device_record(device),
    }
    path, _ = result_path(decoder_dir(opts.run_dir) / "diversity.json", {k: result[k] for k in (
        "diffusion_steps", "num_starts", "num_futures", "lpips_backbone", "device", "device_name",
        "float32_matmul_precision")})
    write_json(path, result)

    print(f"\nmean pairwise LPIPS of decoded final states ({model.kind}, {len(starts)} starts x "
          f"{opts.num_futures} futures, {result['lpips_trunk_short']})")
    print(f"{'DDIM steps':>10} | {'LPIPS mean':>10} | {'s.e.':>8} | {'std':>8} | {'paper':>6}")
    for steps, mean, se, std in zip(result["diffusion_steps"], result["lpips_mean"], result["lpips_sem"],
                                    result["lpips_std"]):
        paper = f"{PAPER_LPIPS[steps]:.3f}" if steps in PAPER_LPIPS else "-"
        print(f"{steps:>10} | {mean:>10.4f} | {fmt_sem(se):>8} | {std:>8.4f} | {paper:>6}")
    png = save_diversity_figure(path.with_suffix(".png"), result, model.dynamics.stochastic)
    print(f"-> {path}, {png}")
    return result


def futures(opts) -> Path:
    """Fig. 5: the 4 most mutually different of --num-futures futures from one start state."""
    from tqdm import tqdm

    if opts.num_futures < 4:
        raise ValdiError(f"--num-futures {opts.num_futures} is fewer than the 4 futures the figure shows")
    if not 1 <= opts.diffusion_steps <= valdi.DIFFUSION_T:
        raise ValdiError(valdi.diffusion_steps_error(opts.diffusion_steps))
    device = valdi.pick_device(opts.cuda)
    agent = load_run(opts, device)
    args, model = agent.args, agent.model
    data = load_dataset(opts.run_dir)
    decoder, _ = load_decoder(opts.run_dir, device, args.latent_dim)
    if opts.start is None:
        candidates = start_frames(data, opts.skip_frames)
        start = int(candidates[len(candidates) // 2])
    elif not 0 <= opts.start < len(data["rgb"]):
        raise ValdiError(f"--start {opts.start} is not a frame of the dataset (0..{len(data['rgb']) - 1})")
    else:
        start = opts.start
    torch.manual_seed(opts.seed)  # before LPIPS: its random trunk, if asked for, is seeded too
    lp = make_lpips(opts.lpips_random_backbone, device)
    generator = torch.Generator(device=device).manual_seed(opts.seed)

    bar = tqdm(total=4, unit="stage", desc="futures", dynamic_ncols=True)
    z0 = encode_frames(model, data["rgb"][start:start + 1], data["proprio"][start:start + 1], device)
    actions = valdi.plan(agent, z0, 0.0, None, generator)  # one plan, as the agent would act
    trajectories = imagine_futures(model, z0, actions, opts.num_futures, opts.diffusion_steps, generator)
    bar.update(1)
    finals = decode(decoder, trajectories[:, -1], opts.decode_batch)
    bar.update(1)
    distance = pairwise_lpips(lp, finals)
    chosen, score = most_different_four(distance.cpu().numpy())
    bar.update(1)
    # Each state of each chosen trajectory is decoded on its own (Supp. G.2); column 0 is the
    # decoded start latent, identical in every row.
    rows = decode(decoder, trajectories[list(chosen)].reshape(-1, trajectories.shape[-1]), opts.decode_batch)
    rows = to_hwc(rows).reshape(4, trajectories.shape[1], IMAGE_SIZE, IMAGE_SIZE, 3)
    bar.update(1)
    bar.close()

    c = args.action_chunk
    col_titles = ["start (decoded $z_0$)"] + [f"$\\hat z_{h}$ (t+{h * c})" for h in range(1, trajectories.shape[1])]
    out = decoder_dir(opts.run_dir)
    png = out / "futures.png"
    save_grid(png, list(rows), row_labels=[f"future {i}" for i in chosen], col_titles=col_titles,
              title=(f"{model.kind}: 4 most different of {opts.num_futures} futures, "
                     f"{opts.diffusion_steps} DDIM steps (dataset frame {start}; "
                     f"sum of 6 LPIPS {score:.3f}, mean over all pairs {mean_pairwise(distance):.3f})"))
    info = {"start_index": start, "episode": int(data["episode"][start]), "step": int(data["step"][start]),
            "num_futures": opts.num_futures, "diffusion_steps": opts.diffusion_steps, "chosen": list(chosen),
            "chosen_pairwise_lpips": distance[list(chosen)][:, list(chosen)].tolist(),
            "chosen_lpips_sum": score, "mean_pairwise_lpips_all": mean_pairwise(distance),
            "dynamics": model.kind, **lpips_record(opts.lpips_random_backbone),
            "actions": actions[0].cpu().tolist()}
    write_json(out / "futures.json", info)
    if not model.dynamics.stochastic:
        print(f"note: the {model.kind} dynamics is deterministic, so all futures (and all 4 rows) are the same")
    print(f"futures {list(chosen)} (sum of pairwise LPIPS {score:.4f}) -> {png}")
    return png


# =============================================================================================
# 6. Figures
# =============================================================================================
def to_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) numpy for imshow."""
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: Path, rows: list, row_labels: list[str], col_titles: list[str], title: str) -> None:
    """A grid of images, one list (or array) of HWC images per row, written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.8 * n_cols, 1.9 * n_rows + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0 and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    valdi.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def save_curve(path: Path, history: dict, stop: str) -> Path:
    """The decoder's training and validation pixel MSE against Adam steps (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(history["step"][1:], history["train_loss"][1:], "-", color="tab:gray", label="training (mean since last point)")
    ax.plot(history["step"], history["val_loss"], "o-", color="tab:blue", markersize=3, label="validation episodes")
    ax.set_yscale("log")
    ax.set_xlabel("Adam steps")
    ax.set_ylabel("pixel MSE")
    ax.set_title(f"decoder training: validation MSE {history['val_loss'][-1]:.5f} at step {history['step'][-1]}\n"
                 f"stopped by {stop}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    valdi.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def save_diversity_figure(path: Path, result: dict, stochastic: bool) -> Path:
    """Fig. 3 (right): mean pairwise LPIPS of decoded final states against DDIM steps, ± s.e. over
    start states, beside the paper's values; a deterministic dynamics (the MLP) has one future
    per start, so its variety is the zero line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, mean = np.array(result["diffusion_steps"]), np.array(result["lpips_mean"])
    se = np.array([v or 0.0 for v in result["lpips_sem"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    label = valdi.DYNAMICS[result["dynamics"]].label if result["dynamics"] in valdi.DYNAMICS else result["dynamics"]
    ax.errorbar(steps, mean, yerr=se, marker="o", capsize=3, color="tab:blue",
                label=f"{label} (this run, ± s.e. over {result['num_starts']} starts)")
    paper = sorted((int(k), v) for k, v in result["paper_lpips"].items())
    ax.plot([k for k, _ in paper], [v for _, v in paper], "s--", color="tab:gray", alpha=0.7,
            label="Valdi in the paper (fully trained)")
    if stochastic:
        ax.axhline(0.0, color="tab:orange", linestyle="--", label="MLP: one deterministic future (0)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(steps.tolist()) | {k for k, _ in paper}))
    ax.set_xticklabels([str(k) for k in sorted(set(steps.tolist()) | {k for k, _ in paper})])
    ax.set_xlabel("inference DDIM steps")
    ax.set_ylabel("mean pairwise LPIPS of decoded final states")
    ax.set_title(f"Variety of imagined futures (Fig. 3 right): {result['num_futures']} futures per start\n"
                 f"{result['lpips_trunk_short']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    valdi.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


# =============================================================================================
# 7. Command line
# =============================================================================================
def add_command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand on one RUN_DIR, with the flags every subcommand takes."""
    sub = commands.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by valdi.py")
    sub.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True,
                     help="use CUDA when it is available (--no-cuda forces the CPU)")
    sub.add_argument("--seed", type=int, default=0, help="seed of tracks, sampling and noise")
    sub.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the planner (default: as the run was trained)")
    sub.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core)")
    return sub


def add_lpips_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--lpips-random-backbone", action="store_true",
                     help="LPIPS with a random AlexNet trunk (offline; not comparable with the paper)")
    sub.add_argument("--skip-frames", type=int, default=50,
                     help="start states only from frames at or after this step (CarRacing zooms in first)")
    sub.add_argument("--decode-batch", type=int, default=32, help="latents decoded per batch")


def build_parser() -> argparse.ArgumentParser:
    parser = valdi.OneLineParser(
        prog="decoder.py",
        description="Post-hoc pixel decoder of a Valdi run, LPIPS diversity (Fig. 3 right) and "
                    "diverse futures (Fig. 5). Each subcommand writes into RUN_DIR/decoder/.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=valdi.OneLineParser)
    command = functools.partial(add_command, commands)

    sub = command("collect", "roll out the run's planner (noise 0) and store an on-policy frame dataset")
    sub.add_argument("--episodes", type=int, default=20, help="episodes (tracks) to collect")
    sub.add_argument("--val-fraction", type=float, default=0.1,
                     help="fraction of episodes held out for validation (at least one)")
    sub.add_argument("--max-episode-steps", type=int, default=None,
                     help="frames per episode (None: the run's own, 600 in the paper)")

    sub = command("train", "train the ViT decoder on the frozen encoder's latents of the dataset")
    sub.add_argument("--steps", type=int, default=50000, help="Adam steps at most")
    sub.add_argument("--plateau", type=float, default=0.01,
                     help="stop once the best validation loss of the last fifth of training is less than this "
                          "fraction below the loss at its start (0: always run --steps)")
    sub.add_argument("--batch-size", type=int, default=64, help="frames per step")
    sub.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    sub.add_argument("--eval-every", type=int, default=500, help="steps between validation losses and checkpoints")
    sub.add_argument("--val-max-frames", type=int, default=512,
                     help="validation frames (evenly spaced) used for the validation loss")
    sub.add_argument("--num-images", type=int, default=8, help="frames shown in reconstructions.png")
    sub.add_argument("--lpips-random-backbone", action="store_true",
                     help="LPIPS with a random AlexNet trunk (offline; not comparable with the paper)")
    sub.add_argument("--resume", action="store_true",
                     help="go on from RUN_DIR/decoder/decoder.pt exactly (its batch size, learning rate, seed, "
                          "validation settings); Ctrl-C saves the step it stopped at")

    command("slim", "drop the decoder's training state from RUN_DIR/decoder/decoder.pt, keeping its weights")

    sub = command("diversity", "mean pairwise LPIPS of decoded imagined futures per DDIM step count")
    sub.add_argument("--num-starts", type=int, default=50, help="start states from the validation set")
    sub.add_argument("--num-futures", type=int, default=100, help="imagined futures per start state")
    sub.add_argument("--diffusion-steps", type=int, nargs="+", default=[1, 2, 4, 8], help="DDIM step counts")
    add_lpips_flags(sub)

    sub = command("futures", "Figure 5: the 4 most different of N futures from one start, as a 4 x 6 grid")
    sub.add_argument("--num-futures", type=int, default=100, help="imagined futures to choose from")
    sub.add_argument("--diffusion-steps", type=int, default=8, help="DDIM steps of the imagination")
    sub.add_argument("--start", type=int, default=None,
                     help="dataset row of the start frame (None: the middle eligible validation frame)")
    add_lpips_flags(sub)
    return parser


def check_options(opts) -> None:
    """Refuse impossible numbers before any loading starts."""
    if opts.threads < 0:
        raise ValdiError("--threads must be at least 0")
    positive = {"collect": ("episodes",), "train": ("steps", "batch_size", "eval_every", "val_max_frames", "num_images"),
                "diversity": ("decode_batch",), "futures": ("decode_batch",), "slim": ()}[opts.command]
    for name in positive:
        if getattr(opts, name) < 1:
            raise ValdiError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.command == "collect":
        if opts.episodes < 2:
            raise ValdiError("--episodes must be at least 2 (one for training, one for validation)")
        if not 0 < opts.val_fraction < 1:
            raise ValdiError("--val-fraction must lie strictly between 0 and 1")
        if round(opts.val_fraction * opts.episodes) >= opts.episodes:
            raise ValdiError("--val-fraction leaves no training episode")
    if opts.command == "train" and not opts.lr > 0:
        raise ValdiError("--lr must be positive")
    if opts.command == "train" and not 0 <= opts.plateau < 1:
        raise ValdiError("--plateau must lie in [0, 1)")
    if opts.command in ("diversity", "futures") and opts.skip_frames < 0:
        raise ValdiError("--skip-frames must not be negative")


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        check_options(opts)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        {"collect": collect, "train": train, "slim": slim, "diversity": diversity, "futures": futures}[opts.command](opts)
    except ValdiError as exc:
        print(f"decoder.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the decoder's training loop there is nothing to save
        print("decoder.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
