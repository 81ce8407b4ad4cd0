"""The DSpark drafter, its objective and its serving format (single device; no deepspeed/zarr).

```python
cfg = DraftModelConfig.from_manifest(manifest, params.draft)
model = DSparkDraft(cfg); model.set_target_head(embed_tokens, lm_head)   # frozen
anchors, keep = sample_anchors(loss_mask, lengths, num_anchors, generator)
loss_cfg = LossConfig.from_train(params.train)
out = model(batch["input_ids"], batch["hidden"], anchors, keep)                  # DraftOutput (.hidden)
# training defers the block states: model(..., defer_blocks=True); dspark_loss computes them in chunks
targets = block_targets(batch, anchors, keep, cfg.block_size, loss_cfg.gamma, loss_cfg.l1_mode)
sums = dspark_loss(model, out, targets, loss_cfg)   # local LossSums (train/ normalises them)
metrics = sums.metrics(loss_cfg)                    # every metric, from (pooled) sums
save_serving(model, out_dir); model = load_serving(out_dir, embed_tokens, lm_head)
```
"""

from .anchors import sample_anchors
from .attention_mask import block_attention_mask
from .config import DraftConfigError, DraftModelConfig, resolve_mask_token_id
from .draft import DraftBlock, DraftOutput, DSparkDraft
from .loss import LossConfig, dspark_loss
from .metrics import LossSums
from .serving import ServingFormatError, load_serving, save_serving
from .targets import BlockTargets, block_targets

__all__ = [
    "BlockTargets",
    "DSparkDraft",
    "DraftBlock",
    "DraftConfigError",
    "DraftModelConfig",
    "DraftOutput",
    "LossConfig",
    "LossSums",
    "ServingFormatError",
    "block_attention_mask",
    "block_targets",
    "dspark_loss",
    "load_serving",
    "resolve_mask_token_id",
    "sample_anchors",
    "save_serving",
]
