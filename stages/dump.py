"""DVC stage `dump`: params.yaml [target, dump] + prepared data -> Zarr feature store.

The store is a `persist: true` output, so a re-run after an interruption resumes it.
"""

from dspark_offline.dump import run
from dspark_offline.entry import stage_main

if __name__ == "__main__":
    stage_main(run)
