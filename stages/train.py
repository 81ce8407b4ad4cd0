"""DVC stage `train`: params.yaml [draft, train, export] + feature store -> checkpoints,
training metrics/plots and the exported serving directory.

Single process here; for several GPUs run `dspark-offline train` under torchrun/deepspeed.

DVC owns this stage's outputs and re-runs it because a parameter or the store changed, so a run
without `train.resume` starts afresh over old checkpoints (`train.overwrite`) and the export
replaces the previous serving directory (`export.overwrite`); the CLI refuses both unless told.
"""

from dspark_offline.entry import stage_main
from dspark_offline.train import export, loop


def main(params) -> None:
    params.train.overwrite = params.train.overwrite or not params.train.resume
    params.export.overwrite = True
    loop.run(params)
    export.run(params)


if __name__ == "__main__":
    stage_main(main)
