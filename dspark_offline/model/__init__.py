"""The DSpark drafter, its objective and its serving format (single device; no deepspeed/zarr).

```python
cfg = DraftModelConfig.from_manifest(manifest, params.draft)
model = DSparkDraft(cfg); model.set_target_head(embed_tokens, lm_head)   # frozen
anchors, keep = sample_anchors(loss_mask, lengths, num_anchors, generator)
loss, metrics = dspark_loss(model, batch, anchors, keep, params.train, dp_group=None)
save_serving(model, out_dir); model = load_serving(out_dir, embed_tokens, lm_head)
```
"""

from .anchors import sample_anchors
from .attention_mask import block_attention_mask
from .config import DraftConfigError, DraftModelConfig, resolve_mask_token_id
from .draft import DraftBlock, DraftOutput, DSparkDraft
from .loss import LossConfig, dspark_loss
from .serving import ServingFormatError, load_serving, save_serving

__all__ = [
    "DSparkDraft",
    "DraftBlock",
    "DraftConfigError",
    "DraftModelConfig",
    "DraftOutput",
    "LossConfig",
    "ServingFormatError",
    "block_attention_mask",
    "dspark_loss",
    "load_serving",
    "resolve_mask_token_id",
    "sample_anchors",
    "save_serving",
]
