"""Fast tests of the training plumbing that needs no DeepSpeed engine: schedule, batch math,
sampler, collate, sample filter, metrics sink, checkpoint lookup, launcher env."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dspark_offline.config import TrainConfig
from dspark_offline.model import LossConfig, LossSums
from dspark_offline.model.confidence import confidence_skill
from dspark_offline.train import checkpoint, dist
from dspark_offline.train.anchors import batch_anchors
from dspark_offline.train.dataset import FeatureDataset, SampleReadError, collate
from dspark_offline.train.ds_config import BatchPlanError, deepspeed_config, plan_batches
from dspark_offline.train.metrics import COLUMNS, MetricsSink, pool_step_metrics, pool_sums, read_tsv
from dspark_offline.train.sampler import ResumableSampler, SamplerPosition
from dspark_offline.train.schedule import WarmupCosine, make_scheduler, warmup_steps_for
from dspark_offline.train.selection import select_samples
from dspark_offline.train.validate import ValidationSplitError, split_validation


# -- schedule -------------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    s = WarmupCosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [s(i) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup, first step > 0
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)  # cosine ends at min_lr_ratio
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert warmup_steps_for(100, 0.04) == 4 and warmup_steps_for(3, 0.01) == 1 and warmup_steps_for(3, 0) == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(total_steps=5, warmup_steps=6, min_lr_ratio=0.1)


def test_resumed_scheduler_keeps_its_step_and_this_runs_schedule():
    """A checkpoint restores the scheduler's position, never the schedule of the run that saved it
    (a resume with more steps follows the new, longer curve)."""
    param = torch.nn.Parameter(torch.zeros(1))
    old = make_scheduler(torch.optim.SGD([param], lr=1.0), WarmupCosine(10, 2, 0.1))
    for _ in range(3):
        old.optimizer.step()
        old.step()
    longer = WarmupCosine(100, 2, 0.1)
    new = make_scheduler(torch.optim.SGD([param], lr=1.0), longer)
    new.load_state_dict(old.state_dict())
    assert new.last_epoch == 3 and longer == WarmupCosine(100, 2, 0.1)
    new.optimizer.step()
    new.step()
    assert new.get_last_lr()[0] == pytest.approx(longer(4)) and longer(4) != pytest.approx(
        WarmupCosine(10, 2, 0.1)(4)
    )


# -- batch math -----------------------------------------------------------------------------------
def test_batch_plan_and_deepspeed_config_agree():
    tc = TrainConfig(micro_batch_size=2, grad_accum=3, num_epochs=2.5, warmup_ratio=0.1, grad_clip=0.5)
    plan = plan_batches(tc, num_samples=50, num_tokens=5000, world_size=4)
    assert plan.global_batch == 24 and plan.steps_per_epoch == 2 and plan.total_steps == 5
    assert plan.warmup_steps == 1 and plan.epochs == pytest.approx(2.5)
    assert plan.tokens_per_step == pytest.approx(2400)
    cfg = deepspeed_config(tc, plan, torch.float32, torch.device("cpu"))
    assert (
        cfg["train_batch_size"]
        == 24
        == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 4
    )
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 2
    assert "global batch 24 = micro 2 x accum 3 x world 4" in plan.describe()
    assert plan_batches(TrainConfig(max_steps=7), 3, 30, 1).total_steps == 7  # max_steps overrides epochs


def test_batch_plan_refuses_too_few_samples():
    with pytest.raises(BatchPlanError, match=r"3 training samples .* global batch of 4"):
        plan_batches(TrainConfig(micro_batch_size=2), num_samples=3, num_tokens=30, world_size=2)


# -- sampler --------------------------------------------------------------------------------------
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_splits_global_batches_across_ranks_like_one_process():
    one = ResumableSampler(10, micro_batch_size=2, grad_accum=1, world_size=1, rank=0, seed=3)
    r0 = ResumableSampler(10, micro_batch_size=1, grad_accum=1, world_size=2, rank=0, seed=3)
    r1 = ResumableSampler(10, micro_batch_size=1, grad_accum=1, world_size=2, rank=1, seed=3)
    a, b0, b1 = _take(one, 10), _take(r0, 5), _take(r1, 5)
    assert a[0::2] == b0 and a[1::2] == b1  # step k: one process gets [rank0's, rank1's] sample
    assert sorted(a) == list(range(10))  # an epoch is a permutation
    assert _take(one, 20)[10:] != a  # the next epoch is reshuffled


def test_sampler_drops_incomplete_batch_and_resumes_from_position():
    s = ResumableSampler(7, micro_batch_size=1, grad_accum=3, world_size=1, rank=0, seed=0)
    assert s.advance(SamplerPosition(0, 3)) == SamplerPosition(1, 0)  # 7 = 2 batches of 3 + 1 dropped
    full = _take(s, 12)
    pos = SamplerPosition()
    for _ in range(3):
        pos = s.advance(pos)
    resumed = ResumableSampler(
        7, micro_batch_size=1, grad_accum=3, world_size=1, rank=0, seed=0, position=pos
    )
    assert pos == SamplerPosition(1, 3) and _take(resumed, 3) == full[9:12]


# -- dataset / collate / anchors ------------------------------------------------------------------
class _FakeStore:
    """lengths + per-sample arrays; `fail` makes sample(i) raise for that index."""

    def __init__(self, masks, fail=None):
        self.masks = [torch.tensor(m, dtype=torch.bool) for m in masks]
        self.lengths = np.array([len(m) for m in masks])
        self.fail = fail

    def loss_mask(self, i):
        return self.masks[i]

    def sample(self, i, with_final_hidden=True):
        if i == self.fail:
            raise OSError("checksum mismatch in chunk 3")
        n = len(self.masks[i])
        return SimpleNamespace(
            sample_id=100 + i,
            input_ids=torch.arange(n) + 1,
            loss_mask=self.masks[i],
            hidden=torch.ones(n, 2, 4),
            final_hidden=None,
            topk_ids=torch.ones(n, 3, dtype=torch.int64),
            topk_probs=torch.full((n, 3), 0.2),
        )


def test_select_samples_filters_on_truncated_loss_tokens():
    store = _FakeStore([[0, 0, 1, 1, 1], [1], [0, 0, 0, 0, 1, 1], [1, 1, 0, 0]])
    assert select_samples(store, None, 2, progress=False).tolist() == [0, 2, 3]
    assert select_samples(store, 4, 2, progress=False).tolist() == [0, 3]  # sample 2's loss tokens cut off
    assert select_samples(store, None, 0, progress=False).tolist() == [0, 1, 2, 3]


def test_dataset_truncates_and_names_the_failing_sample():
    store = _FakeStore([[0, 1, 1, 1, 1], [1, 1, 1]], fail=1)
    ds = FeatureDataset(store, np.array([0, 1]), max_length=3)
    item = ds[0]
    assert (
        item["input_ids"].tolist() == [1, 2, 3]
        and item["hidden"].shape == (3, 2, 4)
        and item["sample_id"] == 100
    )
    with pytest.raises(SampleReadError, match=r"sample 1 \(dataset item 1\).*checksum mismatch"):
        ds[1]


def test_dataset_cache_keeps_items_up_to_its_byte_cap():
    store = _FakeStore([[0, 1, 1, 1, 1], [1, 1, 1]])  # items of 385 and 231 bytes
    reads = []
    real = store.sample
    store.sample = lambda i, **kw: reads.append(i) or real(i, **kw)
    ds = FeatureDataset(store, np.array([0, 1]), max_length=None, cache_bytes=400)
    first = [ds[0], ds[1]]
    second = [ds[0], ds[1]]
    assert reads == [0, 1, 1]  # item 0 is kept; item 1 would pass the cap, so it is read again
    assert second[0] is first[0] and torch.equal(second[1]["hidden"], first[1]["hidden"])
    uncached = FeatureDataset(store, np.array([0, 1]), max_length=None)
    uncached[0], uncached[0]
    assert reads[3:] == [0, 0]


def test_collate_right_pads():
    store = _FakeStore([[1, 1, 1, 1], [0, 1]])
    ds = FeatureDataset(store, np.array([0, 1]), max_length=None)
    b = collate([ds[0], ds[1]])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert b["loss_mask"].tolist() == [[True] * 4, [False, True, False, False]]
    assert b["lengths"].tolist() == [4, 2] and b["hidden"].shape == (2, 4, 2, 4)
    assert b["topk_probs"][1, 2:].abs().sum() == 0 and b["final_hidden"] is None
    assert b["index"].tolist() == [0, 1] and b["sample_id"].tolist() == [100, 101]


def test_anchors_depend_on_the_sample_not_on_its_batch_mates():
    store = _FakeStore([[1] * 30, [1] * 12, [0] * 5 + [1] * 20])
    ds = FeatureDataset(store, np.arange(3), max_length=None)
    together, keep = batch_anchors(collate([ds[0], ds[1], ds[2]]), 6, seed=1, step=4)
    for k in range(3):
        alone, keep_alone = batch_anchors(collate([ds[k]]), 6, seed=1, step=4)
        assert torch.equal(together[k][keep[k]], alone[0][keep_alone[0]])
    again, _ = batch_anchors(collate([ds[0]]), 6, seed=1, step=5)
    assert not torch.equal(again[0], together[0])  # a new step draws new anchors


# -- metrics --------------------------------------------------------------------------------------
def test_metrics_sink_rows_and_resume_truncation(tmp_path):
    sink = MetricsSink(tmp_path, enabled=True)
    for step in (1, 2, 3):
        sink.log(step, {"loss": 1.0 / step, "lr": 0.1})
    resumed = MetricsSink(tmp_path, enabled=True, resume_step=2)  # the run died after saving step 2
    resumed.log(3, {"loss": 0.25})
    rows = read_tsv(tmp_path / "metrics" / "train.tsv")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 0.25 and math.isnan(rows[2]["ce"])
    assert list(rows[0]) == list(COLUMNS)
    resumed.finish({"loss": 0.25})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": 0.25}
    other = tmp_path / "rank1"
    MetricsSink(other, enabled=False).log(1, {"loss": 1.0})
    assert not other.exists()


def test_resume_keeps_the_rows_of_a_run_logged_before_a_column_was_added(tmp_path):
    """A run checkpointed before train.tsv had `data_wait` resumes with its rows kept (nan there)."""
    tsv = tmp_path / "metrics" / "train.tsv"
    tsv.parent.mkdir()
    old = COLUMNS[: COLUMNS.index("data_wait")]
    rows = [[str(step), *["0.5"] * (len(old) - 1)] for step in (1, 2, 3)]
    tsv.write_text("\n".join("\t".join(r) for r in [list(old), *rows]) + "\n")
    MetricsSink(tmp_path, enabled=True, resume_step=2).log(3, {"loss": 0.25, "data_wait": 0.01})
    got = read_tsv(tsv)
    assert [r["step"] for r in got] == [1, 2, 3] and list(got[0]) == list(COLUMNS)
    assert got[1]["loss"] == 0.5 and math.isnan(got[1]["data_wait"]) and got[2]["data_wait"] == 0.01
    tsv.write_text("step\tsomething_else\n1\t2\n")  # not a prefix of the columns: starts afresh
    MetricsSink(tmp_path, enabled=True, resume_step=2)
    assert read_tsv(tsv) == []


def _sums(**values) -> LossSums:
    """LossSums of block size 2 with the given entries (scalars or [2] lists), zeros elsewhere."""
    sums = LossSums.zeros(2)
    for k, v in values.items():
        setattr(sums, k, torch.tensor(v, dtype=torch.float64))
    return sums


def test_pool_step_metrics_pools_the_sums_of_its_micro_batches():
    cfg = LossConfig.from_train(TrainConfig())
    m1 = _sums(
        ce=1.0, l1=0.5, bce=0.1, weight=1.0, correct=[0.0, 0.0], tokens=[1.0, 0.0], tau=2.0, blocks=1.0
    )
    m2 = _sums(
        ce=12.0, l1=0.6, bce=1.2, weight=3.0, correct=[2.0, 1.0], tokens=[2.0, 1.0], tau=3.0, blocks=3.0
    )
    out = pool_step_metrics([(2.0, m1), (4.0, m2)], tokens=50, cfg=cfg, device=torch.device("cpu"))
    assert out["loss"] == pytest.approx(3.0) and out["ce"] == pytest.approx(13 / 4)
    assert out["acc"] == pytest.approx(0.75) and out["tau_probabilistic"] == pytest.approx(1.25)
    slots = pool_sums([m1, m2], 2, torch.device("cpu"))[0].metrics(cfg, per_slot=True)
    assert slots["acc_slot0"] == pytest.approx(2 / 3) and slots["acc_slot1"] == pytest.approx(1.0)
    assert "acc_slot0" not in out  # the step's log keeps to block-level numbers
    assert out["tokens"] == 50 and out["supervised_tokens"] == 4
    # the α-weighted loss of the pooled means is derived with the metrics (validation logs it)
    assert pool_sums([m1, m2], 2, torch.device("cpu"))[0].metrics(cfg)["loss"] == pytest.approx(
        0.1 * 13 / 4 + 0.9 * 1.1 / 4 + 1.0 * 1.3 / 4
    )


def test_pooled_metrics_derive_the_confidence_excess_and_skill_from_pooled_terms():
    m1 = _sums(bce=0.5, conf_target=0.2, conf_floor=0.4, weight=1.0)
    m2 = _sums(bce=0.9, conf_target=1.2, conf_floor=0.6, weight=3.0)
    pooled, totals = pool_sums([m1, m2], 2, torch.device("cpu"), totals=(7.0, 2.5))
    assert totals == [7.0, 2.5]  # a world of one: summed over nothing
    out = pooled.metrics(LossConfig.from_train(TrainConfig()))
    assert out["conf"] == pytest.approx(0.35) and out["conf_floor"] == pytest.approx(0.25)
    assert out["conf_excess"] == pytest.approx(0.10)
    assert out["conf_skill"] == pytest.approx(confidence_skill(0.10, 0.35, 0.25))
    empty, _ = pool_sums([], 2, torch.device("cpu"))  # a rank with no held-out sample
    assert math.isnan(empty.metrics(LossConfig.from_train(TrainConfig()))["ce"])


def test_validation_split_is_seeded_disjoint_and_refuses_to_take_everything():
    usable = np.array([3, 4, 7, 9, 10, 15, 16, 20])
    train, val = split_validation(usable, 3, seed=5)
    assert len(val) == 3 and len(train) == 5
    assert sorted(np.concatenate([train, val]).tolist()) == usable.tolist()  # disjoint, nothing lost
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again_train, again_val = split_validation(usable, 3, seed=5)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)
    assert not all(np.array_equal(split_validation(usable, 3, seed=s)[1], val) for s in range(6, 12))
    assert np.array_equal(split_validation(usable, 0, seed=5)[0], usable)
    with pytest.raises(ValidationSplitError, match="val_samples=8 would hold out every one of the 8"):
        split_validation(usable, 8, seed=5)


# -- checkpoints / launcher env -------------------------------------------------------------------
def test_latest_checkpoint_skips_incomplete(tmp_path):
    root = checkpoint.checkpoints_dir(tmp_path)
    for step, complete in ((5, True), (10, True), (15, False)):  # 15: killed while saving
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.META_FILE).write_text(json.dumps({"step": step}))
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000010"
    assert checkpoint.read_meta(checkpoint.latest_checkpoint(tmp_path)) == {"step": 10}
    with pytest.raises(checkpoint.CheckpointError, match="no meta.json"):
        checkpoint.read_meta(root / "step-00000015")
    assert checkpoint.latest_checkpoint(tmp_path / "nothing") is None


def test_partial_launcher_env_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    for var in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(dist.LauncherEnvError, match="partial: RANK set but WORLD_SIZE, MASTER_ADDR"):
        dist._read_launcher_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    with pytest.raises(dist.LauncherEnvError, match="RANK=1 is outside WORLD_SIZE=1"):
        dist._read_launcher_env()


def test_loader_with_worker_processes_yields_the_same_batches(tmp_path):
    """CUDA runs read in DataLoader workers (the store is pickled, then reopened per worker)."""
    from synthetic_store import make_store
    from torch.utils.data import DataLoader

    from dspark_offline.store import open_store

    store = open_store(str(make_store(tmp_path / "s.zarr", num_samples=6)))
    ds = FeatureDataset(store, np.arange(6), max_length=20)

    def batches(workers):
        sampler = ResumableSampler(6, micro_batch_size=2, grad_accum=1, world_size=1, rank=0, seed=0)
        it = iter(DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=workers))
        return [next(it) for _ in range(4)]  # crosses into the second epoch

    for a, b in zip(batches(0), batches(1), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["hidden"], b["hidden"])
        assert torch.equal(a["topk_probs"], b["topk_probs"]) and torch.equal(
            a["store_index"], b["store_index"]
        )
