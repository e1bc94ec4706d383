"""An RL rollout loop on rollout: a linear CartPole policy improved by an evolution
strategy, its episodes run as tasks on the cluster's workers (examples/rl/cartpole_plugin.py).

Each iteration: upload the current weights once as a blob, draw POPULATION
perturbations (by seed), submit one task per perturbation and its mirror (antithetic
sampling), each naming the weights blob as its input (every worker fetches it once,
however many of the tasks it runs), stream the returns back as the tasks finish
(job.results()), and step the weights along the return-weighted noise. At the end it
writes a learning curve (PNG) and prints the time per iteration and how many bytes of
weights each worker fetched.

Usage: python examples/rl/train.py --addr HOST:PORT --tls-dir DIR [--iterations 20] [--out curve.png]
"""

import argparse
import io
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
    before = {w: worker_counts(a) for w, a in metrics.items()}
    weights_bytes = 0
    for it in range(args.iterations):
        started = time.monotonic()
        buf = io.BytesIO()
        np.save(buf, weights)
        blob = client.put_blob(buf.getvalue())
        noise_seeds = [int(s) for s in rng.integers(1 << 31, size=args.population)]
        noise = np.stack([np.random.default_rng(s).standard_normal(5) for s in noise_seeds])
        payloads = [
            json.dumps({"noise_seed": s, "sign": sign, "sigma": args.sigma, "seed": int(rng.integers(1 << 31)),
                        "episodes": args.episodes})
            for sign in (1, -1) for s in noise_seeds
        ]
        job = client.submit((Task("cartpole", p, method="episodes", inputs=(blob,)) for p in payloads), name=f"es-{it}")
        returns = np.zeros(len(payloads))
        for r in job.results():
            if r.state != "committed":
                raise SystemExit(f"task {r.index} {r.state}: {r.errors}")
            returns[r.index] = json.loads(r.result)["return"]
        weights_bytes = len(buf.getvalue())
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
    after = {w: worker_counts(a) for w, a in metrics.items()}
    print(f"weights: one {weights_bytes}-byte blob per iteration; per worker: "
          + ", ".join(f"{w} ran {after[w][0] - before[w][0]} tasks and fetched {after[w][1] - before[w][1]} bytes of weights"
                      f" ({(after[w][1] - before[w][1]) / weights_bytes:.0f} blobs)" for w in sorted(metrics)))
    return 0 if curve[-1] > curve[0] else 1


def worker_counts(metrics_addr: str) -> tuple:
    """(cartpole calls run, blob bytes fetched) of a worker, from its /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    value = lambda prefix: int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(prefix)))
    return value('rollout_worker_plugin_calls_total{plugin="cartpole"'), value("rollout_worker_blob_fetch_bytes_total")


if __name__ == "__main__":
    sys.exit(main())
