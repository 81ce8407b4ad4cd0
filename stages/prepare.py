"""DVC stage `prepare`: params.yaml [target, prepare] -> prepared token ids + loss masks."""

from dspark_offline.data.prepare import run
from dspark_offline.entry import stage_main

if __name__ == "__main__":
    stage_main(run)
