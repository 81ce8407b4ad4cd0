"""DVC stage `generate`: params.yaml [target, generate, prepare.max_length] + prepared data ->
on-policy training data (the target's own answers) in generate.output.

With generate.enabled false it writes only a marker file there, and dump reads prepare.output.
Finished chunks wait in <generate.output>.partial/ (outside DVC's outputs), so re-running
`dvc repro` after an interruption resumes.
"""

from dspark_offline.entry import stage_main
from dspark_offline.generate import run

if __name__ == "__main__":
    stage_main(run)
