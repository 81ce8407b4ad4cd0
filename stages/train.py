"""DVC stage `train`: params.yaml [draft, train, export] + feature store -> checkpoints,
training metrics/plots and the exported serving directory.

Single process here; for several GPUs run `dspark-offline train` under torchrun/deepspeed.
"""

from dspark_offline.config import load_params
from dspark_offline.entry import setup_process_env
from dspark_offline.train import export, loop

if __name__ == "__main__":
    setup_process_env()
    params = load_params("params.yaml")
    loop.run(params)
    export.run(params)
