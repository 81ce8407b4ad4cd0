"""On-policy data (`dspark-offline generate`): the target answers the training prompts itself.

Modules: `decode` (batched KV-cached decoding that drops finished rows), `stops` (EOS, end-of-turn
and extra stop tokens), `chunks` (resume state beside the output), `report` (skips, stop reasons,
lengths), `runner` (the stage; its docstring states the first-turn rule).
"""

from dspark_offline.generate.runner import run

__all__ = ["run"]
