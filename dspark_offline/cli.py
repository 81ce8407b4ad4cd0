"""The `dspark-offline` command line.

Each command builds a `Params` (params file + `--set section.field=value` overrides + its own
options) and makes one library call, the stage's `run(params)`, imported by name inside the command
(after `_setup_process`, and so that `--help` is instant). Every stage is therefore also a plain
library call: `dspark_offline.{prepare,generate,dump,evaluate}.run(params)`,
`dspark_offline.train.loop.run(params)` and `dspark_offline.train.export.run(params)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from dspark_offline.config import Params, describe_validation_error, load_params
from dspark_offline.errors import UserError
from dspark_offline.params_file import parse_yaml_value

app = typer.Typer(
    help="Train DSpark speculative-decoding drafters offline: "
    "prepare -> generate -> dump -> train -> export -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--params",
        "-p",
        help="Params file(s); repeat to layer them, later ones win "
        "(default: ./params.yaml when present, else built-in defaults).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter: section.field=value (YAML value). Repeatable."),
]


class CliError(UserError):
    """A user error reported as one line and exit code 2."""


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets or []:
        key, eq, raw = item.partition("=")
        if not eq or "." not in key:
            raise CliError(f"--set {item!r}: expected section.field=value, e.g. train.learning_rate=3e-4")
        out[key.strip()] = parse_yaml_value(raw, f"--set {key.strip()}")
    return out


def build_params(params_files: list[Path] | None, sets: list[str] | None, **options: Any) -> Params:
    """params file(s) -> `--set` overrides -> command options (those not None), validated once."""
    if not params_files and Path("params.yaml").exists():
        params_files = [Path("params.yaml")]
    overrides = _parse_sets(sets)
    overrides.update({k: v for k, v in options.items() if v is not None})
    try:
        return load_params(params_files, overrides)
    except ValidationError as e:
        names = ", ".join(map(str, params_files or [])) or "defaults"
        raise CliError(f"invalid parameters ({names}): {describe_validation_error(e)}") from e
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e


def _setup_process() -> None:
    """Process settings every stage needs before its heavy imports (transformers, torch): call it
    first, then import the stage's `run`."""
    from dspark_offline.entry import setup_process_env

    setup_process_env()


@app.command()
def prepare(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    source: Annotated[str | None, typer.Option(help="Conversations file or 'embedded:sharegpt'.")] = None,
    output: Annotated[str | None, typer.Option(help="Prepared-data directory.")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Training samples to keep.")] = None,
) -> None:
    """Render conversations with the target's chat template into token ids + loss mask."""
    p = build_params(
        params,
        set_,
        **{"prepare.source": source, "prepare.output": output, "prepare.num_samples": num_samples},
    )
    _setup_process()
    from dspark_offline.prepare import run

    run(p)


@app.command()
def generate(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    output: Annotated[str | None, typer.Option(help="Directory of the generated training data.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer tokens per prompt at most.")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="0 = greedy; > 0 samples with generate.seed.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts decoded together.")] = None,
) -> None:
    """On-policy data: the target answers the first turn of every training prompt (resumable).

    Writes the prepared-data format to generate.output; the eval split is copied unchanged.
    With generate.enabled false it writes only a marker and dump reads prepare.output.
    """
    p = build_params(
        params,
        set_,
        **{
            "generate.output": output,
            "generate.max_new_tokens": max_new_tokens,
            "generate.temperature": temperature,
            "generate.batch_size": batch_size,
        },
    )
    _setup_process()
    from dspark_offline.generate import run

    run(p)


@app.command()
def dump(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    store: Annotated[str | None, typer.Option(help="Feature store path or fsspec URL.")] = None,
    num_parts: Annotated[
        int | None,
        typer.Option(help="Total parts (default: one per launcher process, 1 without a launcher)."),
    ] = None,
    part_index: Annotated[
        int | None,
        typer.Option(help="The part this worker writes (default: its launcher rank's parts, else all)."),
    ] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite", help="Replace a mismatching store.")
    ] = None,
) -> None:
    """Run the target once over the training data (generate.output when generate.enabled, else
    prepare.output) and write the Zarr feature store (resumable). Under torchrun, the deepspeed
    launcher or srun, each process writes its rank's parts on its local GPU."""
    p = build_params(
        params,
        set_,
        **{
            "dump.store": store,
            "dump.num_parts": num_parts,
            "dump.part_index": part_index,
            "dump.overwrite": overwrite,
        },
    )
    _setup_process()
    from dspark_offline.dump import run

    run(p)


