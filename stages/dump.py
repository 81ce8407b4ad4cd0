"""DVC stage `dump`: params.yaml [target, dump] + prepared data -> Zarr feature store.

The store is a `persist: true` output, so a re-run after an interruption resumes it.
"""

from dspark_offline.config import load_params
from dspark_offline.dump import run
from dspark_offline.entry import setup_process_env

if __name__ == "__main__":
    setup_process_env()
    run(load_params("params.yaml"))
