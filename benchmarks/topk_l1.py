"""How far is each estimator of the L1 distillation term from the exact L1, and what does it cost?

The L1 term compares the draft distribution q with the target's p, of which the store keeps the
top-k (and, optionally, the final hidden state that gives p exactly). This script scores a
drafter on the run's held-out samples (`train.val_samples`, validation's anchors), on the
blocks exactly as the loss forms them (`model/targets.py:block_targets`), with q over the
training vocabulary of the run (`train.vocab_size`; the whole vocabulary without one), and for
every supervised slot compares with the exact L1 = Σ_Vs|q − p| + (1 − Σ_Vs p) where
p = softmax(final_hidden · lm_headᵀ) over all V in fp32. The reference's final_hidden is the
stored one (`--reference stored`, bf16 in the default store: itself rounded), or the target's
own fp32 final hidden state recomputed by running the target on the scored samples
(`--reference target`, the dump's formula: the truly exact L1; then `exact` — l1_mode exact on
the stored final_hidden — is scored as an estimator too):

- `topk` (Σ_K|q−p| + |Q_rest − r|) and `capped` (the tightest lower bound from the top-k, see
  `_capped_topk_l1`), with `upper` (Σ_K|q−p| + Q_rest + r) beside them: the exact value lies
  between `capped` and `upper`;
- `recompute` (p on the vocabulary recomputed from final_hidden, normalised by the stored top-k);
- `recompute+lse` (a prototype: the same with the log-normaliser of the stored final_hidden's
  logits stored, 4 B/token more).

k up to the stored top-k comes from the stored probabilities (a prefix); larger k from the exact
p, rounded to fp16 as a store would, to show what storing more would buy. Bytes/token is what
the store must hold for the estimator (top-k: 6 B per entry; final_hidden: H × its itemsize,
2·H B in bf16; the hidden states every mode needs are not counted).

Timing (one chunk of `train.chunk_blocks` blocks of the first held-out batch, best of
`--repeat`): each `l1_mode`'s L1 forward + backward into the draft logits (softmax included),
and the whole objective (`train/step.py`: forward, targets, `dspark_loss`, backward) with each
mode; ms per block and the ratio to `topk`.

    # a trained drafter (exported), q over its training vocabulary of 8,192 ids, exact reference
    OMP_NUM_THREADS=1 python benchmarks/topk_l1.py -p params.yaml -S dump.store=data/features.zarr \\
        -S train.vocab_size=8192 --drafter runs/default/drafter --untrained --reference target --samples 8
    python benchmarks/topk_l1.py -p params.yaml --vocab-size 0                     # q over all of V
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import yaml


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "-p", "--params", action="append", default=None, help="Params file(s); default params.yaml."
    )
    p.add_argument(
        "-S", "--set", action="append", default=[], help="Override section.field=value (repeatable)."
    )
    p.add_argument("--drafter", default=None, help="Exported drafter; default export.output.")
    p.add_argument(
        "--untrained", action="store_true", help="Also score the drafter's initial weights (seeded)."
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Training vocabulary of q (as train.vocab_size picks it); default train.vocab_size; "
        "0 = the whole vocabulary.",
    )
    p.add_argument("--ks", default="1,8,16,32,64,128,256,512", help="Comma-separated k values.")
    p.add_argument("--samples", type=int, default=None, help="Held-out samples to score; default all.")
    p.add_argument("--repeat", type=int, default=3, help="Timing repeats (the best one counts).")
    p.add_argument(
        "--reference",
        choices=("stored", "target"),
        default="stored",
        help="final_hidden of the exact L1: the stored one, or the target's fp32 one recomputed "
        "by running the target (target.path) on the scored samples.",
    )
    return p.parse_args(argv)


def slot_values(model, batch: dict, anchors, keep, gamma: float, ks: list[int], ref_final=None) -> dict:
    """Per supervised slot of one micro-batch: the exact L1 (key "exact") and each estimator's
    value (key (estimator, k)), all [M] float64 over the M supervised slots; plus "noise":
    Σ_K |stored p − reference p| at the stored top-k (the data's own rounding). `ref_final`
    [Bt, S, H]: the reference final hidden state (None: the stored one)."""
    from dspark_offline.model import block_targets
    from dspark_offline.model.l1 import in_vocab, l1_to_target, l1_with_stored_topk

    b = model.cfg.block_size
    out: dict = {}
    with torch.no_grad():
        blk = block_targets(batch, anchors, keep, b, gamma, "exact")
        hidden = blk.select(model(batch["input_ids"], batch["hidden"], anchors, keep).hidden)  # [N, B, H]
        ok = blk.eval  # [N, B]
        q = torch.softmax(model.block_logits(hidden, blk.prev, model.train_vocab), dim=-1)  # [N, B, Vs]
        fh, ids, probs = blk.final_hidden, blk.topk_ids, blk.topk_probs

        def softmax_of(final):  # [N, B, H] -> p [N, B, V] and p on q's vocabulary [N, B, Vs]
            full = torch.softmax(
                (final.to(model.lm_head_weight.dtype) @ model.lm_head_weight.T).float(), dim=-1
            )
            return full, (full if model.train_vocab is None else full[..., model.train_vocab])

        p_st, p_st_in = softmax_of(fh)  # from the stored final_hidden
        if ref_final is None:
            p, p_in = p_st, p_st_in
        else:
            ref = block_targets(dict(batch, final_hidden=ref_final), anchors, keep, b, gamma, "exact")
            p, p_in = softmax_of(ref.final_hidden)
            out[("exact", 0)] = l1_to_target(model, q, ids, probs, fh, "exact")[ok].double()
        out["exact"] = ((q - p_in).abs().sum(-1) + (1 - p_in.sum(-1)).clamp(min=0))[
            ok
        ].double()  # as l1_mode exact
        out["noise"] = (p.gather(-1, ids.long()) - probs).abs().sum(-1)[ok].double()
        stored = ids.shape[-1]
        for k in ks:
            if k <= stored:
                kid, kp = ids[..., :k], probs[..., :k]
            else:  # what a store with a larger top-k would hold
                kp, kid = p.topk(k, dim=-1)
                kp = kp.half().float()
            for mode in ("topk", "capped"):
                out[(mode, k)] = l1_to_target(model, q, kid, kp, None, mode)[ok].double()
            pos, inside = in_vocab(model, kid)
            qk = q.gather(-1, pos) * inside  # [N, B, k]
            out[("upper", k)] = (
                (qk - kp).abs().sum(-1) + (1 - qk.sum(-1)).clamp(min=0) + (1 - kp.sum(-1)).clamp(min=0)
            )[ok].double()
            if k <= stored:
                out[("recompute", k)] = l1_to_target(model, q, kid, kp, fh, "recompute")[ok].double()
                # prototype: lse stored (4 B/token) instead of fitted: that of the stored
                # final_hidden's logits
                out[("recompute+lse", k)] = l1_with_stored_topk(q, p_st_in, pos, inside, kp)[ok].double()
    return out


def summarise(values: dict, final_bytes: int) -> list[dict]:
    """One row per (estimator, k): error statistics against the exact L1 and bytes/token."""
    from dspark_offline.model.l1 import acceptance

    exact = values["exact"]
    rows = []
    for key, est in values.items():
        if not isinstance(key, tuple):
            continue
        name, k = key
        err = est - exact
        a = err.abs()
        bytes_tok = (
            6 * k
            + (final_bytes if name.startswith("recompute") or name == "exact" else 0)
            + (4 if name == "recompute+lse" else 0)
        )
        rows.append(
            {
                "estimator": name,
                "k": k,
                "bytes": bytes_tok,
                "mean_err": float(err.mean()),
                "mean_abs": float(a.mean()),
                "p95_abs": float(a.quantile(0.95)),
                "max_abs": float(a.max()),
                "accept_err": float((acceptance(est) - acceptance(exact)).mean()),
            }
        )
    order = {"topk": 0, "capped": 1, "upper": 2, "recompute": 3, "recompute+lse": 4, "exact": 5}
    return sorted(rows, key=lambda r: (order[r["estimator"]], r["k"]))


def time_modes(model, batch: dict, anchors, keep, tc, repeat: int) -> dict[str, tuple[float, float]]:
    """{l1_mode: (L1 alone, whole objective)} seconds per block, forward + backward, best of `repeat`."""
    from dataclasses import replace

    from dspark_offline.model import LossConfig, block_targets
    from dspark_offline.model.l1 import l1_to_target
    from dspark_offline.train.step import local_sums, pooled_loss

    res = {}
    with torch.no_grad():
        blk = block_targets(batch, anchors, keep, model.cfg.block_size, tc.gamma, "exact")
        hidden = blk.select(model(batch["input_ids"], batch["hidden"], anchors, keep).hidden)  # [N, B, H]
    n = min(int(tc.chunk_blocks), len(blk))
    sl = blk[:n]
    logits = model.block_logits(hidden[:n], sl.prev, model.train_vocab).detach()  # [n, B, Vs]
    blocks_total = len(blk)
    for mode in ("topk", "capped", "recompute", "exact"):
        best_l1 = best_obj = float("inf")
        for _ in range(repeat):
            x = logits.clone().requires_grad_(True)
            t0 = time.perf_counter()
            l1 = l1_to_target(model, torch.softmax(x, -1), sl.topk_ids, sl.topk_probs, sl.final_hidden, mode)
            l1.sum().backward()
            best_l1 = min(best_l1, (time.perf_counter() - t0) / n)
            cfg = replace(LossConfig.from_train(tc), l1_mode=mode)
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            pooled_loss(local_sums(model, batch, anchors, keep, cfg), cfg).backward()
            best_obj = min(best_obj, (time.perf_counter() - t0) / blocks_total)
        res[mode] = (best_l1, best_obj)
    model.zero_grad(set_to_none=True)
    return res


def target_reference(params, store):
    """batch -> the target's own fp32 final hidden state [Bt, S, H] (`HFTarget`, the dump's
    formula), refusing a target whose weights are not the store's."""
    from dspark_offline.target.hf_backend import HFTarget

    m = store.manifest
    target = HFTarget(
        params.target.path, layer_ids=list(m.layer_ids[:1]), top_k=1, dtype="float32", device="cpu"
    )
    if target.info["weights_hash"] != m.target.weights_hash:
        raise SystemExit(
            f"target {params.target.path} weights_hash={target.info['weights_hash']} but the store "
            f"was dumped from weights_hash={m.target.weights_hash}"
        )

    def final_hidden(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]  # [Bt, S]
        mask = (torch.arange(ids.shape[1])[None] < batch["lengths"][:, None]).long()  # [Bt, S] right padding
        return target(ids, mask).final_hidden.float()

    return final_hidden


