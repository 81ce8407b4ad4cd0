"""Stage 2: train the DSpark drafter from a feature store with DeepSpeed, and export it.

- `loop.run(params)` — the training story (store check, batch math, engine, resume, loop, save);
- `export.run(params)` — latest (or chosen) checkpoint -> serving directory;
- helpers, one concept per module: `dist` (process group / launchers), `preflight` (refusals before
  step 0, the store check included), `ds_config` (batch math + DeepSpeed config), `selection`
  (which samples), `dataset` (Dataset + collate), `sampler` (resumable data order), `anchors`
  (per-batch anchors), `seeds`, `schedule` (warmup + cosine), `checkpoint` (DeepSpeed state +
  meta.json), `metrics` (rank-0 sink).

Nothing is imported here: `import dspark_offline.train` stays cheap and never pulls in DeepSpeed.
"""
