"""Evaluation and diagnostics for Valdi runs: the numbers behind the paper's claims.

Read this file beside Section 4 of the paper and `valdi.py`. Every number the paper reports about
a trained agent comes from one subcommand here:

    returns ...... evaluation return on the 100 fixed tracks, swept over inference diffusion
                   steps (Sec. 4 "Performance and Multimodality", Fig. 3 left, Fig. 4 right)
    consistency .. value self-consistency along imagined rollouts, delta_TD (Eq. 2, Table 1 top)
    grounding .... imagined vs real value along closed-loop episodes, delta_drift (Eq. 3,
                   Table 1 bottom)
    speed ........ planner calls/s and updates/s, their FLOPs and hardware efficiency (Supp. D,
                   "Inference Cost": over 10 Hz on one RTX 4080)
    plot ......... Figure 4 (training returns) and Figure 3 left (return and LPIPS against
                   diffusion steps)
    video ........ one evaluation episode, the real frame beside what the model imagined for
                   it (decoded by decoder.py's decoder), as MP4 and GIF
    dream ........ drive inside the model's imagination with the arrow keys, beside the real
                   car driven the same way (or record the two, driven by the planner, as GIF)

Each subcommand takes run directories made by `python valdi.py` (or their checkpoint.pt),
prints a table, and writes its numbers to RUN_DIR/eval/<subcommand>.json (plot and speed: see
their --help). Nothing here
re-implements the agent: networks, encoder, planner (Eq. 10), imagination, checkpoint loading and
the evaluation loop all come from valdi.py, so what is measured is exactly what was trained.

    python eval_diagnostics.py returns RUN_DIR [RUN_DIR ...] --diffusion-steps 1 2 4 8
    python eval_diagnostics.py consistency VALDI_RUN MLP_RUN
    python eval_diagnostics.py grounding VALDI_RUN MLP_RUN
    python eval_diagnostics.py speed --json speed.json
    python eval_diagnostics.py plot VALDI_RUN MLP_RUN --out-dir figures

Importing this module does no work (the tests import its pieces).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import decoder
import valdi

PROG = "eval_diagnostics.py"


# =============================================================================================
# 0. Shared pieces: the fixed tracks, loading runs, small statistics, tables, JSON
# =============================================================================================
EVAL_SEED = 12345  # Sec. 4 "evaluated on 100 fixed tracks"; the seed is the release's


def fixed_track_seeds(n: int = 100) -> list[int]:
    """The evaluation tracks: n integers in [0, 2^31 - 1) drawn once from default_rng(12345).

    Every run, every system and every diffusion-step count is evaluated on the same tracks, so
    differences between them are not differences between tracks (CarRacing's tracks vary a lot
    in difficulty). numpy's bounded integers are drawn one after another from the stream, so the
    first K of a longer draw are the first K tracks: --episodes K always means the same K tracks."""
    return [int(s) for s in np.random.default_rng(EVAL_SEED).integers(0, 2**31 - 1, size=n)]


@dataclass
class Run:
    """One trained agent, loaded for evaluation."""
    path: Path  # what the user gave: a RUN_DIR or a checkpoint file
    run_dir: Path  # the folder that holds it; results go to run_dir/eval
    args: valdi.Args  # the flags it was trained with (planner overrides applied)
    model: valdi.WorldModel
    agent: valdi.Agent  # the model with its planner flags, as valdi.plan takes it

    @property
    def label(self) -> str:
        return self.run_dir.name

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / "eval"


def run_dir_of(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def load_runs(paths: list[str], device: torch.device, overrides: dict | None = None) -> list[Run]:
    """decoder.load_agent for each path (one clear ValdiError for a missing, corrupt or foreign
    checkpoint). `overrides` replaces planner flags (population, elites, iterations) for this
    evaluation only; valdi.check_args refuses inconsistent combinations as training would."""
    runs = []
    for path in paths:
        agent = decoder.load_agent(path, device, **(overrides or {}))
        runs.append(Run(Path(path), run_dir_of(path), agent.args, agent.model, agent))
    return runs


def planner_overrides(ns: argparse.Namespace) -> dict:
    return {"pop_size": ns.pop_size, "num_elites": ns.num_elites, "cem_iters": ns.cem_iters, "precision": ns.precision,
            "compile": ns.compile}


def new_generator(device: torch.device, seed: int) -> torch.Generator:
    """Every random draw of the planner and of the diffusion sampler goes through this generator
    (valdi.plan and WorldModel.imagine take one), so a seed fixes an evaluation completely: the
    same tracks and seeds give the same returns twice on the CPU."""
    return torch.Generator(device=device).manual_seed(int(seed))


def summarize(values) -> dict:
    """mean, std, its standard error, min, max of a list of numbers. std is the population std
    (ddof 0): it describes the sample we measured. The standard error of the mean uses the
    sample std (ddof 1), std_1 / sqrt(n): the uncertainty of the mean as an estimate."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "std": None, "sem": None, "min": None, "max": None}
    sem = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"mean": float(x.mean()), "std": float(x.std()), "sem": sem, "min": float(x.min()), "max": float(x.max())}