def score_drafter(model, store, indices, tc, ks: list[int], reference=None) -> tuple[dict, tuple]:
    """All held-out slots' values (`slot_values`, concatenated) and the first batch (for timing).
    `reference`: batch -> reference final_hidden (`target_reference`), None = the stored one."""
    from dspark_offline.train.anchors import batch_anchors
    from dspark_offline.train.dataset import FeatureDataset, collate
    from dspark_offline.train.validate import ANCHOR_STEP

    ds = FeatureDataset(store, indices, tc.max_length)
    parts, first = [], None
    for lo in range(0, len(ds), tc.micro_batch_size):
        batch = collate([ds[k] for k in range(lo, min(lo + tc.micro_batch_size, len(ds)))])
        anchors, keep = batch_anchors(batch, tc.num_anchors, tc.seed, ANCHOR_STEP)  # validation's anchors
        first = first or (batch, anchors, keep)
        ref = None if reference is None else reference(batch)
        parts.append(slot_values(model, batch, anchors, keep, tc.gamma, ks, ref))
    values = {key: torch.cat([pt[key] for pt in parts]) for key in parts[0]}
    return values, first


def print_table(title: str, rows: list[dict], values: dict) -> None:
    n = len(values["exact"])
    print(
        f"\n## {title}: {n} supervised slots; exact L1 mean {float(values['exact'].mean()):.4f}; "
        f"Σ_K|p_stored − p_reference| mean {float(values['noise'].mean()):.5f} (the data's rounding)"
    )
    print(
        f"{'estimator':<14} {'k':>4} {'B/token':>8} {'mean err':>9} {'mean |err|':>10} {'p95 |err|':>9} "
        f"{'max |err|':>9} {'accept err':>10}"
    )
    for r in rows:  # k "-": the estimator reads no top-k
        print(
            f"{r['estimator']:<14} {r['k'] or '-':>4} {r['bytes']:>8} {r['mean_err']:>+9.4f} "
            f"{r['mean_abs']:>10.4f} {r['p95_abs']:>9.4f} {r['max_abs']:>9.4f} {r['accept_err']:>+10.4f}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    from dspark_offline.config import load_params
    from dspark_offline.model import DSparkDraft
    from dspark_offline.model.serving import load_serving
    from dspark_offline.store import open_store
    from dspark_offline.train.selection import select_samples
    from dspark_offline.train.validate import split_validation
    from dspark_offline.train.vocab import training_vocabulary

    sets = {key: yaml.safe_load(raw) for key, _, raw in (item.partition("=") for item in args.set)}
    params = load_params(args.params or ["params.yaml"], sets)
    tc = params.train
    if tc.val_samples == 0:
        print("train.val_samples is 0: there are no held-out samples to score on", file=sys.stderr)
        return 2
    store = open_store(params.dump.store, complete_only=True)
    if not store.manifest.has_final_hidden:
        print(f"{store.path} has no final_hidden: the exact L1 cannot be computed", file=sys.stderr)
        return 2
    ks = sorted({int(k) for k in args.ks.split(",")})
    head = store.target_weights()
    path = args.drafter or params.export.output
    trained = load_serving(path, head["embed_tokens"], head["lm_head"]).float()
    drafters = [(f"drafter {path}", trained)]
    if args.untrained:
        torch.manual_seed(tc.seed)
        init = DSparkDraft(trained.cfg)
        init.set_target_head(head["embed_tokens"], head["lm_head"])
        drafters.append(("untrained drafter (random initial weights)", init.float().eval()))
    train_idx, val_idx = split_validation(
        select_samples(store, tc.max_length, tc.min_loss_tokens, progress=False), tc.val_samples, tc.seed
    )
    val_idx = val_idx[: args.samples] if args.samples else val_idx
    size = tc.vocab_size if args.vocab_size is None else (args.vocab_size or None)
    vocab = training_vocabulary(store, train_idx, size, progress=False) if size else None
    H = store.manifest.target.hidden_size
    final_bytes = H * torch.empty(0, dtype=getattr(torch, store.manifest.dtypes.final_hidden)).element_size()
    where = (
        f"q over a training vocabulary of {len(vocab)} ids"
        if vocab is not None
        else "q over the whole vocabulary"
    )
    reference = target_reference(params, store) if args.reference == "target" else None
    print(
        f"store {store.path}: top-{store.manifest.top_k}, H={H}, V={store.manifest.target.vocab_size}, "
        f"final_hidden {store.manifest.dtypes.final_hidden}; {len(val_idx)} held-out samples, "
        f"{tc.num_anchors} anchors each; {where}; exact L1 from the {args.reference} final_hidden "
        f"(fp32 softmax); torch threads {torch.get_num_threads()}"
    )

    for name, model in drafters:
        model.set_train_vocab(vocab)
        t0 = time.perf_counter()
        values, (batch, anchors, keep) = score_drafter(model, store, val_idx, tc, ks, reference)
        print_table(
            f"{name}, {where} ({time.perf_counter() - t0:.0f} s)", summarise(values, final_bytes), values
        )
        timing = time_modes(model, batch, anchors, keep, tc, args.repeat)
        base_l1, base_obj = timing["topk"]
        print(
            f"\n{'l1_mode':<10} {'L1 fwd+bwd ms/block':>20} {'ratio':>6} "
            f"{'objective fwd+bwd ms/block':>27} {'ratio':>6}"
        )
        for mode, (t_l1, t_obj) in timing.items():
            print(
                f"{mode:<10} {1e3 * t_l1:>20.3f} {t_l1 / base_l1:>6.2f} "
                f"{1e3 * t_obj:>27.3f} {t_obj / base_obj:>6.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
