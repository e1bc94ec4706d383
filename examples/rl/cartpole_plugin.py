"""The rollout side of examples/rl: a sidecar plugin that runs CartPole episodes with a
linear policy, in plain numpy (no gym, nothing downloaded).

Method ``episodes``: the task's one input is the current weights (a .npy blob the
trainer uploaded once per iteration, fetched once per worker); the payload is JSON
{"noise_seed": int, "sign": 1 or -1, "sigma": float, "seed": int, "episodes": int}:
the policy evaluated is weights + sign * sigma * noise, the noise drawn from
noise_seed (the trainer draws the same). The policy pushes right when
w[:4] . state + w[4] > 0. Returns JSON {"return": mean undiscounted return over the
episodes (at most 500 each)}.
"""

import json
import math

import numpy as np

from rollout_plugin import serve

GRAVITY, MASS_CART, MASS_POLE, HALF_LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
THETA_LIMIT, X_LIMIT, MAX_STEPS = 12 * 2 * math.pi / 360, 2.4, 500


def episode(w: np.ndarray, rng: np.random.Generator) -> float:
    x, x_dot, theta, theta_dot = rng.uniform(-0.05, 0.05, size=4)
    total_mass, pole_mass_length = MASS_CART + MASS_POLE, MASS_POLE * HALF_LENGTH
    for step in range(MAX_STEPS):
        force = FORCE if w[0] * x + w[1] * x_dot + w[2] * theta + w[3] * theta_dot + w[4] > 0 else -FORCE
        cos, sin = math.cos(theta), math.sin(theta)
        temp = (force + pole_mass_length * theta_dot**2 * sin) / total_mass
        theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / total_mass))
        x_acc = temp - pole_mass_length * theta_acc * cos / total_mass
        x, x_dot = x + TAU * x_dot, x_dot + TAU * x_acc
        theta, theta_dot = theta + TAU * theta_dot, theta_dot + TAU * theta_acc
        if abs(x) > X_LIMIT or abs(theta) > THETA_LIMIT:
            return float(step + 1)
    return float(MAX_STEPS)


def perturbation(noise_seed: int) -> np.ndarray:
    return np.random.default_rng(noise_seed).standard_normal(5)


def handle(method: str, payload: bytes, inputs: list) -> bytes:
    if method != "episodes":
        raise ValueError(f"unknown method {method!r} (this plugin has: episodes)")
    if len(inputs) != 1:
        raise ValueError(f"expected one input (the weights blob), got {len(inputs)}")
    args = json.loads(payload)
    base = np.load(inputs[0])
    if base.shape != (5,):
        raise ValueError(f"weights: expected 5 numbers, got shape {base.shape}")
    w = base + float(args["sign"]) * float(args["sigma"]) * perturbation(int(args["noise_seed"]))
    rng = np.random.default_rng(int(args["seed"]))
    returns = [episode(w, rng) for _ in range(int(args.get("episodes", 1)))]
    return json.dumps({"return": float(np.mean(returns))}).encode()


if __name__ == "__main__":
    serve(handle, name="cartpole", methods=["episodes"])
