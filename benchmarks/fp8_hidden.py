"""float8 hidden states vs bfloat16 on real target features: reconstruction error and bytes/token.

One run dumps the same prepared samples three times with the real target (SmolLM2 by default,
`dump` params otherwise as given):

- **float32**: the reference (on CPU the target computes in float32, so this is the exact state);
- **bfloat16** + `final_hidden` (bf16): the layout of the default `params.yaml`;
- **float8_e4m3** with `dump.store_final_hidden: auto` and `train.l1_mode: topk`, so no
  `final_hidden` (store/fp8.py: e4m3 codes + a bf16 scale per token per layer).

and prints, side by side:

- relative error of the stored hidden states against the float32 reference, per (token, layer)
  row (||x' - x|| / ||x|| over H: mean, p99, max) and over everything (Frobenius), for bf16,
  float8 with scales, and a bare float8 cast without scales (computed in memory from the
  reference: what a cast-only store would hold), with how many values lie beyond e4m3's ±448;
- bytes per token on disk (zstd as in params; every array of the parts, per sample token, the
  accounting of `dspark-offline inspect`), split by array, for four layouts: bf16 and float8,
  each with and without `final_hidden`. The rows without / with it are derived from the stores'
  own arrays (the `final_hidden` array is the same bf16 array in both);
- each as a ratio to **DeepSpec's target-cache layout** for the same layers and samples: per
  token input_ids int32 + attention_mask + loss_mask uint8 + L + 1 bf16 states (the L layers and
  the last hidden state), uncompressed, plus a 48-byte index record per sample
  (deepseek-ai/DeepSpec scripts/data/estimate_target_cache_size.py). DeepSpec stores no top-k.

The drafter's acceptance (tau) trained from each store is not measured here (a training run per
store; see the README).

CPU (~5 min for 32 samples on a shared 2-core machine):
    OMP_NUM_THREADS=1 python benchmarks/fp8_hidden.py --workdir /tmp/fp8bench
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEEPSPEC_INDEX_RECORD = 48  # bytes per sample of DeepSpec's samples.idx (struct "<QIIQQQQQ")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("-p", "--params", default=None, help="params.yaml whose target/dump sections to use.")
    p.add_argument("--source", default="embedded:sharegpt", help="Conversations for prepare.")
    p.add_argument("--num-samples", type=int, default=32, help="Prepared samples to dump.")
    p.add_argument("--max-length", type=int, default=512, help="Tokens per sample at most.")
    p.add_argument("--workdir", required=True, help="Where the prepared data and the three stores go.")
    return p.parse_args()


def make_params(args: argparse.Namespace, workdir: Path):
    from dspark_offline.config import load_params

    over = {
        "target.dtype": "float32",  # the reference must be the exact state
        "generate.enabled": False,
        "prepare.source": args.source,
        "prepare.output": str(workdir / "prepared"),
        "prepare.num_samples": args.num_samples,
        "prepare.num_eval_samples": 0,
        "prepare.max_length": args.max_length,
        "dump.overwrite": True,
        "dump.num_parts": 1,
        "dump.part_index": None,
    }
    return load_params(args.params, over)


def ensure_prepared(params) -> None:
    from dspark_offline.data import prepare
    from dspark_offline.data.errors import PreparedDataError
    from dspark_offline.data.prepared import PreparedSplit

    try:
        split = PreparedSplit.load(params.prepare.output, "train")
        if (
            len(split) == params.prepare.num_samples
            and split.meta.get("max_length") == params.prepare.max_length
        ):
            return
    except PreparedDataError:  # missing or partial: (re)create it
        pass
    prepare.run(params)


def dump_as(params, store: Path, **dump_over) -> str:
    """Dump into `store` (a complete store with the same inputs is kept: the dump resumes it)."""
    from dspark_offline import dump

    p = params.model_copy(deep=True)
    p.dump.store = str(store)
    for k, v in dump_over.items():
        setattr(p.dump, k, v)
    p.train.l1_mode = "topk"  # what store_final_hidden=auto reads
    return dump.run(p)


def array_bytes(path: str) -> tuple[dict[str, int], int, int]:
    """({array: bytes on disk over all parts}, sample tokens, samples)."""
    from dspark_offline.store.manifest import PART_ATTR
    from dspark_offline.store.reader import open_root, read_manifest

    root, m = open_root(path), read_manifest(path)
    sizes: dict[str, int] = {}
    tokens = samples = 0
    for p in range(m.num_parts):
        group = root[f"part-{p:05d}"]
        for name, arr in group.arrays():
            sizes[name] = sizes.get(name, 0) + arr.nbytes_stored()
        attrs = group.attrs[PART_ATTR]
        tokens, samples = tokens + attrs["num_tokens"], samples + attrs["num_samples"]
    return sizes, tokens, samples


def error_rows(ref, got):
    """Relative errors per (token, layer) row [S*L], the same over each row's other channels than
    its largest |value| (what a per-row scale costs the small channels of an outlier row) [S*L],
    and the squared-norm sums (error, reference)."""
    x = ref.double().flatten(0, 1)  # [S*L, H]
    diff = got.double().flatten(0, 1) - x  # [S*L, H]
    norm = x.norm(dim=-1)  # [S*L]
    rel = diff.norm(dim=-1) / norm.clamp_min(1e-30)
    rest = torch.ones_like(x, dtype=torch.bool).scatter_(
        1, x.abs().argmax(-1, keepdim=True), False
    )  # [S*L, H]
    rel_rest = (diff * rest).norm(dim=-1) / (x * rest).norm(dim=-1).clamp_min(1e-30)
    return rel, rel_rest, float((diff**2).sum()), float((norm**2).sum())


def main() -> None:
    from dspark_offline.store import open_store

    args = parse_args()
    workdir = Path(args.workdir)
    params = make_params(args, workdir)
    ensure_prepared(params)
    ref_path = dump_as(params, workdir / "f32.zarr", hidden_dtype="float32", store_final_hidden=True)
    bf_path = dump_as(params, workdir / "bf16.zarr", hidden_dtype="bfloat16", store_final_hidden=True)
    f8_path = dump_as(params, workdir / "fp8.zarr", hidden_dtype="float8_e4m3", store_final_hidden="auto")
    ref, bf, f8 = open_store(ref_path), open_store(bf_path), open_store(f8_path)
    assert not f8.manifest.has_final_hidden, (
        "store_final_hidden=auto with l1_mode=topk stores no final_hidden"
    )
    L, H = len(ref.manifest.layer_ids), ref.manifest.target.hidden_size

    # -- reconstruction error against the float32 reference ---------------------------------
    index = {name: {int(s): i for i, s in enumerate(st.sample_ids)} for name, st in (("bf", bf), ("f8", f8))}
    acc = {
        k: {"rel": [], "rest": [], "err": 0.0, "ref": 0.0}
        for k in ("bfloat16", "float8 + scales", "float8 bare cast")
    }
    beyond = flushed = values = rows_beyond = 0
    amax = 0.0
    for i in range(len(ref)):
        sid = int(ref.sample_ids[i])
        x = ref.sample(i, with_final_hidden=False).hidden  # [S, L, H] float32
        got = {
            "bfloat16": bf.sample(index["bf"][sid], with_final_hidden=False).hidden.float(),
            "float8 + scales": f8.sample(index["f8"][sid], with_final_hidden=False).hidden,
            "float8 bare cast": x.to(torch.float8_e4m3fn).float(),
        }
        for name, y in got.items():
            rel, rest, e, r = error_rows(x, y)
            acc[name]["rel"].append(rel)
            acc[name]["rest"].append(rest)
            acc[name]["err"] += e
            acc[name]["ref"] += r
        beyond += int((x.abs() > 448).sum())
        flushed += int(((x != 0) & (x.abs() < 2.0**-10)).sum())
        rows_beyond += int((x.abs().amax(-1) > 448).sum())
        values += x.numel()
        amax = max(amax, float(x.abs().max()))
    n_rows = values // H
    print(
        f"\n{len(ref)} samples, {ref.manifest.data.num_tokens} tokens of {ref.manifest.target.name}; layers "
        f"{ref.manifest.layer_ids} (L={L}, H={H})"
    )
    print(
        f"values beyond e4m3's ±448: {beyond} of {values} ({100 * beyond / values:.3f} %), "
        f"in {rows_beyond} of "
        f"{n_rows} (token, layer) rows ({100 * rows_beyond / n_rows:.2f} %); largest |value| {amax:.1f}; "
        f"nonzero values below 2^-10 (a bare cast flushes them): {100 * flushed / values:.2f} %"
    )
    print(
        "\nrelative error per (token, layer) row: ||x' - x|| / ||x||; 'rest': over each row's channels "
        "other than its largest |x|"
        f"\n{'hidden states':<18} {'mean':>9} {'p99':>9} {'max':>9} {'rest mean':>10} {'rest p99':>9} "
        f"{'Frobenius':>10}"
    )
    for name, a in acc.items():
        rel, rest = torch.cat(a["rel"]), torch.cat(a["rest"])
        print(
            f"{name:<18} {float(rel.mean()):>9.5f} {float(rel.quantile(0.99)):>9.5f} "
            f"{float(rel.max()):>9.5f} {float(rest.mean()):>10.5f} {float(rest.quantile(0.99)):>9.5f} "
            f"{(a['err'] / a['ref']) ** 0.5:>10.5f}"
        )
    fro = {k: (a["err"] / a["ref"]) ** 0.5 for k, a in acc.items()}
    print(
        f"ratio float8+scales / bfloat16 (Frobenius): {fro['float8 + scales'] / fro['bfloat16']:.1f}x; "
        f"bare cast / float8+scales: {fro['float8 bare cast'] / fro['float8 + scales']:.2f}x"
    )

    # -- bytes per token on disk --------------------------------------------------------------
    bf_sizes, tokens, samples = array_bytes(bf_path)
    f8_sizes, tokens8, _ = array_bytes(f8_path)
    assert tokens8 == tokens
    deepspec = (4 + 1 + 1 + (L + 1) * H * 2) * tokens + DEEPSPEC_INDEX_RECORD * samples
    other = ("input_ids", "loss_mask", "sample_id", "sample_start", "sample_length")

    def row(name: str, sizes: dict[str, int], with_final: bool) -> None:
        cols = [
            sizes.get("hidden", 0),
            sizes.get("hidden_scale", 0),
            bf_sizes["final_hidden"] if with_final else 0,
            sizes["topk_ids"] + sizes["topk_probs"],
            sum(sizes[k] for k in other),
        ]
        total = sum(cols)
        cells = "".join(f"{c / tokens:>10.1f}" for c in cols)
        print(f"{name:<34}{cells}{total / tokens:>10.1f}{total / deepspec:>9.3f}")

    print(
        f"\nbytes/token on disk ({bf.manifest.compressor}:{bf.manifest.compression_level}, "
        f"top-{bf.manifest.top_k})"
        f"\n{'layout':<34}{'hidden':>10}{'scales':>10}{'final':>10}{'top-k':>10}{'other':>10}{'total':>10}"
        f"{'vs DS':>9}"
    )
    row("bfloat16 + final_hidden (default)", bf_sizes, True)
    row("bfloat16, no final_hidden", bf_sizes, False)
    row("float8 + final_hidden (bf16)", f8_sizes, True)
    row("float8, no final_hidden (topk)", f8_sizes, False)
    print(
        f"{'DeepSpec layout (bf16, no top-k)':<34}{L * H * 2:>10.1f}{0:>10.1f}{H * 2:>10.1f}{0:>10.1f}"
        f"{6 + DEEPSPEC_INDEX_RECORD * samples / tokens:>10.1f}{deepspec / tokens:>10.1f}{1:>9.3f}"
    )


if __name__ == "__main__":
    main()