def fmt(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A pipe table: readable in a terminal and pasteable into the README as is."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(row) for row in cells[1:]])


def planner_settings(args: valdi.Args) -> dict:
    """The planner an evaluation used, recorded with its numbers."""
    return {k: getattr(args, k) for k in ("pop_size", "num_elites", "cem_iters", "horizon", "precision")}


def read_json(path: Path) -> dict:
    """A JSON file this project wrote; a damaged one is a one-line error, not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise valdi.ValdiError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None


def progress(**kwargs):
    from tqdm import tqdm  # imported on use: importing this module stays cheap
    return tqdm(dynamic_ncols=True, **kwargs)


# =============================================================================================
# 1. returns: evaluation on the fixed tracks (Sec. 4, Fig. 3 left, Fig. 4 right)
# =============================================================================================
# The protocol is the agent's own loop with the exploration noise switched off: 600 frames,
# replan every action chunk (3 frames), execute the first chunk of the best plan. That loop is
# valdi.collect_trajectory, called here with noise_std = 0. Only the number of DDIM steps used to
# imagine futures changes between the columns of Fig. 3; training always used one step.

def evaluate_returns(run: Run, device: torch.device, track_seeds: list[int], diffusion_steps: int | None,
                     bar=None) -> dict:
    """Returns, lengths and planner rates of one run on the given tracks at one step count."""
    env = valdi.make_env(run.args)
    returns, lengths, speeds, hz, first_plans = [], [], [], [], []
    try:
        for seed in track_seeds:
            # One generator per episode, seeded by its track: an episode's result does not depend
            # on which episodes ran before it, so --episodes 10 reproduces the first 10 of 100.
            plans = []
            traj, stats = valdi.collect_trajectory(env, run.agent, noise_std=0.0,
                                                track_seed=seed, diffusion_steps=diffusion_steps,
                                                generator=new_generator(device, seed),
                                                on_plan=lambda z, a: plans.append(a) if not plans else None)
            first_plans.append(plans[0][0].float().cpu().numpy().tolist())  # from the same first frame every time
            returns.append(stats["return"])
            lengths.append(stats["length"])
            # Mean length of the band's speed bar (proprio[0], Supp. E; about 0 to 2): how fast the
            # agent drives, and a fingerprint of its actions when returns tie (early on every
            # policy scores 1000/N - 0.1 t).
            speeds.append(float(traj["proprio"][:, 0].mean()))
            hz.append(stats["planner_hz"])
            if bar is not None:
                bar.set_postfix(ret=f"{stats['return']:.1f}")
                bar.update(1)
    finally:
        env.close()
    return {"diffusion_steps": diffusion_steps, "returns": returns, "lengths": lengths, "mean_speeds": speeds,
            "planner_hz": float(np.median(hz)), "first_plans": first_plans, **summarize(returns)}


def compare_with_fp32(fp32: dict, other: dict) -> None:
    """How a lower precision changes what the agent does, on the tracks both evaluations share:
    the planned first sequence from the same first frame and generator seed, and the return
    (the paired difference, mean ± standard error over episodes)."""
    n = min(len(fp32["track_seeds"]), len(other["track_seeds"]))
    if fp32["track_seeds"][:n] != other["track_seeds"][:n]:
        return
    by_steps = {r["diffusion_steps"]: r for r in fp32["results"]}
    for r in other["results"]:
        if r["diffusion_steps"] not in by_steps:
            continue
        base = by_steps[r["diffusion_steps"]]
        actions = np.abs(np.array(r["first_plans"][:n]) - np.array(base.get("first_plans", [])[:n]))
        diff = summarize(np.array(r["returns"][:n]) - np.array(base["returns"][:n]))
        steps = r['diffusion_steps'] or '-'
        print(f"{other['planner']['precision']} - fp32 on {decoder.count(n, 'track')}, {steps} steps: return "
              f"{fmt(diff['mean'], 1)} ± {fmt(diff['sem'], 1)}; first planned actions differ by "
              f"{fmt(float(actions.mean()) if actions.size else None, 3)} on average (max {fmt(float(actions.max()) if actions.size else None, 3)})")


# What makes two returns evaluations comparable: the same tracks, frames, planner and device
# (its kind, name and fp32 matmul precision). Results that differ in any are kept apart.
PROTOCOL = ("track_seeds", "frames", "planner", "device", "device_name", "float32_matmul_precision")


def merge_results(old: dict | None, new: dict) -> dict:
    """Keep earlier step counts of the same protocol (decoder.result_path finds that file), so a
    sweep can be run one step count at a time."""
    if old is None:
        return new
    steps = {r["diffusion_steps"] for r in new["results"]}
    kept = [r for r in old.get("results", []) if r["diffusion_steps"] not in steps]
    results = sorted(kept + new["results"], key=lambda r: -1 if r["diffusion_steps"] is None else r["diffusion_steps"])
    return {**new, "results": results}


def read_returns(run_dir: Path) -> dict:
    """RUN/eval/returns.json, with the step counts it lacks taken from results of the same protocol
    measured on a CPU of another name (returns__<cpu>.json: same tracks, frames, planner, device kind
    and fp32 arithmetic), so a sweep split across machines is drawn whole."""
    data = read_json(run_dir / "eval" / "returns.json")
    same = [k for k in PROTOCOL if k != "device_name"]
    for path in sorted((run_dir / "eval").glob("returns__*.json")):
        other = read_json(path)
        if all(other.get(k) == data.get(k) for k in same):
            data = merge_results(other, data)
    return data


def cmd_returns(ns: argparse.Namespace) -> int:
    device = valdi.pick_device(ns.cuda)
    runs = load_runs(ns.runs, device, planner_overrides(ns))
    for run in runs:  # the evaluation episode length, whatever the run trained with (600, Supp. E)
        run.args = dataclasses.replace(run.args, max_episode_steps=ns.frames)
    seeds = fixed_track_seeds(ns.episodes)
    # A deterministic dynamics (the MLP) has no sampling steps: it is evaluated once (Fig. 3 draws
    # it as a horizontal line).
    plan_steps = {r.label: ((ns.diffusion_steps or [r.args.diffusion_steps]) if r.model.dynamics.stochastic else [None])
                  for r in runs}
    rows = []
    with progress(total=len(seeds) * sum(len(s) for s in plan_steps.values()), desc="returns", unit="ep") as bar:
        for run in runs:
            results = []
            for steps in plan_steps[run.label]:
                label = f" {decoder.count(steps, 'step')}" if steps else ""
                bar.set_description(f"returns {run.args.dynamics}{label}")
                results.append(evaluate_returns(run, device, seeds, steps, bar))
            data = {"run": run.path, "dynamics": run.args.dynamics, "frames": ns.frames,
                    "planner": planner_settings(run.args), **decoder.device_record(device),
                    "track_seeds": seeds, "results": results}
            # fp32 results in returns.json; other precisions beside it, compared with fp32 below.
            # Another protocol or device goes beside them too: a stored result is never replaced.
            path = run.eval_dir / ("returns.json" if run.args.precision == "fp32" else f"returns_{run.args.precision}.json")
            path, old = decoder.result_path(path, {k: data[k] for k in PROTOCOL})
            decoder.write_json(path, merge_results(old, data))
            bar.write(f"wrote {path}", file=sys.stderr)
            if run.args.precision != "fp32" and (run.eval_dir / "returns.json").exists():
                compare_with_fp32(read_json(run.eval_dir / "returns.json"), data)
            for r in results:
                rows.append([run.label, run.args.dynamics, r["diffusion_steps"] or "-", len(r["returns"]),
                             f"{fmt(r['mean'], 1)} ± {fmt(r['sem'], 1)}", fmt(r["std"], 1), fmt(r["min"], 1), fmt(r["max"], 1),
                             fmt(float(np.mean(r["mean_speeds"])), 2), fmt(r["planner_hz"], 1)])
    print(f"\nEvaluation returns on the first {len(seeds)} fixed tracks, {ns.frames} frames, no exploration "
          f"noise (device {device})")
    print(markdown_table(["run", "dynamics", "diffusion steps", "episodes", "mean ± s.e. over episodes", "std", "min", "max",
                          "mean speed bar", "planner Hz"], rows))
    return 0


# =============================================================================================
# 2. The arithmetic of Table 1 (Eq. 2, Eq. 3): arrays in, numbers out
# =============================================================================================
# Kept free of networks and environments so that a test can check it against a hand computation.
# Notation as in the paper: z_hat_h is the imagined latent at depth h (z_hat_0 = z_t, the real
# latent the rollout starts from), z_{t+h} is the real latent the agent reaches h world-model
# steps (3h env frames) later. V is the minimum of the two value heads, as everywhere in Valdi.

def td_residuals(rewards: np.ndarray, values: np.ndarray, gamma_wm: float) -> np.ndarray:
    """Eq. 2: delta_TD_h = R(z_hat_h, a_h) + g V(z_hat_{h+1}) - V(z_hat_h), h = 0..H-1.

    rewards (N, H): R(z_hat_h, a_h) along N imagined rollouts; values (N, H+1): V(z_hat_h).
    g is the discount of one world-model step, gamma^3, the one the value was trained with.
    A positive residual means V(z_hat_h) underestimates its own bootstrap target."""
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    return rewards + gamma_wm * values[:, 1:] - values[:, :-1]


def drift_residuals(real_values: np.ndarray, imagined_values: np.ndarray) -> list[np.ndarray]:
    """Eq. 3 for one closed-loop episode: delta_drift_h = V(z_{t+h}) - V(z_hat_h), h = 1..H.

    real_values (R,): V of the real latents at world-model steps t = 0..R-1 of the episode.
    imagined_values (T, H+1): V(z_hat_h) of the rollout imagined at each step t = 0..T-1 where
    the agent planned (T <= R). Returns a list of H arrays; entry h-1 holds delta_drift_h for
    every t whose real partner z_{t+h} exists (t + h <= R - 1): near the end of an episode
    the deep rollouts have nothing real to be compared with, so deeper h have fewer samples.
    A negative residual means an optimistic imagination: reality is worth less than imagined."""
    real_values, imagined_values = np.asarray(real_values, np.float64), np.asarray(imagined_values, np.float64)
    T, H = imagined_values.shape[0], imagined_values.shape[1] - 1
    out = []
    for h in range(1, H + 1):
        n = max(0, min(T, len(real_values) - h))  # plans whose real z_{t+h} was reached
        out.append(real_values[h:h + n] - imagined_values[:n, h])
    return out


def error_rows(deltas_per_h: list[np.ndarray], first_h: int, groups_per_h: list[np.ndarray]) -> list[dict]:
    """Table 1's numbers per depth: mean signed, its standard error, mean absolute, std, count.
    The paper prints the signed mean; the absolute mean shows whether it hides errors of both
    signs. Residuals from one episode are not independent (neighbouring states look alike), so
    the standard error is taken over episodes: the std of the per-episode means over sqrt of
    their number (groups_per_h gives each residual's episode)."""
    rows = []
    for i, (d, g) in enumerate(zip(deltas_per_h, groups_per_h)):
        d, g = np.asarray(d, np.float64).ravel(), np.asarray(g).ravel()
        n = d.size
        episode_means = [d[g == e].mean() for e in np.unique(g)]
        sem = float(np.std(episode_means, ddof=1) / math.sqrt(len(episode_means))) if len(episode_means) > 1 else None
        rows.append({"h": first_h + i, "mean": float(d.mean()) if n else None, "sem": sem,
                     "mean_abs": float(np.abs(d).mean()) if n else None,
                     "std": float(d.std()) if n else None, "count": int(n), "episodes": len(episode_means)})
    return rows


def table1_side_by_side(name: str, results: list[tuple[str, list[dict]]]) -> str:
    """Table 1's layout: one row per run, one column per depth h, the signed mean in each cell.
    With several runs, ** marks the smallest |mean| per column (the paper's bold)."""
    hs = [row["h"] for row in results[0][1]]
    best = {}
    if len(results) > 1:
        for i, _ in enumerate(hs):
            means = [(abs(rows[i]["mean"]), j) for j, (_, rows) in enumerate(results)
                     if i < len(rows) and rows[i]["mean"] is not None]
            if means:
                best[i] = min(means)[1]
    table = []
    for j, (label, rows) in enumerate(results):
        cells = [fmt(r["mean"]) + (f" ± {fmt(r['sem'])}" if r.get("sem") is not None else "") for r in rows]
        table.append([label] + [f"**{c}**" if best.get(i) == j else c for i, c in enumerate(cells)])
    return markdown_table([name] + [f"h={h}" for h in hs], table)


def print_table1(name: str, title: str, results: list[tuple[str, list[dict]]]) -> None:
    """The side-by-side row of Table 1, then each run's details."""
    print(f"\n{title}")
    print(table1_side_by_side(name, results))
    for label, rows in results:
        print(f"\n{label}")
        print(detail_table(rows))


def detail_table(rows: list[dict]) -> str:
    return markdown_table(["h", "mean", "s.e. (over episodes)", "mean abs", "std", "count", "episodes"],
                          [[r["h"], fmt(r["mean"], 3), fmt(r["sem"], 3), fmt(r["mean_abs"], 3), fmt(r["std"], 3),
                            r["count"], r["episodes"]] for r in rows])


# --- the same arithmetic fed by the model ------------------------------------------------------
@torch.inference_mode()
def td_of_rollouts(model: valdi.WorldModel, latents: torch.Tensor, actions: torch.Tensor,
                   gamma_wm: float) -> np.ndarray:
    """delta_TD (N, H) of imagined rollouts latents (N, H+1, D) under actions (N, H, A): the
    reward head on (z_hat_h, a_h) for h < H and the value (min of heads) at every depth."""
    rewards = model.reward(latents[:, :-1], actions)
    values = model.min_value(latents)
    return td_residuals(rewards.float().cpu().numpy(), values.float().cpu().numpy(), gamma_wm)


@torch.inference_mode()
def drift_of_episode(model: valdi.WorldModel, real_latents: torch.Tensor,
                     imagined_latents: torch.Tensor) -> list[np.ndarray]:
    """delta_drift of one episode: real latents (R, D), imagined rollouts (T, H+1, D)."""
    return drift_residuals(model.min_value(real_latents).float().cpu().numpy(),
                           model.min_value(imagined_latents).float().cpu().numpy())


# =============================================================================================
# 3. consistency: value self-consistency along imagined rollouts (Eq. 2, Table 1 top)
# =============================================================================================
# 10,000 real states from an on-policy dataset of the system itself (not a replay buffer full of
# exploration): this is where the agent's value must be consistent, because it is where it
# plans. The dataset is decoder.py's (`python decoder.py collect RUN --episodes 50`): the trained
# agent driving with noise 0 on tracks of its own, none of them a track of the returns
# evaluation. From each state the planner proposes an action sequence (exactly valdi.plan,
# batched over many start states at once), the dynamics imagine it, and Eq. 2 is evaluated at
# each depth.
def on_policy_states(run: Run, num_states: int, dataset: Path | None, rng: np.random.Generator) -> dict:
    """num_states frames drawn uniformly without replacement from the run's on-policy dataset:
    rgb (N, 96, 96, 3), proprio (N, 7), and the episode (track) of each."""
    data = decoder.load_dataset(run.run_dir, dataset)
    pick = np.sort(rng.choice(len(data["rgb"]), size=min(num_states, len(data["rgb"])), replace=False))
    tracks = set(int(s) for s in data.get("track_seeds", []))
    return {"rgb": data["rgb"][pick], "proprio": data["proprio"][pick].astype(np.float32),
            "episode": data["episode"][pick], "source": str(dataset or decoder.dataset_path(run.run_dir)),
            "evaluation_tracks_in_dataset": len(tracks & set(fixed_track_seeds(100)))}


def consistency_of_run(run: Run, device: torch.device, rgb: np.ndarray, proprio: np.ndarray, steps: int,
                       plan_batch: int, generator: torch.Generator, bar=None) -> np.ndarray:
    """delta_TD (N, H) for N start states, planned and imagined plan_batch states at a time."""
    deltas = []
    for i in range(0, len(rgb), plan_batch):
        with torch.inference_mode():
            z = decoder.encode_frames(run.model, rgb[i:i + plan_batch], proprio[i:i + plan_batch], device)
            actions = valdi.plan(run.agent, z, 0.0, steps, generator)
            # A fresh imagination of the chosen plan, not the one the planner scored it on: the
            # best of 512 scored futures is biased towards optimism; a new sample is not.
            latents = run.model.imagine(z, actions, steps, generator)
        deltas.append(td_of_rollouts(run.model, latents, actions, run.args.gamma_wm))
        if bar is not None:
            bar.update(len(z))
    return np.concatenate(deltas)


def run_steps(run: Run, requested: int | None) -> int | None:
    """Diffusion steps for planning and imagination: the run's own unless asked otherwise."""
    return (requested or run.args.diffusion_steps) if run.model.dynamics.stochastic else None


def cmd_consistency(ns: argparse.Namespace) -> int:
    device = valdi.pick_device(ns.cuda)
    runs = load_runs(ns.runs, device, planner_overrides(ns))
    if ns.dataset is not None and len(runs) > 1:
        raise valdi.ValdiError("--dataset names one run's dataset; give one run with it")
    results = []
    for run in runs:
        states = on_policy_states(run, ns.num_states, ns.dataset, np.random.default_rng(ns.seed))
        steps = run_steps(run, ns.diffusion_steps)
        with progress(total=len(states["rgb"]), desc=f"consistency {run.args.dynamics}", unit="state") as bar:
            deltas = consistency_of_run(run, device, states["rgb"], states["proprio"], steps, ns.plan_batch,
                                        new_generator(device, ns.seed), bar)
        rows = error_rows(list(deltas.T), 0, [states["episode"]] * deltas.shape[1])
        data = {"run": run.path, "dynamics": run.args.dynamics, "diffusion_steps": steps,
                "num_states": len(states["rgb"]), "num_tracks": len(np.unique(states["episode"])),
                "evaluation_tracks_in_dataset": states["evaluation_tracks_in_dataset"],
                "source": states["source"], "gamma_wm": run.args.gamma_wm,
                "planner": planner_settings(run.args), **decoder.device_record(device), "seed": ns.seed, "rows": rows}
        path, _ = decoder.result_path(run.eval_dir / "consistency.json", {k: data[k] for k in (
            "num_states", "diffusion_steps", "planner", "seed", "device", "device_name", "float32_matmul_precision")})
        path = decoder.write_json(path, data)
        print(f"wrote {path}", file=sys.stderr)
        results.append((run.label, rows))
    counts = "/".join(dict.fromkeys(str(rows[0]["count"]) for _, rows in results))  # start states per run
    print_table1("delta_TD", f"Self-consistency delta_TD_h (Eq. 2) from {counts} start states, signed mean ± "
                 f"standard error over episodes (the dataset's episodes the states come from; device {device})",
                 results)
    return 0


# =============================================================================================
# 4. grounding: imagined value against the value of what really happened (Eq. 3, Table 1 bottom)
# =============================================================================================
# The agent drives as in evaluation (noise 0, replan every chunk). At each world-model step t we
# keep the plan it acts on, imagine that plan's rollout z_hat_{0..H} and, once the episode is over,
# pair z_hat_h with the real latent z_{t+h} the agent reached h world-model steps later. Beyond the
# first chunk the agent has replanned, so the real path follows later plans: the diagnostic asks
# how much the imagined future is worth compared with the future the agent actually gets.

@torch.inference_mode()
def closed_loop_episode(env, run: Run, device: torch.device, track_seed: int, steps: int | None,
                        generator: torch.Generator) -> dict:
    """One episode of the agent's own loop (valdi.collect_trajectory, noise 0) that also records,
    at every plan, the real latent z_t and a rollout imagined from the plan the agent acted on.
    Returns real latents (R, D), imagined rollouts (T, H+1, D), the return and the length."""
    args, model = run.args, run.model
    real, imagined = [], []

    def record(z, actions):  # z_t (1, D), the plan (1, H, 9)
        real.append(z[0])
        imagined.append(model.imagine(z, actions, steps or 1, generator)[0])  # z_hat_{0..H}

    traj, stats = valdi.collect_trajectory(env, run.agent, 0.0, track_seed, steps, generator, on_plan=record)
    # The last observation is a real z_{t+1} only if the last chunk ran in full (it then sits
    # exactly 3 frames after the last plan) and is not a terminal state: a terminal state has
    # no future, its value is never trained (the TD target masks it), so comparing it would
    # measure nothing. Truncation at 600 frames is not terminal (Supp. E).
    if stats["length"] == len(real) * args.action_chunk and not traj["terminated"]:
        last = {"rgb": traj["rgb"][-1], "proprio": traj["proprio"][-1]}
        real.append(valdi.encode_observation(model, last, device)[0])
    return {"real": torch.stack(real), "imagined": torch.stack(imagined), "return": stats["return"],
            "length": stats["length"]}


def cmd_grounding(ns: argparse.Namespace) -> int:
    device = valdi.pick_device(ns.cuda)
    runs = load_runs(ns.runs, device, planner_overrides(ns))
    seeds = fixed_track_seeds(ns.episodes)
    results = []
    with progress(total=len(seeds) * len(runs), desc="grounding", unit="ep") as bar:
        for run in runs:
            # An episode of --wm-steps world-model steps is --wm-steps * 3 env frames (200 -> 600).
            run.args = dataclasses.replace(run.args, max_episode_steps=ns.wm_steps * run.args.action_chunk)
            steps = run_steps(run, ns.diffusion_steps)
            env = valdi.make_env(run.args)
            per_h = [[] for _ in range(run.args.horizon)]
            episode_of = [[] for _ in range(run.args.horizon)]
            returns, lengths = [], []
            bar.set_description(f"grounding {run.args.dynamics}")
            try:
                for seed in seeds:
                    episode = closed_loop_episode(env, run, device, seed, steps, new_generator(device, seed))
                    for h, d in enumerate(drift_of_episode(run.model, episode["real"], episode["imagined"])):
                        per_h[h].append(d)
                        episode_of[h].append(np.full(len(d), len(returns)))
                    returns.append(episode["return"])
                    lengths.append(episode["length"])
                    bar.set_postfix(ret=f"{episode['return']:.1f}")
                    bar.update(1)
            finally:
                env.close()
            rows = error_rows([np.concatenate(d) for d in per_h], 1, [np.concatenate(e) for e in episode_of])
            data = {"run": run.path, "dynamics": run.args.dynamics, "diffusion_steps": steps,
                    "wm_steps": ns.wm_steps, "track_seeds": seeds, "returns": returns, "lengths": lengths,
                    "planner": planner_settings(run.args), **decoder.device_record(device), "rows": rows}
            path, _ = decoder.result_path(run.eval_dir / "grounding.json", {k: data[k] for k in (
                "track_seeds", "wm_steps", "diffusion_steps", "planner", "device", "device_name",
                "float32_matmul_precision")})
            path = decoder.write_json(path, data)
            bar.write(f"wrote {path}", file=sys.stderr)
            results.append((run.label, rows))
    print_table1("delta_drift", f"Grounding delta_drift_h (Eq. 3) from {len(seeds)} closed-loop episodes of "
                 f"{ns.wm_steps} world-model steps, signed mean ± standard error over episodes (device {device})",
                 results)
    return 0


# =============================================================================================
# 5. speed: planner, acting and update rates, eager or compiled, fp32 or bf16 (Supp. D)
# =============================================================================================
# The paper: "over 10 Hz planning and over 30 Hz acting on one RTX 4080". Every rate here is
# the median of timed calls after warm-up; the first call of a compiled variant (the compile
# itself) is timed apart and never mixed into a rate. Efficiency is the FLOP rate reached, as a
# fraction of a dense n x n matmul of the same precision on the same device (nanoGPT's MFU
# idea): FLOPs are counted by torch's own FlopCounterMode on the eager model, matmuls and
# convolutions only.
VARIANTS = [("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16")]


def sync(device: torch.device) -> None:
    """CUDA kernels run asynchronously: without a barrier the clock would stop at launch time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` calls after `warmup` more)."""
    def once():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    first = once()
    for _ in range(warmup):
        once()
    return first, statistics.median(once() for _ in range(repeats))


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def paper_flops(ns: argparse.Namespace, device: torch.device) -> dict:
    """FLOPs of one plan (--planner-dynamics, 1 step) and one Valdi update at these settings, eager fp32."""
    flops = {}
    for what, dynamics in (("plan", ns.planner_dynamics), ("update", "diffusion")):
        args = valdi.Args(dynamics=dynamics, pop_size=ns.pop_size, num_elites=ns.num_elites, cem_iters=ns.cem_iters,
                          horizon=ns.horizon, batch_size=ns.batch_size, cuda=ns.cuda)
        agent = valdi.make_agent(args, device)
        if what == "plan":
            z = torch.randn(1, args.latent_dim, device=device)
            flops[what] = flops_of(lambda: valdi.plan(agent, z, 0.0, 1))
        else:
            batch = synthetic_batch(args, device)
            flops[what] = flops_of(lambda: valdi.update(agent, batch))
    return flops


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a dense n x n matmul of this precision: the best this device does."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats)[1]


def synthetic_batch(args: valdi.Args, device: torch.device) -> dict:
    """A replay batch of the real layout, cut by valdi.ReplayBuffer from one random trajectory
    exactly one segment long. Throughput does not depend on the pixel values."""
    rng = np.random.default_rng(0)
    span = args.action_chunk * (args.horizon + 1)
    buffer = valdi.ReplayBuffer(1, span, args.horizon, args.action_chunk, rng)
    buffer.add({"rgb": rng.integers(0, 256, (span + 1, 96, 96, 3), dtype=np.uint8),
                "proprio": rng.standard_normal((span + 1, valdi.PROPRIO_DIM)).astype(np.float32),
                "actions": rng.uniform(-1, 1, (span, valdi.ENV_ACTION_DIM)).astype(np.float32),
                "rewards": rng.standard_normal(span).astype(np.float32), "terminated": False})
    return valdi.to_device(buffer.sample(args.batch_size), device)


def speed_of(mode: str, precision: str, ns: argparse.Namespace, device: torch.device) -> dict:
    """One row of the table: the planner of --planner-dynamics at 1 and 8 steps, acting, and one
    update of each of --dynamics, with fresh networks (speed depends on shapes, not on weights)."""
    row, compile_s = {"mode": mode, "precision": precision}, {}
    for dynamics in dict.fromkeys([*ns.dynamics, ns.planner_dynamics]):
        args = valdi.Args(dynamics=dynamics, pop_size=ns.pop_size, num_elites=ns.num_elites, cem_iters=ns.cem_iters,
                          horizon=ns.horizon, batch_size=ns.batch_size, cuda=ns.cuda,
                          compile=mode == "compiled", precision=precision)
        valdi.check_args(args)
        valdi.check_device(args, device)
        agent = valdi.make_agent(args, device)  # speed depends on shapes, not on weights
        batch = synthetic_batch(args, device)
        if dynamics in ns.dynamics:
            compile_s[f"update {dynamics}"], update_s = timed(lambda: valdi.update(agent, batch), device, ns.repeats)
            row[f"update_ms_{dynamics}"] = 1000 * update_s
        if dynamics != ns.planner_dynamics:
            continue
        z = torch.randn(1, args.latent_dim, device=device)  # one start latent, as the agent plans
        for steps in (1, 8):  # .cpu() on the plan is the agent's one sync per plan
            compile_s[f"plan {steps} steps"], plan_s = timed(lambda: valdi.plan(agent, z, 0.0, steps).cpu(),
                                                             device, ns.repeats)
            row[f"plan_hz_{steps}"] = 1 / plan_s
        row["act_fps"] = acting_rate(agent, ns.act_frames)
    row["compile_s"] = {k: v for k, v in compile_s.items()} if mode == "compiled" else {}
    return row


def acting_rate(agent: valdi.Agent, frames: int) -> float:
    """Env frames per second of the agent's own loop (valdi.collect_trajectory: encoder,
    planner, env.step), the track's generation at reset left out."""
    env = valdi.make_env(dataclasses.replace(agent.args, max_episode_steps=frames))
    try:
        valdi.collect_trajectory(env, agent, 0.0, track_seed=0)  # warm-up
        t0 = time.perf_counter()
        env.reset(seed=1)
        reset_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, stats = valdi.collect_trajectory(env, agent, 0.0, track_seed=1)
        return stats["length"] / (time.perf_counter() - t0 - reset_s)
    finally:
        env.close()


def batch_preparation(ns: argparse.Namespace, device: torch.device) -> dict:
    """How long an update waits for its batch: gathered in line before each update, and by
    valdi.replay_batches' worker thread during the previous update (what training does). The
    buffer holds --replay-trajectories trajectories of 600 frames (the gather's cost is memory
    traffic, so the buffer must be larger than the caches); eager fp32 Valdi updates."""
    args = valdi.Args(batch_size=ns.batch_size, horizon=ns.horizon, cuda=ns.cuda)
    rng = np.random.default_rng(0)
    buffer = valdi.ReplayBuffer(ns.replay_trajectories, args.max_episode_steps, args.horizon, args.action_chunk, rng)
    n = args.max_episode_steps
    trajectory = {"rgb": rng.integers(0, 256, (n + 1, 96, 96, 3), dtype=np.uint8),
                  "proprio": rng.standard_normal((n + 1, valdi.PROPRIO_DIM)).astype(np.float32),
                  "actions": rng.uniform(-1, 1, (n, valdi.ENV_ACTION_DIM)).astype(np.float32),
                  "rewards": rng.standard_normal(n).astype(np.float32), "terminated": False}
    for _ in range(ns.replay_trajectories):
        buffer.add(trajectory)
    agent = valdi.make_agent(args, device)
    learn = lambda batch: valdi.update(agent, batch)
    fixed = valdi.to_device(buffer.sample(args.batch_size), device)
    updates = ns.prep_updates
    prepare_s = timed(lambda: valdi.to_device(buffer.sample(args.batch_size), device), device, ns.repeats)[1]
    update_s = timed(lambda: learn(fixed), device, ns.repeats)[1]
    inline_s = timed(lambda: [learn(valdi.to_device(buffer.sample(args.batch_size), device)) for _ in range(updates)],
                     device, 1)[1] / updates
    worker_s = timed(lambda: [learn(b) for b in valdi.replay_batches(buffer, args.batch_size, updates, device)],
                     device, 1)[1] / updates
    return {"replay_trajectories": ns.replay_trajectories, "batch_size": args.batch_size, "updates": updates,
            "prepare_ms": 1000 * prepare_s, "update_ms": 1000 * update_s,
            "inline_ms_per_update": 1000 * inline_s, "worker_ms_per_update": 1000 * worker_s,
            "waiting_share_inline": max(0.0, inline_s - update_s) / inline_s,
            "waiting_share_worker": max(0.0, worker_s - update_s) / worker_s}


def cmd_speed(ns: argparse.Namespace) -> int:
    device = valdi.pick_device(ns.cuda)
    ns.dynamics = list(dict.fromkeys(["diffusion", *ns.dynamics]))  # Valdi's update: the projection's
    precisions = [p for p in ns.precisions if p != "bf16" or valdi.has_native_bf16(device)]
    if precisions != ns.precisions:
        print(f"note: bf16 skipped: this {device.type} device has no native bfloat16 arithmetic", file=sys.stderr)
    variants = [v for v in VARIANTS if v[0] in ns.modes and v[1] in precisions]
    if not variants:
        raise valdi.ValdiError("nothing to measure: every requested variant needs bf16, which this device lacks")
    with progress(total=len(variants), desc="speed", unit="variant") as bar:
        peak = {p: matmul_peak(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[p], ns.repeats)
                for p in precisions}
        rows = []
        for mode, precision in variants:
            bar.set_description(f"speed {mode} {precision}")
            rows.append(speed_of(mode, precision, ns, device))
            bar.update(1)
    base = rows[0]  # eager fp32 when it was measured: the ratios' reference
    flops = paper_flops(ns, device)
    prep = batch_preparation(ns, device) if ns.replay_trajectories else None
    name = f"{decoder.device_name(device)}" + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"\nSpeed on {device} ({name}); planner {ns.pop_size} x {ns.cem_iters}, H = {ns.horizon}; update batch "
          f"{ns.batch_size}; median of {ns.repeats}; ratios to {base['mode']} {base['precision']}; efficiency: "
          f"FLOP rate / dense matmul of that precision ({', '.join(f'{p} {v / 1e12:.2f} TFLOP/s' for p, v in peak.items())})")
    table = []
    planner, label = ns.planner_dynamics, lambda kind: valdi.DYNAMICS[kind].label
    for r in rows:
        ratio = lambda key, inverse=False: (base[key] / r[key]) if inverse else (r[key] / base[key])
        eff = lambda what, per_s: fmt(100 * flops[what] * per_s / peak[r["precision"]], 1)
        table.append([f"{r['mode']} {r['precision']}", f"{fmt(r['plan_hz_1'])} ({fmt(ratio('plan_hz_1'))}x)",
                      f"{fmt(r['plan_hz_8'])} ({fmt(ratio('plan_hz_8'))}x)", f"{fmt(r['act_fps'], 1)} ({fmt(ratio('act_fps'))}x)",
                      *(f"{fmt(r[f'update_ms_{kind}'], 1)} ({fmt(ratio(f'update_ms_{kind}', True))}x)"
                        for kind in ns.dynamics),
                      eff("plan", r["plan_hz_1"]), eff("update", 1000 / r["update_ms_diffusion"])])
    print(markdown_table(["variant", f"plan Hz, 1 step ({label(planner)})", "plan Hz, 8 steps", "acting frames/s",
                          *(f"update ms ({label(kind)})" for kind in ns.dynamics), "plan % of peak",
                          "update % of peak (Valdi)"], table))
    # A whole run of the paper's length, 5000 trajectories = 3M env frames with a plan every 3 and
    # 300k updates, at the rates measured here; the paper's run only if its settings were measured.
    paper = valdi.Args()
    measured = (ns.pop_size, ns.num_elites, ns.cem_iters, ns.horizon, ns.batch_size)
    at_paper = measured == (paper.pop_size, paper.num_elites, paper.cem_iters, paper.horizon, paper.batch_size)
    what = ("the paper's run" if at_paper else
            f"a run of the paper's length at these settings (planner {ns.pop_size} x {ns.num_elites} x {ns.cem_iters}, "
            f"H = {ns.horizon}, batch {ns.batch_size}; not the paper's)")
    for r in rows:
        if r["compile_s"]:
            print(f"compile time, {r['mode']} {r['precision']} (first call, not in the rates): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_s"].items()))
        hours = (3e6 / r["act_fps"] + 3e5 * r["update_ms_diffusion"] / 1000) / 3600
        print(f"projected {what}, {r['mode']} {r['precision']}: {hours:.1f} h (3M frames at "
              f"{r['act_fps']:.1f}/s + 300k Valdi updates at {r['update_ms_diffusion']:.1f} ms)")
    if prep:
        print(f"batch preparation, batch {prep['batch_size']} from {prep['replay_trajectories']} trajectories: "
              f"gather and copy {prep['prepare_ms']:.1f} ms, update {prep['update_ms']:.1f} ms; an update waits for "
              f"its batch {100 * prep['waiting_share_inline']:.1f}% of its time when the batch is gathered in line, "
              f"{100 * prep['waiting_share_worker']:.1f}% with the worker thread ({prep['updates']} updates each)")
    if ns.json:
        path = decoder.write_json(Path(ns.json), {
            **decoder.device_record(device), "device_label": name, "torch": torch.__version__, "matmul_peak": peak,
            "flops": flops, "flags": {k: v for k, v in vars(ns).items() if k != "func"}, "rows": rows,
            "batch_preparation": prep})
        print(f"wrote {path}", file=sys.stderr)
    return 0


