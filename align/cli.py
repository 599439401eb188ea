"""The ``align`` command line: one sub-command per module, dispatched lazily.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Recipe errors
(:class:`align.config.RecipeError`) and data errors (:class:`align.errors.AlignError`) print one readable
line and exit 2; ``--debug`` shows the traceback instead. ``align --version`` prints the package version;
every command that takes a recipe also takes ``--print-config``: the resolved recipe (``extends:`` and
overrides applied, defaults filled in) as YAML, and no work.

Run ``align --help`` for the list.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from align.errors import AlignError

# command -> (module, one-line help). "data" has sub-commands of its own.
COMMANDS: dict[str, tuple[str, str]] = {
    "zoo": ("align.zoo", "build the tiny offline model zoo (checkpoints/zoo)"),
    "assemble": ("align.assemble", "vision encoder + projector + LLM -> a standard Llava folder"),
    "inspect": ("align.inspect", "describe a model folder: components, params, image tokens, template"),
    "plan": ("align.plan", "parameters and per-GPU memory of a recipe, on the meta device"),
    "projector": ("align.stages.projector", "stage 1: train the projector on captions"),
    "sft": ("align.stages.sft", "stage 2: supervised fine-tuning (long chain-of-thought)"),
    "grpo": ("align.stages.grpo", "stage 3: GRPO with rule-based rewards"),
    "export": ("align.export", "write a self-contained Hugging Face Llava folder"),
    "eval": ("align.evaluate", "generate on a data source and score with the reward functions"),
    "chat": ("align.chat", "chat with a model folder, streaming reasoning and answer"),
    "plot": ("align.plot", "PNG charts of a run's metrics"),
    "run": ("align.pipeline", "run a pipeline recipe: assemble -> projector -> sft -> grpo -> export"),
}
# commands whose `recipe` argument is a recipe of this kind (`align data check` reads any stage recipe)
RECIPE_KINDS = {
    "assemble": "assemble",
    "plan": "assemble",
    "projector": "projector",
    "sft": "sft",
    "grpo": "grpo",
    "run": "pipeline",
    "distill": "distill",
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("align.data.check", "validate every row of a recipe's data sources"),
    "synth": ("align.data.synth", "generate the built-in verifiable visual tasks"),
    "distill": ("align.data.distill", "make long-CoT SFT rows with a teacher model, keep verified ones"),
    "seeds": ("align.data.seeds", "write rows in each public system's layout (recipes/seeds/tiny's data)"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_text: str, load: bool) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    # SUPPRESS: an absent sub-command flag must not overwrite `align --debug CMD`
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(_module=module)
    if load:  # import only the chosen command's module: `align --help` stays fast
        importlib.import_module(module).add_arguments(parser)
        if name in RECIPE_KINDS:
            parser.add_argument(
                "--print-config",
                action="store_true",
                help="print the resolved recipe (overrides applied, defaults filled in) as YAML and exit",
            )


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the sub-command named in ``argv`` gets its full arguments."""
    words = [a for a in argv if not a.startswith("-")]
    from align import __version__

    parser = argparse.ArgumentParser(prog="align", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, load=words[:1] == [name])
    data = sub.add_parser("data", help="data tools: check, synth, distill, seeds")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, (module, help_text) in DATA_COMMANDS.items():
        _add(data_sub, name, module, help_text, load=words[:2] == ["data", name])
    return parser


def main(argv: list[str] | None = None) -> int:
    from align.config import RecipeError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow flags (`align sft r.yaml --resume lr=1e-4`); argparse stops at the flag.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "print_config", False):
            return print_config(args)
        return int(importlib.import_module(args._module).run(args) or 0)
    except (RecipeError, AlignError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def print_config(args) -> int:
    """The command's recipe, resolved and validated as the command would read it, as YAML on stdout."""
    import yaml

    from align.config import load_any, to_dict

    command = args.data_command if args.command == "data" else args.command
    recipe = load_any(args.recipe, args.overrides, expect=RECIPE_KINDS[command])
    print(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True), end="")
    return 0


def entry() -> None:
    """The ``align`` console command: :func:`main`, with a Ctrl-C outside a training loop (which stops at a step
    boundary by itself) ending in one line instead of a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(
            "interrupted: stopped at once; a stage's --resume continues from its last checkpoint",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    entry()
