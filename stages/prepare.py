"""DVC stage `prepare`: params.yaml [target, prepare] -> prepared token ids + loss masks."""

from dspark_offline.config import load_params
from dspark_offline.data.prepare import run
from dspark_offline.entry import setup_process_env

if __name__ == "__main__":
    setup_process_env()
    run(load_params("params.yaml"))
