"""DVC stage `train`: params.yaml [draft, train, export] + feature store -> checkpoints,
training metrics/plots and the exported serving directory.

Single process here; for several GPUs run `dspark-offline train` under torchrun/deepspeed.

DVC knows the store only by its completion record (`<dump.store>.complete.json`, a dependency of
this stage; DVC never hashes the store's bytes), so this stage first checks that the store is
still the one recorded, and refuses one changed or deleted behind DVC's back (store/record.py).

DVC owns this stage's outputs and re-runs it because a parameter or the store changed, so a run
without `train.resume` starts afresh over old checkpoints (`train.overwrite`) and the export
replaces the previous serving directory (`export.overwrite`); the CLI refuses both unless told.
"""

from dspark_offline.entry import stage_main
from dspark_offline.store.record import check_record
from dspark_offline.train import export, loop


def main(params) -> None:
    # DVC tracks the store by its completion record, not its bytes: make sure the store is still it
    check_record(params.dump.store)
    params.train.overwrite = params.train.overwrite or not params.train.resume
    params.export.overwrite = True
    loop.run(params)
    export.run(params)


if __name__ == "__main__":
    stage_main(main)
