"""The `specq` command: a click group whose subcommands are imported only when used,
so `specq --help` stays fast (no torch or transformers import)."""

from __future__ import annotations

import importlib

import click

# command name -> "module:click_command"; each module is a thin layer over the library.
COMMANDS = {
    "convert": "specq.cli.cmd_convert:convert",
    "demo": "specq.cli.cmd_demo:demo",
    "eval": "specq.cli.cmd_eval:eval_cmd",
    "bench": "specq.cli.cmd_bench:bench",
    "export": "specq.cli.cmd_export:export",
    "generate": "specq.cli.cmd_generate:generate",
    "inspect": "specq.cli.cmd_inspect:inspect_cmd",
}

HELP = {
    "convert": "Convert a model to a multi-mode specq checkpoint (and push it to the Hub).",
    "demo": "Main job on the embedded default model: convert, evaluate, decode speculatively.",
    "eval": "Perplexity and draft agreement per mode, as a table.",
    "bench": "Tokens/s of every decoding strategy against the baselines, same tokens.",
    "export": "Export a specq checkpoint for other engines (compressed-tensors).",
    "generate": "Generate text with (multi-level) speculative decoding.",
    "inspect": "Show modes, bytes per mode, recipe and layers of a specq checkpoint.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specq")
def main():
    """specq: lossless LLM decoding with quantized self-drafts.

    MODEL arguments take a Hub id, a local directory or a .gguf file; with none, the embedded
    default model (SmolLM2-135M-Instruct) is used.
    """


if __name__ == "__main__":
    main()
