"""Speculative decoding evaluation (DESIGN.md §5): `run(params) -> metrics dict`.

Modules: `verify` (greedy / rejection-sampling acceptance, pure), `target` (KV-cached target
session, plain decode), `proposal` (drafter interface, confidence early stop), `drafter`
(exported DSpark drafter adapter), `prompt_lookup` (the no-training baseline), `speculative` (the
decoding loop), `lossless`, `prompts`, `bootstrap` (intervals over prompts, pure), `report`
(metrics and DVC files), `runner` (the stage).
"""

from dspark_offline.evaluate.runner import run

__all__ = ["run"]