@app.command()
def train(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    store: Annotated[str | None, typer.Option(help="Feature store to train from.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run directory.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Continue from the latest checkpoint.")
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite",
            help="Start afresh in an output dir that holds checkpoints, deleting them (refused without it).",
        ),
    ] = None,
    allow_param_change: Annotated[
        bool | None,
        typer.Option(
            "--allow-param-change",
            help="With --resume: accept training params (learning rate, "
            "schedule, batch, ...) that differ from the checkpoint's (refused without it).",
        ),
    ] = None,
    allow_partial_store: Annotated[
        bool | None,
        typer.Option(
            "--allow-partial-store",
            help="Train on the complete parts of a store whose other parts "
            "are missing or unfinished (refused without it).",
        ),
    ] = None,
) -> None:
    """Train the drafter from the store with DeepSpeed ZeRO-2 (also under torchrun / deepspeed)."""
    p = build_params(
        params,
        set_,
        **{
            "dump.store": store,
            "train.output_dir": output_dir,
            "train.max_steps": max_steps,
            "train.resume": resume,
            "train.overwrite": overwrite,
            "train.allow_param_change": allow_param_change,
            "train.allow_partial_store": allow_partial_store,
        },
    )
    _setup_process()
    from dspark_offline.train.loop import run

    run(p)


@app.command()
def export(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint dir (default: latest).")] = None,
    output: Annotated[str | None, typer.Option(help="Serving directory to write.")] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite", help="Replace the files of a non-empty output directory (refused without it)."
        ),
    ] = None,
) -> None:
    """Write the serving directory (config.json + model.safetensors) SGLang's DSpark loader reads."""
    p = build_params(
        params,
        set_,
        **{"export.checkpoint": checkpoint, "export.output": output, "export.overwrite": overwrite},
    )
    _setup_process()
    from dspark_offline.train.export import run

    run(p)


@app.command()
def evaluate(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    drafter: Annotated[str | None, typer.Option(help="Exported drafter directory.")] = None,
    compare: Annotated[
        str | None,
        typer.Option(help="A second exported drafter decoded on the same prompts (paired τ ratio)."),
    ] = None,
    num_prompts: Annotated[int | None, typer.Option(help="Held-out prompts to decode.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
) -> None:
    """Speculative decoding with the target + drafter, beside prompt lookup (no training): τ with
    95 % bootstrap intervals, per-slot rates, losslessness, ms/token."""
    p = build_params(
        params,
        set_,
        **{
            "evaluate.drafter": drafter,
            "evaluate.compare": compare,
            "evaluate.num_prompts": num_prompts,
            "evaluate.temperature": temperature,
        },
    )
    _setup_process()
    from dspark_offline.evaluate import run

    result = run(p)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def inspect(store: Annotated[str, typer.Argument(help="Feature store path or URL.")]) -> None:
    """Print the store manifest and per-part counts (samples, tokens, bytes/token, completeness).
    A store failing the quick integrity check (`verify --quick`) ends with an error line, exit 2."""
    from dspark_offline.store.inspect import check_inspected, format_inspect
    from dspark_offline.store.inspect import inspect as inspect_store

    info = inspect_store(store)
    typer.echo(format_inspect(info))
    check_inspected(info)


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Feature store path or URL.")],
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Manifest, shapes and the presence of every shard/chunk object and shard "
            "index only, no data decoded (what `train` checks before step 0).",
        ),
    ] = False,
) -> None:
    """Read every shard and chunk back (target head and sample index included); report missing or
    corrupt objects, shape/manifest inconsistencies and incomplete parts (non-zero exit)."""
    from dspark_offline.store.inspect import verify as verify_store

    problems = verify_store(store, quick=quick)
    for problem in problems:
        typer.echo(f"PROBLEM: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{store}: OK")


@app.command("params")
def show_params(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print the effective parameters (file + overrides + defaults) as YAML."""
    p = build_params(params, set_)
    typer.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))


def main() -> None:
    """Console entry point: user and environment errors (ours, invalid parameters, a missing file
    or optional package, a full disk or read-only directory) become one line and exit code 2; a
    bug keeps its traceback. Set DSPARK_OFFLINE_DEBUG=1 for the traceback of every error."""
    from dspark_offline.entry import report_errors

    report_errors(app)


if __name__ == "__main__":
    main()