# =============================================================================================
# 6. plot: Figure 4 (training returns) and Figure 3 left (return and LPIPS vs diffusion steps)
# =============================================================================================
def read_progress(run_dir: Path) -> dict[str, np.ndarray]:
    """valdi.py's progress.csv as one float array per column (NaN where a cell is empty: the
    seed trajectories have no losses). A row that is not numbers is one error naming its line."""
    path = run_dir / "progress.csv"
    if not path.is_file():
        raise valdi.ValdiError(f"no progress.csv in {run_dir} (is it a run directory made by valdi.py?)")
    columns = {name: [] for name in valdi.CSV_FIELDS}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            for name in columns:
                cell = row.get(name) or ""
                try:
                    columns[name].append(float(cell) if cell.strip() else math.nan)
                except ValueError:
                    raise valdi.ValdiError(f"{path} line {line}: {name} is {cell[:40]!r}, not a number") from None
    return {name: np.asarray(values, np.float64) for name, values in columns.items()}


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` trajectories (over fewer at the start, so the curve
    begins with the first trajectory instead of `window` trajectories in)."""
    c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def run_flags(run_dir: Path) -> dict:
    """The run's flags from args.json (valdi.py writes it at the start); {} when unreadable."""
    try:
        return json.loads((run_dir / "args.json").read_text())
    except (OSError, ValueError):
        return {}


# The training-curve figure and the block means draw every statistic an update reports
# (valdi.UPDATE_STATS, the total aside), titled here where a title is known, else by name.
CURVE_TITLES = {"dynamics": "dynamics loss (each kind its own)", "reward": "reward loss", "value": "value (TD) loss",
                "sigreg": "SIGReg", "latent_norm": "mean |z_t|"}
TRAINING_CURVES = [(valdi.stat_column(name), CURVE_TITLES.get(name, name)) for name in valdi.UPDATE_STATS
                   if name != "total"]


def block_means(log: dict, block: int) -> list[dict]:
    """Mean return, losses and latent norm over consecutive blocks of `block` trajectories (the
    loss columns over the trajectories that had updates)."""
    rows = []
    for start in range(0, len(log["return"]), block):
        part = slice(start, start + block)
        row = {"trajectories": f"{int(log['trajectory'][part][0])}-{int(log['trajectory'][part][-1])}"}
        for column in ["return", *(c for c, _ in TRAINING_CURVES)]:
            values = log[column][part]
            row[column] = float(np.nanmean(values)) if np.isfinite(values).any() else None
        rows.append(row)
    return rows


def seed_block_means(per_seed: list[list[dict]]) -> list[dict]:
    """Block means of the return, per seed and their mean ± s.e. over seeds, for the blocks
    every seed completed."""
    rows = []
    for blocks in zip(*per_seed):
        if len({b["trajectories"] for b in blocks}) > 1:  # a seed's last block is not complete
            break
        values = [b["return"] for b in blocks]
        stats = summarize(values)
        rows.append({"trajectories": blocks[0]["trajectories"], "per_seed": values,
                     "mean": stats["mean"], "sem": stats["sem"], "seeds": len(values)})
    return rows


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    valdi.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def run_labels(run_dirs: list[Path]) -> dict[Path, str]:
    """The shortest path tails, one depth for all, that tell the runs apart: folder names, or
    parent/name for every run when two share a name (docs/learning-check/valdi/seed1 and
    .../mlp/seed1 become valdi/seed1 and mlp/seed1)."""
    parts = {d: d.resolve().parts for d in run_dirs}
    for k in range(1, max(map(len, parts.values()), default=1) + 1):
        labels = {d: "/".join(p[-k:]) for d, p in parts.items()}
        if len(set(labels.values())) == len(labels):
            return labels
    return {d: str(d) for d in run_dirs}  # the same folder given twice


def by_system(runs: dict) -> dict:
    """Runs grouped by their dynamics: the runs of one system are its seeds."""
    systems = {}
    for run_dir, (flags, log) in runs.items():
        kind = valdi.DYNAMICS.get(flags.get("dynamics"))
        systems.setdefault(kind.label if kind else str(flags.get("dynamics")), []).append((run_dir, flags, log))
    return systems


def seed_mean(curves: list[np.ndarray]) -> np.ndarray:
    """The mean over seeds of per-seed curves, over the trajectories every seed reached."""
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0)


def plot_training_returns(runs: dict, labels: dict, window: int, path: Path) -> Path:
    """Fig. 4 (left): per seed, the trailing mean of the training returns (thin); per system,
    the mean over its seeds (thick). One seed: the thin line is its raw returns."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for color, (system, seeds) in zip(COLORS, by_system(runs).items()):
        curves = [moving_average(log["return"], window) for _, _, log in seeds]
        for run_dir, flags, log in seeds:
            thin = log["return"] if len(seeds) == 1 else moving_average(log["return"], window)
            ax.plot(log["trajectory"], thin, color=color, alpha=0.3, linewidth=0.8)
        mean = seed_mean(curves)
        ax.plot(np.arange(len(mean)), mean, color=color, linewidth=2.2, marker="o" if len(mean) < 20 else None,
                markersize=3,
                label=f"{system}, " + (f"mean of {len(seeds)} seeds" if len(seeds) > 1 else labels[seeds[0][0]]))
        flags = seeds[0][1]
        if "seed_trajectories" in flags:  # Algorithm 1: no updates before this line
            ax.axvline(flags["seed_trajectories"] - 0.5, color=color, linestyle=":", linewidth=1)
    frames = sorted({str(flags.get("max_episode_steps", "?")) for flags, _ in runs.values()})
    ax.set_xlabel("training trajectory (dotted: end of the seed trajectories)")
    ax.set_ylabel(f"return per trajectory ({', '.join(frames)} frames)")
    ax.set_title(f"Training returns (Fig. 4 left); trailing mean of {window}: thin per seed, thick over seeds",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_losses(runs: dict, window: int, path: Path) -> Path:
    """The terms of Eq. 9 and the latent norm per trajectory (mean over its updates). Not a figure
    of the paper, but the first thing to look at while returns do not move yet: a falling
    dynamics loss, SIGReg near its floor and a steady latent norm mean the model learns."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(3.3 * len(TRAINING_CURVES), 3.5))
    for color, (system, seeds) in zip(COLORS, by_system(runs).items()):
        for ax, (column, _) in zip(axes, TRAINING_CURVES):
            per_seed = [log[column][~np.isnan(log["loss_total"])] for _, _, log in seeds]
            first = int(seeds[0][2]["trajectory"][~np.isnan(seeds[0][2]["loss_total"])][0])
            mean = seed_mean(per_seed)  # per trajectory, over seeds
            x = first + np.arange(len(mean))
            ax.plot(x, mean, color=color, alpha=0.3, linewidth=0.7)
            ax.plot(x, moving_average(mean, window), color=color, linewidth=1.8,
                    marker="o" if len(x) < 20 else None, markersize=3,  # a short run's points stay visible
                    label=f"{system} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    for ax, (column, title) in zip(axes, TRAINING_CURVES):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training trajectory")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training losses (each trajectory's updates, mean over seeds); thick: trailing mean of {window}",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_diffusion_steps(evals: dict, labels: dict, path: Path) -> Path:
    """Fig. 3 (left): evaluation return against inference steps (DDIM for diffusion, Euler for flow), each point ± one
    standard error over its episodes. A color per system, a marker (or dash) per seed; the MLP has no steps and is a
    horizontal line. decoder.py's LPIPS diversity (when present) goes on a second axis, as in the paper, dotted, with
    its seed's marker drawn hollow."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    ax2, all_steps, groups = None, set(), {}
    for run_dir, data in evals.items():
        groups.setdefault(data["dynamics"], []).append((run_dir, data))
    for color, (dynamics, group) in zip(COLORS, groups.items()):
        kind = valdi.DYNAMICS.get(dynamics)
        for j, (run_dir, data) in enumerate(group):  # the seeds of one system
            results = data["results"]
            if kind is not None and not kind.stochastic:
                r = results[0]
                ax.axhline(r["mean"], color=color, linestyle=["--", "-.", ":"][j % 3],
                           label=f"{labels[run_dir]} ({kind.label}, {decoder.count(len(r['returns']), 'episode')})")
                if r.get("sem"):
                    ax.axhspan(r["mean"] - r["sem"], r["mean"] + r["sem"], color=color, alpha=0.08)
                continue
            steps = np.array([r["diffusion_steps"] for r in results])
            mean = np.array([r["mean"] for r in results])
            sem = np.array([r.get("sem") or 0.0 for r in results])
            all_steps.update(steps.tolist())
            episodes = sorted({len(r["returns"]) for r in results})
            marker = "os^Dv"[j % 5]
            ax.errorbar(steps, mean, yerr=sem, color=color, marker=marker, capsize=3, linewidth=1.5,
                        label=f"{labels[run_dir]} ({kind.label if kind else data['dynamics']}, "
                              f"{'/'.join(map(str, episodes))} episodes per point)")
            diversity = decoder.decoder_dir(run_dir) / "diversity.json"
            if diversity.is_file():
                lp = read_json(diversity)
                if not {"diffusion_steps", "lpips_mean"} <= set(lp):
                    raise valdi.ValdiError(f"{diversity} lacks diffusion_steps / lpips_mean (written by decoder.py?)")
                ax2 = ax2 or ax.twinx()
                # ± s.e. over start states (older files hold only the spread, lpips_std).
                spread = [v or 0.0 for v in lp["lpips_sem"]] if "lpips_sem" in lp else lp.get("lpips_std")
                ax2.errorbar(lp["diffusion_steps"], lp["lpips_mean"], yerr=spread, color=color,
                             linestyle=":", marker=marker, markerfacecolor="white", capsize=3,
                             label=f"{labels[run_dir]} LPIPS ({lp.get('num_starts', '?')} starts x "
                                   f"{lp.get('num_futures', '?')} futures, {'± s.e.' if 'lpips_sem' in lp else '± std'}"
                                   f"{'' if lp.get('comparable_with_paper', True) else ', random trunk'})")
                all_steps.update(lp["diffusion_steps"])
    if all_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_steps), [str(s) for s in sorted(all_steps)])
    ax.set_xlabel("inference steps (DDIM for diffusion, Euler for flow)")
    ax.set_ylabel("mean evaluation return (± s.e. over episodes)")
    ax.set_title("Evaluation return vs inference steps (Fig. 3 left)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("mean pairwise LPIPS (dotted)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # Below the axes, so that no entry hides a point, however many runs there are.
    ax.legend(handles, labels, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def cmd_plot(ns: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed

    run_dirs = [run_dir_of(p) for p in ns.runs]
    runs = {}
    for d in run_dirs:  # every input read before any output: one error line, nothing half-drawn
        if not d.is_dir():
            raise valdi.ValdiError(f"no run directory at {d}")
        runs[d] = (run_flags(d), read_progress(d))
    evals = {d: read_returns(d) for d in run_dirs if (d / "eval" / "returns.json").is_file()}
    out_dir = Path(ns.out_dir) if ns.out_dir else run_dirs[0] / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    labels = run_labels(run_dirs)
    written = [plot_training_returns(runs, labels, ns.window, out_dir / "figure4_training_returns.png"),
               plot_training_losses(runs, ns.window, out_dir / "training_losses.png")]
    if evals:
        written.append(plot_diffusion_steps(evals, labels, out_dir / "figure3_diffusion_steps.png"))
    else:
        print("no RUN_DIR/eval/returns.json in these runs: Figure 3 skipped (run `returns` first)", file=sys.stderr)

    summary = {labels[d]: {"dynamics": flags.get("dynamics"), "trajectories": len(log["return"]),
                        "final_moving_average": float(moving_average(log["return"], ns.window)[-1]),
                        "best_return": float(log["return"].max())}
               for d, (flags, log) in runs.items() if len(log["return"])}
    blocks = {labels[d]: block_means(log, ns.block) for d, (_, log) in runs.items()}
    over_seeds = {system: {"runs": [labels[d] for d, _, _ in seeds],
                           "blocks": seed_block_means([block_means(log, ns.block) for _, _, log in seeds])}
                  for system, seeds in by_system(runs).items()}
    decoder.write_json(out_dir / "plot.json", {"figures": written, "window": ns.window, "runs": summary,
                                              "blocks": blocks, "blocks_over_seeds": over_seeds})
    print(markdown_table(["run", "dynamics", "trajectories", f"last mean of {ns.window}", "best return"],
                         [[name, r["dynamics"], r["trajectories"], fmt(r["final_moving_average"], 1),
                           fmt(r["best_return"], 1)] for name, r in summary.items()]))
    columns = ["return", *(c for c, _ in TRAINING_CURVES)]
    for name, rows in blocks.items():
        print(f"\n{name}: means over blocks of {ns.block} trajectories")
        print(markdown_table(["trajectories", *columns],
                             [[r["trajectories"], *(fmt(r[c], 3 if c != "return" else 1) for c in columns)] for r in rows]))
    for system, group in over_seeds.items():
        print(f"\n{system}: mean return over blocks of {ns.block} trajectories, per seed and over seeds")
        print(markdown_table(["trajectories", *group["runs"], "mean ± s.e. over seeds"],
                             [[r["trajectories"], *(fmt(v, 1) for v in r["per_seed"]),
                               f"{fmt(r['mean'], 1)} ± {fmt(r['sem'], 1)}"] for r in group["blocks"]]))
    for path in written:
        print(f"wrote {path}")
    return 0


# =============================================================================================
# 7. video: imagination beside reality
# =============================================================================================
# One evaluation episode on fixed track K, driven exactly as `returns` drives it (same planner,
# same per-track generator, so it is the same episode). After it, every plan's action sequence is
# imagined again from the latent the plan started from, and decoded: at replan i the video shows
# the real frame, beside it what the previous plan imagined for this moment (its h = 1 latent;
# at i = 0 the decoded real latent), and below the H frames the current plan imagines ahead with
# their predicted rewards. Where the model's imagination drifts from reality, the two differ.
PANEL, STRIP, LABEL = 192, 96, 26  # pixels: the two large panels (2x the frame), the imagined strip, a label's band
GIF_SCALE = 0.75  # the GIF's size: its 20-pixel labels are 15 pixels tall, two GIFs side by side fit a README


def label_font(size: int):
    """A scalable font of `size` pixels for the labels of videos and the dream (Pillow's own, nothing to install)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow 10.1+
    except TypeError:
        return ImageFont.load_default()


def video_frame(real: np.ndarray, now: np.ndarray, ahead: np.ndarray, rewards: list[float], i: int):
    """One video frame (H x W x 3 uint8, both multiples of 16 for the MP4 encoder)."""
    from PIL import Image, ImageDraw
    H = len(ahead)
    width = max(2 * PANEL, H * STRIP)
    width += -width % 16
    height = LABEL + PANEL + LABEL + STRIP + LABEL
    height += -height % 16
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    big = lambda frame: Image.fromarray(frame).resize((PANEL, PANEL), Image.NEAREST)
    left, strip_left, below = (width - 2 * PANEL) // 2, (width - H * STRIP) // 2, LABEL + PANEL + LABEL
    canvas.paste(big(real), (left, LABEL))
    canvas.paste(big(now), (left + PANEL, LABEL))
    for h, frame in enumerate(ahead):
        canvas.paste(Image.fromarray(frame), (strip_left + h * STRIP, below))
    draw, font = ImageDraw.Draw(canvas), label_font(20)
    draw.text((left + 4, 2), f"real, plan {i}", fill=(0, 0, 0), font=font)
    draw.text((left + PANEL + 4, 2), "imagined for now" if i else "decoded real latent", fill=(0, 0, 0), font=font)
    draw.text((strip_left + 4, LABEL + PANEL + 2), f"imagined ahead, h = 1..{H}", fill=(0, 0, 0), font=font)
    for h, r in enumerate(rewards):
        draw.text((strip_left + h * STRIP + 4, below + STRIP + 2), f"r {r:+.2f}", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def writable(out: Path, flag: str) -> None:
    """Refuse an output place that cannot be written, in one line, before any work."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(out.name + ".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise valdi.ValdiError(f"cannot write {out}.mp4 and .gif: {exc.strerror or exc} "
                               f"(give {flag} elsewhere)") from None


def save_movie(out: Path, frames: list[np.ndarray], fps: int, gif_every: int = 1, gif_scale: float = 1.0):
    """OUT.mp4 of every frame and OUT.gif of every gif_every-th (scaled), each written whole or not at all."""
    import imageio.v2 as imageio
    from PIL import Image
    mp4, gif, tmp = (out.with_name(out.name + suffix) for suffix in (".mp4", ".gif", ".tmp.mp4"))
    with imageio.get_writer(tmp, fps=fps, macro_block_size=16, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    tmp.replace(mp4)
    size = lambda f: (round(f.shape[1] * gif_scale), round(f.shape[0] * gif_scale))
    small = [Image.fromarray(f).resize(size(f)) for f in frames[::gif_every]]
    valdi.atomic_write(gif, lambda f: small[0].save(f, format="GIF", save_all=True, append_images=small[1:],
                                                   duration=int(1000 * gif_every / fps), loop=0))
    return mp4, gif


def cmd_video(ns: argparse.Namespace) -> int:
    seeds = fixed_track_seeds(100)
    if not 0 <= ns.track < len(seeds):
        raise valdi.ValdiError(f"--track must be between 0 and {len(seeds) - 1} (the fixed tracks of Sec. 4), "
                               f"got {ns.track}")
    device = valdi.pick_device(ns.cuda)
    (run,) = load_runs([ns.run], device, planner_overrides(ns))
    net, _ = decoder.load_decoder(run.run_dir, device, run.args.latent_dim)
    out = Path(ns.out) if ns.out else run.eval_dir / f"video_track{ns.track}"
    writable(out, "--out")  # before the episode, not after it: an unwritable place costs nothing
    run.args = dataclasses.replace(run.args, max_episode_steps=ns.frames)
    steps = run_steps(run, ns.diffusion_steps)
    env = valdi.make_env(run.args)
    plans = []
    try:
        traj, stats = valdi.collect_trajectory(env, run.agent, 0.0, seeds[ns.track], steps,
                                               new_generator(device, seeds[ns.track]),
                                               on_plan=lambda z, a: plans.append((z, a)))
    finally:
        env.close()
    H, chunk = run.args.horizon, run.args.action_chunk
    with torch.inference_mode():
        z = torch.cat([p[0] for p in plans])
        actions = torch.cat([p[1] for p in plans])
        imagined = run.model.imagine(z, actions, steps or 1, new_generator(device, ns.seed))  # (n, H+1, D)
        rewards = run.model.reward(imagined[:, :H], actions).float().cpu().numpy()
        pictures = decoder.to_hwc(decoder.decode(net, imagined.reshape(-1, imagined.shape[-1])))
    pictures = (pictures.reshape(len(plans), H + 1, *pictures.shape[1:]) * 255).round().astype(np.uint8)
    frames = [video_frame(traj["rgb"][chunk * i], pictures[i - 1, 1] if i else pictures[0, 0], pictures[i, 1:],
                          rewards[i].tolist(), i) for i in range(len(plans))]
    mp4, gif = save_movie(out, frames, ns.fps, ns.gif_every, gif_scale=GIF_SCALE)
    print(f"track {ns.track}: return {stats['return']:.1f} over {stats['length']} frames, {len(frames)} plans "
          f"({run.args.dynamics}, {decoder.count(steps, 'step') if steps else 'no sampler steps'}); wrote {mp4} and {gif}")
    return 0


# =============================================================================================
# 8. dream: drive inside the model's imagination, beside reality
# =============================================================================================
# Each tick one action drives two cars for one action chunk (3 env frames): the real one in CarRacing, and the
# imagined one, whose latent the run's own dynamics advances. Valdi and flow imagine the H-chunk future with that
# action in every chunk and keep its first step; the MLP's first step is one step of its dynamics. The dream saw a
# real frame only at the start or when last re-grounded; the counter says how many ticks it has run on its own.
DREAM_PANE = 384  # pixels: each pane shows the 96 x 96 frame 4x, large enough to drive by
DREAM_KEYS = "arrows: steer, gas, brake | G: re-ground the dream on reality | R: restart the track | Esc: quit"


class Dream:
    """The two cars, their latest rewards and the ticks since the dream was grounded."""

    def __init__(self, run: Run, net: decoder.ViTDecoder, track_seed: int, steps: int | None,
                 generator: torch.Generator):
        self.run, self.net, self.track_seed, self.steps, self.generator = run, net, track_seed, steps, generator
        self.env = valdi.make_env(dataclasses.replace(run.args, max_episode_steps=100_000))  # until the user stops
        self.reset()

    def reset(self) -> None:
        """Back to the start of the track; the dream starts from its first frame, encoded."""
        self.obs, _ = self.env.reset(seed=self.track_seed)
        self.real_reward = self.dream_reward = 0.0
        self.last_actions = self.held(np.zeros(valdi.ENV_ACTION_DIM, np.float32))
        self.ground()

    @torch.inference_mode()
    def ground(self) -> None:
        """The dream's latent becomes the encoded real frame of now."""
        self.z_real = self.z_dream = valdi.encode_observation(self.run.model, self.obs, self.run.agent.device)
        self.ticks = 0

    @torch.inference_mode()
    def planned(self) -> torch.Tensor:
        """The run's planner on the real latent: (1, H, chunk * 3)."""
        return valdi.plan(self.run.agent, self.z_real, 0.0, self.steps, self.generator)

    @torch.inference_mode()
    def tick(self, actions: torch.Tensor) -> None:
        """actions (1, H, chunk * 3): the first chunk drives the real car; all H condition the dream's step."""
        args, model = self.run.args, self.run.model
        self.last_actions, rewards = actions, []
        for action in actions[0, 0].view(-1, valdi.ENV_ACTION_DIM).cpu().numpy():
            self.obs, reward, terminated, truncated, _ = self.env.step(action)
            rewards.append(reward)
            if terminated or truncated:  # off the playfield, or the lap done: the track starts again
                return self.reset()
        self.real_reward = float(valdi.chunk_returns(torch.tensor(rewards).view(1, -1), args.gamma))
        imagined = model.imagine(self.z_dream, actions, self.steps or 1, self.generator)  # (1, H + 1, D)
        self.dream_reward = float(model.reward(imagined[:, 0], actions[:, 0]))
        self.z_dream = imagined[:, 1]
        self.z_real = valdi.encode_observation(model, self.obs, self.run.agent.device)
        self.ticks += 1

    def picture(self) -> np.ndarray:
        """Reality and the decoded dream side by side, with their rewards and the counter (H x W x 3 uint8)."""
        from PIL import Image, ImageDraw
        dream = decoder.to_hwc(decoder.decode(self.net, self.z_dream))[0]
        panes = [self.obs["rgb"], (dream * 255).round().astype(np.uint8)]
        canvas = Image.new("RGB", (2 * DREAM_PANE + 32, DREAM_PANE + 128), (255, 255, 255))  # multiples of 16
        for k, frame in enumerate(panes):
            canvas.paste(Image.fromarray(frame).resize((DREAM_PANE, DREAM_PANE), Image.NEAREST),
                         (8 + k * (DREAM_PANE + 16), 40))
        draw, font = ImageDraw.Draw(canvas), label_font(22)
        draw.text((12, 8), f"reality: reward {self.real_reward:+.2f}", fill=(0, 0, 0), font=font)
        draw.text((DREAM_PANE + 28, 8), f"dream: predicted {self.dream_reward:+.2f}", fill=(0, 0, 0), font=font)
        steer, gas, brake = self.last_actions[0, 0, :valdi.ENV_ACTION_DIM].tolist()
        draw.text((12, DREAM_PANE + 48), f"{self.run.args.dynamics}: {decoder.count(self.ticks, 'tick')} since the "
                  "dream last saw a real frame", fill=(0, 0, 0), font=font)
        draw.text((12, DREAM_PANE + 76), f"both cars: steer {steer:+.1f}, gas {gas:.1f}, brake {brake:.1f}",
                  fill=(0, 0, 0), font=font)
        draw.text((12, DREAM_PANE + 104), DREAM_KEYS, fill=(90, 90, 90), font=label_font(15))
        return np.asarray(canvas)

    def held(self, action: np.ndarray) -> torch.Tensor:
        """One env action held for a whole chunk, in every one of the H chunks: (1, H, chunk * 3)."""
        args = self.run.args
        return torch.as_tensor(np.tile(action, args.horizon * args.action_chunk), dtype=torch.float32,
                               device=self.run.agent.device).view(1, args.horizon, -1)


def keys_action(pressed: set) -> np.ndarray:
    """CarRacing's own human play: left/right steer -1/+1, up is full gas, down brakes 0.8."""
    import pygame
    steer = float(pygame.K_RIGHT in pressed) - float(pygame.K_LEFT in pressed)
    return np.array([steer, float(pygame.K_UP in pressed), 0.8 * (pygame.K_DOWN in pressed)], np.float32)


def play(dream: Dream, screen, policy: str, max_ticks: int | None = None) -> int:
    """The window's loop at the env's pace (50 frames/s, so 50 / chunk ticks/s): read the keys, tick, draw."""
    import pygame
    clock, pressed, ticks = pygame.time.Clock(), set(), 0
    arrows = (pygame.K_LEFT, pygame.K_RIGHT, pygame.K_UP, pygame.K_DOWN)  # other keys are ignored
    fps = dream.env.metadata.get("render_fps", 50) / dream.run.args.action_chunk
    while max_ticks is None or ticks < max_ticks:
        for event in pygame.event.get():
            if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
                return ticks
            if event.type == pygame.KEYDOWN and event.key in arrows:
                pressed.add(event.key)
            elif event.type == pygame.KEYUP:
                pressed.discard(event.key)
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_g:
                dream.ground()
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                dream.reset()
        dream.tick(dream.planned() if policy == "planner" else dream.held(keys_action(pressed)))
        ticks += 1
        frame = dream.picture()
        screen.blit(pygame.surfarray.make_surface(frame.swapaxes(0, 1)), (0, 0))
        pygame.display.flip()
        clock.tick(fps)
    return ticks


def open_window(size: tuple[int, int]):
    import pygame
    try:
        pygame.display.init()
        screen = pygame.display.set_mode(size)
    except pygame.error as exc:
        raise valdi.ValdiError(f"cannot open a window ({exc}); without a display, record instead: "
                               f"--record PATH.gif --ticks N") from None
    pygame.display.set_caption("Valdi: reality (left) and the dream (right)")
    return screen


def read_actions(path: Path) -> np.ndarray:
    """A file of env actions, one row (steer, gas, brake) per tick: .npy, or text (spaces or commas)."""
    try:
        actions = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter="," if path.suffix == ".csv"
                                                                          else None)
    except (OSError, ValueError) as exc:
        raise valdi.ValdiError(f"cannot read actions from {path}: {exc}") from None
    actions = np.asarray(actions, np.float32).reshape(-1, valdi.ENV_ACTION_DIM) if np.size(actions) % 3 == 0 else None
    if actions is None or not len(actions) or not np.isfinite(actions).all():
        raise valdi.ValdiError(f"{path} holds no actions of 3 finite numbers (steer, gas, brake) per row")
    return np.clip(actions, -1, 1)


def dream_drift(ns: argparse.Namespace, run: Run, net: decoder.ViTDecoder, actions: np.ndarray | None) -> dict:
    """How long the dream stays near reality: on each of the first K fixed tracks, from a grounded start and driven
    by the planner (or the actions), the ticks until LPIPS(decoded dream, real frame) first passes the decoder's own
    reconstruction LPIPS (train.json, same trunk): beyond that the difference is more than the decoder's blur.
    With --curve, every track is driven its full --ticks and the LPIPS of every tick is kept: how far it drifts.
    The dream starts after --skip-frames: CarRacing zooms in from far above during its first 50 frames, which the
    decoder does not draw, so until then the dream is kept on reality (grounded every tick) and nothing is counted."""
    device, seeds = run.agent.device, fixed_track_seeds(100)
    yardstick = read_json(decoder.decoder_dir(run.run_dir) / "train.json")
    lp = decoder.make_lpips(yardstick["lpips_backbone"] == "random", device)
    drive = lambda dream, t: dream.tick(dream.held(actions[t % len(actions)]) if actions is not None
                                        else dream.planned())
    warmup = -(-ns.skip_frames // run.args.action_chunk)  # ticks until frame --skip-frames
    ticks, drifted, curves = [], [], []
    for k in progress(iterable=range(ns.drift_tracks), desc="tracks", unit="track"):
        dream = Dream(run, net, seeds[k], run_steps(run, ns.diffusion_steps), new_generator(device, seeds[k]))
        curve, passed = [], None  # passed: the first tick beyond the yardstick
        try:
            for t in range(warmup):
                drive(dream, t)
                dream.ground()
            for t in range(1, ns.ticks + 1):
                drive(dream, warmup + t - 1)
                if dream.ticks == 0:  # the episode ended (the car left the playfield): the dream has nothing to match
                    break
                with torch.inference_mode():
                    real = decoder.frames_to_float(torch.from_numpy(dream.obs["rgb"]).unsqueeze(0).to(device))
                    curve.append(float(lp(real, decoder.decode(net, dream.z_dream), normalize=True)))
                if passed is None and curve[-1] > yardstick["lpips_recon_mean"]:
                    passed = t
                    if not ns.curve:
                        break
        finally:
            dream.env.close()
        ticks.append(passed or t)
        drifted.append(passed is not None)
        curves.append(curve)
    return {"tracks": ns.drift_tracks, "max_ticks": ns.ticks, "driven_by": "planner" if actions is None else ns.actions,
            "dynamics": run.args.dynamics, "diffusion_steps": run_steps(run, ns.diffusion_steps),
            "skip_frames": ns.skip_frames, "grounded_ticks": warmup,
            "yardstick_lpips_recon_mean": yardstick["lpips_recon_mean"], "ticks_to_drift": ticks, "drifted": drifted,
            **summarize(ticks), "lpips_per_tick": curves,
            **{k: v for k, v in yardstick.items() if k.startswith("lpips_") and "recon" not in k},
            **decoder.device_record(device)}


def cmd_dream(ns: argparse.Namespace) -> int:
    seeds = fixed_track_seeds(100)
    if not 0 <= ns.track < len(seeds):
        raise valdi.ValdiError(f"--track must be between 0 and {len(seeds) - 1} (the fixed tracks of Sec. 4), "
                               f"got {ns.track}")
    ns.ticks = ns.ticks or (200 if ns.record or ns.drift_tracks else None)
    if (ns.record or ns.drift_tracks) and ns.policy == "keys" and ns.actions is None:
        raise valdi.ValdiError(f"{'--record' if ns.record else '--drift-tracks'} drives without a window: "
                               "give --policy planner or --actions FILE")
    actions = read_actions(Path(ns.actions)) if ns.actions else None
    out = Path(ns.record) if ns.record else None
    out = out.with_name(out.stem) if out is not None and out.suffix.lower() in (".gif", ".mp4") else out
    if out is not None:
        writable(out, "--record")
    device = valdi.pick_device(ns.cuda)
    (run,) = load_runs([ns.run], device, planner_overrides(ns))
    net, _ = decoder.load_decoder(run.run_dir, device, run.args.latent_dim)
    if ns.drift_tracks:
        result = dream_drift(ns, run, net, actions)
        path = decoder.write_json(run.eval_dir / "dream_drift.json", result)
        held = sum(not d for d in result["drifted"])
        print(f"{run.args.dynamics}: ticks until the dream's LPIPS to reality passes the decoder's own "
              f"({result['yardstick_lpips_recon_mean']:.4f}): {fmt(result['mean'], 1)} ± {fmt(result['sem'], 1)} "
              f"(mean ± s.e. over {decoder.count(result['tracks'], 'track')}; {held} never passed it within "
              f"{result['max_ticks']} ticks or before the episode ended, counted at their last tick); wrote {path}")
        if ns.curve and (n := min(map(len, result["lpips_per_tick"]))):  # the mean over tracks, at the ticks all reached
            mean = np.mean([c[:n] for c in result["lpips_per_tick"]], axis=0)
            print("mean LPIPS(dream, reality) at tick " + ", ".join(f"{t}: {mean[t - 1]:.4f}" for t in
                                                                    sorted({1, 10, 25, 50, 100, 200, n}) if t <= n))
        return 0
    dream = Dream(run, net, seeds[ns.track], run_steps(run, ns.diffusion_steps), new_generator(device, ns.seed))
    try:
        if out is None:
            import pygame
            screen = open_window(dream.picture().shape[1::-1])
            try:
                ticks = play(dream, screen, ns.policy, ns.ticks)
            finally:
                pygame.quit()
            print(f"drove {decoder.count(ticks, 'tick')} on track {ns.track}")
            return 0
        frames, seconds = [], []  # each tick's time: acting, the dream's step and drawing both panes
        for k in range(ns.ticks):
            start = time.perf_counter()
            action = dream.held(actions[k % len(actions)]) if actions is not None else dream.planned()
            dream.tick(action)
            frames.append(dream.picture())
            seconds.append(time.perf_counter() - start)
    finally:
        dream.env.close()
    ticks_per_s = dream.env.metadata.get("render_fps", 50) / run.args.action_chunk  # the env's pace
    mp4, gif = save_movie(out, frames, fps=round(ticks_per_s))  # one movie frame per tick
    print(f"track {ns.track}: {decoder.count(ns.ticks, 'tick')} of {run.args.dynamics}'s dream beside reality, driven "
          f"by {'the planner' if actions is None else ns.actions}, {1000 * np.median(seconds):.0f} ms a tick (median; "
          f"the env's pace: {1000 / ticks_per_s:.0f} ms); wrote {gif} and {mp4}")
    return 0


# =============================================================================================
# 9. Command line
# =============================================================================================
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def diffusion_steps_type(text: str) -> int:
    """DDIM steps must be in 1..T (valdi.DIFFUSION_T = 1000): 0 steps would imagine nothing."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= valdi.DIFFUSION_T:
        raise argparse.ArgumentTypeError(valdi.diffusion_steps_error(text))
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags say in their help what the default is."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parent_parsers() -> tuple[argparse.ArgumentParser, ...]:
    """The flag groups several subcommands share: the device, the runs, and planner overrides."""
    device = valdi.OneLineParser(add_help=False)
    device.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True,
                        help="use CUDA when it is available (--no-cuda forces the CPU)")
    device.add_argument("--threads", type=non_negative_int, default=0,
                        help="torch CPU threads (0: torch's default, one per core)")
    runs = valdi.OneLineParser(add_help=False)
    runs.add_argument("runs", nargs="+", metavar="RUN", help="run directories of valdi.py (or their checkpoint.pt)")
    planner = valdi.OneLineParser(add_help=False)
    for name, what in (("pop-size", "CEM population"), ("num-elites", "CEM elites"), ("cem-iters", "CEM iterations")):
        planner.add_argument(f"--{name}", type=positive_int, default=None,
                             help=f"{what} for this evaluation (default: the run's own)")
    planner.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                         help="planner precision for this evaluation (default: the run's own)")
    planner.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the planner for this evaluation (default: the run's own)")
    return device, runs, planner


def build_parser() -> argparse.ArgumentParser:
    # valdi's one-line parser: a bad flag prints one line, not the whole usage block. Subparsers
    # inherit the class, so subcommand errors are one line too.
    parser = valdi.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                  formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    device, runs, planner = parent_parsers()

    def command(name, help, parents):
        return sub.add_parser(name, help=help, description=help, parents=parents,
                              formatter_class=_HelpFormatter)

    p = command("returns", "evaluation returns on the fixed tracks, per diffusion step count (Fig. 3 left)",
                [runs, planner, device])
    p.add_argument("--episodes", type=positive_int, default=100, help="evaluate on the first K fixed tracks")
    p.add_argument("--frames", type=positive_int, default=600, help="env frames per episode (Supp. E)")
    p.add_argument("--diffusion-steps", type=diffusion_steps_type, nargs="+", default=None,
                   help="DDIM step counts to evaluate, e.g. 1 2 4 8 (default: the run's own; ignored for mlp)")
    p.set_defaults(func=cmd_returns)

    p = command("consistency", "value self-consistency delta_TD along imagined rollouts (Eq. 2, Table 1 top)",
                [runs, planner, device])
    p.add_argument("--num-states", type=positive_int, default=10_000, help="real start states")
    p.add_argument("--dataset", type=Path, default=None,
                   help="on-policy dataset written by `decoder.py collect` (default: RUN_DIR/decoder/dataset.npz)")
    p.add_argument("--diffusion-steps", type=diffusion_steps_type, default=None,
                   help="DDIM steps for planning and imagination (default: the run's own)")
    p.add_argument("--plan-batch", type=positive_int, default=64, help="start states planned at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the state sample, the planner and the sampler")
    p.set_defaults(func=cmd_consistency)

    p = command("grounding", "imagined vs real value delta_drift in closed loop (Eq. 3, Table 1 bottom)",
                [runs, planner, device])
    p.add_argument("--episodes", type=positive_int, default=100, help="closed-loop episodes on the fixed tracks")
    p.add_argument("--wm-steps", type=positive_int, default=200, help="world-model steps per episode (3 frames each)")
    p.add_argument("--diffusion-steps", type=diffusion_steps_type, default=None,
                   help="DDIM steps for planning and imagination (default: the run's own)")
    p.set_defaults(func=cmd_grounding)

    add_speed_and_plot(command, [device], [runs])

    p = command("video", "one evaluation episode: the real frame beside the decoded imagination, MP4 and GIF",
                [planner, device])
    p.add_argument("run", metavar="RUN", help="a run directory with a trained decoder (decoder.py train)")
    p.add_argument("--track", type=int, default=0, help="which of the 100 fixed tracks (0..99)")
    p.add_argument("--frames", type=positive_int, default=600, help="env frames of the episode")
    p.add_argument("--diffusion-steps", type=diffusion_steps_type, default=None,
                   help="DDIM steps for planning and imagination (default: the run's own)")
    p.add_argument("--fps", type=positive_int, default=10, help="video frames (plans) per second")
    p.add_argument("--gif-every", type=positive_int, default=2, help="every Nth plan goes into the GIF (at 3/4 size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the imagination's noise")
    p.add_argument("--out", default=None, metavar="PATH", help="PATH.mp4 and PATH.gif (default: RUN/eval/video_trackK)")
    p.set_defaults(func=cmd_video)

    p = command("dream", "drive inside the model's imagination beside reality: keys in a window, or --record a GIF",
                [planner, device])
    p.add_argument("run", metavar="RUN", help="a run directory with a trained decoder (decoder.py train)")
    p.add_argument("--track", type=int, default=0, help="which of the 100 fixed tracks (0..99)")
    p.add_argument("--diffusion-steps", type=diffusion_steps_type, default=None,
                   help="DDIM (flow: Euler) steps of each dream step (default: the run's own)")
    p.add_argument("--policy", choices=["keys", "planner"], default="keys",
                   help="who drives: the arrow keys, or the run's planner (on the real car's latent)")
    p.add_argument("--actions", default=None, metavar="FILE",
                   help="drive by a file of actions instead, one row (steer, gas, brake) per tick (.npy or text)")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="no window: write PATH.gif and PATH.mp4 of --ticks ticks")
    p.add_argument("--ticks", type=positive_int, default=None,
                   help="ticks to drive (default: until Esc; with --record: 200, one 600-frame episode)")
    p.add_argument("--drift-tracks", type=non_negative_int, default=0, metavar="K",
                   help="no window: on each of the first K tracks, the ticks until the decoded dream's LPIPS to the "
                        "real frame passes the decoder's own reconstruction LPIPS (RUN/eval/dream_drift.json)")
    p.add_argument("--curve", action="store_true",
                   help="with --drift-tracks: drive every track its full --ticks and keep the LPIPS of every tick")
    p.add_argument("--skip-frames", type=non_negative_int, default=50,
                   help="with --drift-tracks: the dream starts at this frame, grounded until then (CarRacing zooms "
                        "in first)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dream's noise and the planner")
    p.set_defaults(func=cmd_dream)
    return parser


def add_speed_and_plot(command, device: list, runs: list) -> None:
    defaults = valdi.Args()
    p = command("speed", "planner, acting and update rates, eager or compiled, fp32 or bf16 (Supp. D)", device)
    p.add_argument("--pop-size", type=positive_int, default=defaults.pop_size, help="CEM population")
    p.add_argument("--num-elites", type=positive_int, default=defaults.num_elites, help="CEM elites")
    p.add_argument("--cem-iters", type=positive_int, default=defaults.cem_iters, help="CEM iterations")
    p.add_argument("--horizon", type=positive_int, default=defaults.horizon, help="planning horizon H")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="segments per update")
    p.add_argument("--dynamics", nargs="+", choices=list(valdi.DYNAMICS), default=["diffusion", "mlp"],
                   help="dynamics whose update is timed (Valdi's is always among them)")
    p.add_argument("--planner-dynamics", choices=list(valdi.DYNAMICS), default="diffusion",
                   help="dynamics whose planner and acting rate are timed")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="which execution modes to measure")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="which precisions to measure")
    p.add_argument("--act-frames", type=positive_int, default=30, help="env frames of the acting measurement")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls; the median is reported")
    p.add_argument("--replay-trajectories", type=non_negative_int, default=50,
                   help="600-frame trajectories in the buffer of the batch-preparation measurement (0: skip it)")
    p.add_argument("--prep-updates", type=positive_int, default=5,
                   help="updates timed per way of preparing batches")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON to PATH")
    p.set_defaults(func=cmd_speed)

    p = command("plot", "Figure 4 (training returns) and Figure 3 left (return and LPIPS vs diffusion steps)",
                runs)
    p.add_argument("--out-dir", default=None, help="where the PNGs go (default: FIRST_RUN/eval)")
    p.add_argument("--window", type=positive_int, default=50, help="moving-average window in trajectories")
    p.add_argument("--block", type=positive_int, default=25, help="trajectories per block of the printed means")
    p.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if getattr(ns, "threads", 0):
        torch.set_num_threads(ns.threads)
    try:
        return ns.func(ns)
    except valdi.ValdiError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
