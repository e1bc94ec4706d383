"""An RL rollout loop on rollout: a linear CartPole policy improved by an evolution
strategy, its episodes run as tasks on the cluster's workers (examples/rl/cartpole_plugin.py).

Each iteration: draw POPULATION perturbations of the weights, submit one task per
perturbation (and its mirror: antithetic sampling), stream the returns back as the
tasks finish (job.results()), and step the weights along the return-weighted noise.
At the end it writes a learning curve (PNG) and prints the time per iteration and how
many bytes of weights each worker was sent.

The weights travel inline in each task's payload (five floats here); blobs by reference,
sent once per worker, are issue 17's next step.

Usage: python examples/rl/train.py --addr HOST:PORT --tls-dir DIR [--iterations 20] [--out curve.png]
"""

import argparse
import json
import sys
import time

import numpy as np

from rollout_client import Client, Task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--tls-dir", required=True)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--population", type=int, default=16, help="perturbations per iteration (each run twice, mirrored)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per task")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="learning_curve.png")
    p.add_argument("--worker-metrics", default="", help="NAME=HOST:PORT,... of the workers' /metrics, to count what each ran")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    weights = np.zeros(5)
    client = Client(args.addr, tls_dir=args.tls_dir)
    curve, times = [], []
    metrics = dict(kv.split("=", 1) for kv in args.worker_metrics.split(",") if kv)
    calls_before = {w: plugin_calls(a) for w, a in metrics.items()}
    payload_bytes = 0
    for it in range(args.iterations):
        started = time.monotonic()
        noise = rng.standard_normal((args.population, 5))
        candidates = np.concatenate([weights + args.sigma * noise, weights - args.sigma * noise])
        payloads = [
            json.dumps({"weights": c.tolist(), "seed": int(rng.integers(1 << 31)), "episodes": args.episodes})
            for c in candidates
        ]
        job = client.submit((Task("cartpole", p, method="episodes") for p in payloads), name=f"es-{it}")
        returns = np.zeros(len(candidates))
        for r in job.results():
            if r.state != "committed":
                raise SystemExit(f"task {r.index} {r.state}: {r.errors}")
            returns[r.index] = json.loads(r.result)["return"]
        payload_bytes += sum(len(p) for p in payloads)
        ranks = (returns - returns.mean()) / (returns.std() + 1e-8)
        grad = (ranks[: args.population] - ranks[args.population :]) @ noise / (2 * args.population)
        weights = weights + args.lr * grad
        elapsed = time.monotonic() - started
        evaluation = float(returns.mean())
        curve.append(evaluation)
        times.append(elapsed)
        print(f"iteration {it + 1:2d}: mean return {evaluation:6.1f} (best {returns.max():5.0f}) in {elapsed:.2f} s", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean episode return (max 500)")
    ax.set_title(f"CartPole, evolution strategy on rollout ({2 * args.population} tasks per iteration)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"learning curve: {args.out}")
    print(f"return: first iteration {curve[0]:.1f}, last {curve[-1]:.1f}, best {max(curve):.1f}")
    print(f"time per iteration: median {sorted(times)[len(times) // 2]:.2f} s ({2 * args.population} tasks)")
    calls = {w: plugin_calls(a) - calls_before[w] for w, a in metrics.items()}
    total = sum(calls.values()) or 1
    per_task = payload_bytes / (args.iterations * 2 * args.population)
    print("tasks and weights (inline in payloads, about %.0f bytes a task) per worker: " % per_task
          + ", ".join(f"{w} {n} tasks, {n * per_task / 1024:.1f} KiB" for w, n in sorted(calls.items()))
          + f" ({total} tasks in all)")
    return 0 if curve[-1] > curve[0] else 1


def plugin_calls(metrics_addr: str) -> int:
    """The cartpole calls a worker has run, from its /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    return int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                   if l.startswith('rollout_worker_plugin_calls_total{plugin="cartpole"')))


if __name__ == "__main__":
    sys.exit(main())
