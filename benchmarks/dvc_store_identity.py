"""What DVC's bookkeeping of the feature store costs: the store as a DVC output (before) against
its completion record (now, `dspark_offline/store/record.py`), side by side on the same store.

A synthetic store (tests/synthetic_store.py: the real format, tiny arrays) has every shard made
`--shard-mib` larger with a hole (a sparse region: no disk used, but DVC's md5 reads it like data),
so the store has the size of a real one while costing nothing. In two scratch git + DVC repos
holding this repo's pipeline (`dvc.yaml`, the tiny params), one with the store as the dump
stage's output and train's dependency (the old dvc.yaml: `cache: false, persist: true`), one with
the record (this dvc.yaml), it times:

- `dvc commit dump`: what `dvc repro` does after a dump (hashes the outputs);
- `dvc status dump` with nothing changed (DVC's state cache: inode, mtime, size);
- `dvc status dump` after every shard's mtime changed (a resumed dump, a copy without -t, ...);
- the train stage's check that the store is still the recorded one (`check_record`; the record
  layout only: the old layout has no such check).

Each is printed in seconds with the ratio before / now. DVC's own start-up (~1 s) is in every
number. Defaults: ~340 shards of 32 MiB (about 11 GiB apparent), a few minutes in all.

    python benchmarks/dvc_store_identity.py                  # --samples 120 --shard-mib 32
    python benchmarks/dvc_store_identity.py --shard-mib 256  # ~85 GiB: before grows, now does not
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECORD_OUT = "${dump.store}.complete.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument(
        "--samples", type=int, default=120, help="Samples of the synthetic store (more = more shards)."
    )
    p.add_argument("--shard-mib", type=int, default=32, help="Hole added to every shard, MiB.")
    p.add_argument("--workdir", default=None, help="Where the scratch repos go (default: a temporary dir).")
    return p.parse_args(argv)


def old_dvc_yaml(text: str) -> str:
    """This dvc.yaml with the store itself as dump's output and train's dependency (before)."""
    doc = yaml.safe_load(text)
    doc["stages"]["dump"]["outs"] = [{"${dump.store}": {"cache": False, "persist": True}}]
    deps = doc["stages"]["train"]["deps"]
    deps[deps.index(RECORD_OUT)] = "${dump.store}"
    return yaml.safe_dump(doc, sort_keys=False)


def make_repo(where: Path, dvc_yaml: str) -> Path:
    repo = where
    for name in (".dvcignore", "stages", "dspark_offline", ".dvc/config"):
        src, dst = ROOT / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    (repo / "dvc.yaml").write_text(dvc_yaml)
    shutil.copy(ROOT / "configs" / "tiny.yaml", repo / "params.yaml")
    (repo / ".gitignore").write_text("/data/\n/runs/\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for d in (params["prepare"]["output"], params["generate"]["output"]):  # the dump stage's data deps
        (repo / d).mkdir(parents=True)
        (repo / d / "meta.json").write_text("{}")
    return repo


def timed(cmd: list[str], repo: Path) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {repo}:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic_store import inflate_shards, make_store

    from dspark_offline.store.record import check_record, write_record

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dvc-store-identity-"))
    text = (ROOT / "dvc.yaml").read_text()
    repos = {
        "before (store)": make_repo(work / "before", old_dvc_yaml(text)),
        "now (record)": make_repo(work / "now", text),
    }
    rows: dict[str, dict[str, float]] = {}
    for label, repo in repos.items():
        store_rel = yaml.safe_load((repo / "params.yaml").read_text())["dump"]["store"]
        store = make_store(repo / store_rel, num_samples=args.samples, num_parts=2)
        shards = inflate_shards(store, args.shard_mib << 20)
        apparent = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        write_record(store)
        row = rows.setdefault(label, {})
        row["dvc commit dump (after a dump)"] = timed(["dvc", "commit", "--force", "dump"], repo)
        row["dvc status dump (nothing changed)"] = timed(["dvc", "status", "dump"], repo)
        now = time.time() + 5
        for f in store.rglob("*"):
            if f.is_file():
                os.utime(f, (now, now))
        row["dvc status dump (shard mtimes changed)"] = timed(["dvc", "status", "dump"], repo)
        if "record" in label:
            t0 = time.perf_counter()
            check_record(store)
            row["train stage: check_record"] = time.perf_counter() - t0
    print(
        f"store: {shards} shards, {apparent / 2**30:.1f} GiB apparent ({args.shard_mib} MiB hole per shard), "
        f"2 parts; scratch repos in {work}"
    )
    before, after = rows["before (store)"], rows["now (record)"]
    print(f"{'':42s} {'before s':>9s} {'now s':>9s} {'before/now':>10s}")
    for name in after:
        b = before.get(name)
        ratio = f"{b / after[name]:10.1f}" if b is not None else f"{'-':>10s}"
        print(f"{name:42s} {b if b is not None else float('nan'):9.2f} {after[name]:9.2f} {ratio}")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
