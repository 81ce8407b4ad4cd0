"""Is the trained confidence head as good as a linear head can be for its drafter?

The confidence BCE of a training run is hard to read: its target (the probability that the
drafter's own token is accepted) moves as the drafter learns. This script freezes an exported
drafter and compares, on the run's held-out samples (`train.val_samples`, the same split as
training) with fixed anchors:

- the best constant guess (the mean target of the training samples' examples);
- the trained head as exported;
- the same head re-fitted alone (the drafter frozen) on examples from training samples, with
  Adam, for `--steps` steps from the trained weights and from zero.

Each row prints the held-out BCE, its excess over the floor (the target's entropy, which no
predictor can beat) and `conf_skill` (1 = perfect, 0 = the constant). If re-fitting the head
alone barely lowers the excess, the jointly trained head already is about the best linear
head for these features, and a rising confidence BCE during training comes from its target.

    OMP_NUM_THREADS=2 python benchmarks/confidence_head.py            # after `dvc repro`, ~2 min
    python benchmarks/confidence_head.py -p params.yaml --drafter runs/default/drafter --steps 4000
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument("--drafter", default=None, help="Exported drafter; default export.output.")
    p.add_argument(
        "--fit-samples", type=int, default=96, help="Training samples whose examples fit the head."
    )
    p.add_argument("--steps", type=int, default=2000, help="Adam steps of each re-fit.")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the re-fits.")
    p.add_argument("--batch", type=int, default=512, help="Examples per re-fit step.")
    return p.parse_args(argv)


def collect(model, store, indices, tc, micro: int):
    """(features [n, H+r], targets [n], weights [n]) of all supervised slots, fixed anchors."""
    from dspark_offline.model import block_targets
    from dspark_offline.model.confidence import confidence_examples
    from dspark_offline.train.anchors import batch_anchors
    from dspark_offline.train.dataset import FeatureDataset, collate
    from dspark_offline.train.validate import ANCHOR_STEP

    ds = FeatureDataset(store, indices, tc.max_length)
    feats, targets, weights = [], [], []
    for lo in range(0, len(ds), micro):
        batch = collate([ds[k] for k in range(lo, min(lo + micro, len(ds)))])
        anchors, keep = batch_anchors(batch, tc.num_anchors, tc.seed, ANCHOR_STEP)  # validation's anchors
        with torch.no_grad():
            blocks = block_targets(batch, anchors, keep, model.cfg.block_size, tc.gamma, tc.l1_mode)
            out = model(batch["input_ids"], batch["hidden"], anchors, keep)
        h, prev, t, w = confidence_examples(model, out.hidden, blocks, tc.l1_mode)  # [N, B, ...]
        x = (
            torch.cat([h, model.markov_head.prev_embedding(prev).detach()], dim=-1)
            if model.cfg.markov_head
            else h
        )
        ok = w > 0
        feats.append(x[ok].float())
        targets.append(t[ok])
        weights.append(w[ok])
    return torch.cat(feats), torch.cat(targets), torch.cat(weights)


def score(logits, t, w) -> tuple[float, float, float]:
    """(weighted BCE, its excess over the floor, conf_skill) of confidence logits."""
    from dspark_offline.model.confidence import binary_entropy, confidence_skill

    bce = float((F.binary_cross_entropy_with_logits(logits, t, reduction="none") * w).sum() / w.sum())
    floor = float((binary_entropy(t) * w).sum() / w.sum())
    mean = float((t * w).sum() / w.sum())
    return bce, bce - floor, confidence_skill(bce - floor, mean, floor)


def refit(proj: torch.nn.Linear, x, t, w, steps: int, lr: float, batch: int, seed: int) -> torch.nn.Linear:
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = (
            F.binary_cross_entropy_with_logits(proj(x[i]).squeeze(-1), t[i], reduction="none") * w[i]
        ).sum() / w[i].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return proj


def main(argv=None) -> int:
    args = parse_args(argv)
    from dspark_offline.config import load_params
    from dspark_offline.model.serving import load_serving
    from dspark_offline.store import open_store
    from dspark_offline.train.selection import select_samples
    from dspark_offline.train.validate import split_validation

    params = load_params(args.params or ["params.yaml"], [])
    tc = params.train
    if tc.val_samples == 0:
        print("train.val_samples is 0: there are no held-out samples to score on", file=sys.stderr)
        return 2
    store = open_store(params.dump.store, complete_only=True)
    head = store.target_weights()
    model = load_serving(args.drafter or params.export.output, head["embed_tokens"], head["lm_head"]).float()
    if model.confidence_head is None:
        print("the drafter has no confidence head", file=sys.stderr)
        return 2
    train_idx, val_idx = split_validation(
        select_samples(store, tc.max_length, tc.min_loss_tokens, progress=False), tc.val_samples, tc.seed
    )
    t0 = time.perf_counter()
    xf, tf, wf = collect(model, store, train_idx[: args.fit_samples], tc, tc.micro_batch_size)
    xv, tv, wv = collect(model, store, val_idx, tc, tc.micro_batch_size)
    print(
        f"examples: {len(xf)} from {min(args.fit_samples, len(train_idx))} training samples (fit), "
        f"{len(xv)} from {len(val_idx)} held-out samples (scored); {time.perf_counter() - t0:.0f} s"
    )

    trained = model.confidence_head.proj
    rows = []
    mean = float((tf * wf).sum() / wf.sum())
    rows.append(("constant (mean training target)", score(torch.full_like(tv, mean).logit(), tv, wv)))
    with torch.no_grad():
        rows.append(("trained head (as exported)", score(trained(xv).squeeze(-1), tv, wv)))
    for name, init in (("from the trained weights", trained.state_dict()), ("from zero", None)):
        proj = torch.nn.Linear(trained.in_features, 1)
        if init is None:
            torch.nn.init.zeros_(proj.weight)
            torch.nn.init.zeros_(proj.bias)
        else:
            proj.load_state_dict(init)
        refit(proj, xf, tf, wf, args.steps, args.lr, args.batch, seed=tc.seed)
        with torch.no_grad():
            rows.append((f"re-fitted alone {name} ({args.steps} steps)", score(proj(xv).squeeze(-1), tv, wv)))

    print(f"\n{'head':<56} {'BCE':>7} {'excess':>7} {'skill':>7}")
    for name, (bce, excess, skill) in rows:
        print(f"{name:<56} {bce:7.4f} {excess:7.4f} {skill:7.3f}")
    base = rows[1][1][1]
    print(f"\nratio excess(re-fitted from trained) / excess(trained): {rows[2][1][1] / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
