"""Seed a small, realistic sweep through the real client and ingest path.

Six runs of a learning-rate × batch-size sweep, each with loss, accuracy and
learning-rate curves over 500 steps, so a newcomer sees data at once. Seeds
only once per store: if the demo experiment exists, it is left alone.
"""

from __future__ import annotations

import math
import random

import trackhouse.client as th

EXPERIMENT = "demo-sweep"
STEPS = 500


def _curves(rng: random.Random, lr: float, batch: int, step: int) -> dict[str, float]:
    speed = lr * 400 / math.sqrt(batch / 32)
    loss = 2.3 * math.exp(-speed * step / STEPS) + 0.08 + rng.gauss(0, 0.02)
    acc = min(0.995, 1 - loss / 2.5 + rng.gauss(0, 0.005))
    warm = min(1.0, step / 50)
    decay = 0.5 * (1 + math.cos(math.pi * step / STEPS))
    return {"train/loss": loss, "train/accuracy": acc, "lr": lr * warm * decay}


def seed(address: str) -> list[str]:
    """Log the demo sweep into the server at `address`; return the run ids (empty if seeded before)."""
    client = th.connect(address)
    try:
        try:
            client.create_experiment(EXPERIMENT)
        except th.AlreadyExists:
            return []
        run_ids = []
        rng = random.Random(7)
        for i, (lr, batch) in enumerate((lr, b) for lr in (0.001, 0.003, 0.01) for b in (32, 128)):
            run = client.start_run(
                experiment=EXPERIMENT, name=f"lr={lr} bs={batch}",
                params={"lr": lr, "batch_size": batch, "optimizer": "adam" if i % 3 else "sgd"},
                tags={"team": "demo", "model": "resnet18"},
            )
            for step in range(STEPS):
                run.log_metrics(_curves(rng, lr, batch, step), step=step)
            run.finish("FINISHED" if i != 4 else "FAILED", timeout=30)
            run_ids.append(run.run_id)
        return run_ids
    finally:
        client.close(timeout=30)
