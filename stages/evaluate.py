"""DVC stage `evaluate`: params.yaml [target, evaluate] + exported drafter + held-out prompts
-> speculative-decoding metrics beside the prompt-lookup baseline (JSON), per-slot acceptance and
per-prompt counts (TSV plots)."""

from dspark_offline.entry import stage_main
from dspark_offline.evaluate import run

if __name__ == "__main__":
    stage_main(run)
