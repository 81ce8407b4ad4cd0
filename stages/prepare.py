"""DVC stage `prepare`: params.yaml [target, prepare] -> prepared token ids + loss masks."""

from dspark_offline.entry import stage_main
from dspark_offline.prepare import run

if __name__ == "__main__":
    stage_main(run)
