"""Stage 2: train the DSpark drafter from a feature store with DeepSpeed, and export it.

- `loop.run(params)` — the training story (store check, batch math, engine, resume, loop, save);
- `export.run(params)` — latest (or chosen) checkpoint -> serving directory;
- helpers, one concept per module: `dist` (process group / launchers), `ds_config` (batch math +
  DeepSpeed config), `dataset` (filter, Dataset, collate, resumable sampler, anchors),
  `schedule` (warmup + cosine), `checkpoint` (DeepSpeed state + meta.json), `metrics` (rank-0 sink).

Nothing is imported here: `import dspark_offline.train` stays cheap and never pulls in DeepSpeed.
"""
