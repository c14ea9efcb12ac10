"""mkdocs hooks: the pages that are read off the code are generated at build time, so they cannot drift from it.

- ``<!-- generated: cli -->``: ``sdebatch --help`` and the help of every subcommand, from the real parser;
- ``<!-- generated: rules-example -->``: ``sdebatch rules`` for an AdamW tuned at batch 256;
- ``<!-- generated: mdm-config -->``: the keys of :class:`sdebatch.mdm.config.TrainConfig` (name, type, default,
  the field's docstring);
- the figures of ``paper_figures/measured/`` are served as ``figures/NAME``, and ``CHANGELOG.md`` as
  ``changelog.md``;
- Sphinx roles left in docstrings (``:class:`X```) are shown as code.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "paper_figures" / "measured"

# every command of the CLI, as typed after `sdebatch`
CLI_COMMANDS = [[], ["rules"], ["sweep"], ["sweep", "run"], ["sweep", "collect"], ["report"], ["data"],
                ["data", "prepare"], ["train"], ["eval"], ["sample"]]
RULES_EXAMPLE = ["rules", "--optimizer", "adamw", "--lr", "3e-4", "--betas", "0.9", "0.95", "--weight-decay", "0.1",
                 "--logical", "256", "--batch", "32", "256", "1024", "--ema", "0.999"]


def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    generators = {"cli": cli_reference, "rules-example": rules_example, "mdm-config": mdm_config_table}
    for name, make in generators.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def on_page_content(html, page, config, files):
    return re.sub(r":(?:class|func|meth|mod|data|attr|obj):(<code>)", r"\1", html)


def run_cli(argv: list[str]) -> str:
    """What ``sdebatch ARGV`` prints (help exits through SystemExit), at a fixed width."""
    from sdebatch.cli import main

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out):
            try:
                main(argv)
            except SystemExit:
                pass
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip()


def cli_reference() -> str:
    parts = []
    for command in CLI_COMMANDS:
        title = " ".join(["sdebatch", *command])
        parts.append(f"## `{title}`\n\n```text\n$ {title} --help\n{run_cli([*command, '--help'])}\n```\n")
    return "\n".join(parts)


def rules_example() -> str:
    return f"```text\n$ sdebatch {' '.join(RULES_EXAMPLE)}\n{run_cli(RULES_EXAMPLE)}\n```\n"


def field_docstrings(path: Path, cls: str) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after ``name: type = default``)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    docs, body = {}, node.body
    for field, after in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[field.target.id] = after.value.value
    return docs


def cell(text: str) -> str:
    text = re.sub(r":(?:class|func|meth|mod|data|attr|obj):`([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("|", "\\|")


def mdm_config_table() -> str:
    from sdebatch.mdm import config

    hints = typing.get_type_hints(config.TrainConfig)
    docs = field_docstrings(Path(config.__file__), "TrainConfig")
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(config.TrainConfig):
        if f.name not in docs:
            raise ValueError(f"TrainConfig.{f.name} has no docstring: every config key is documented")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind = hints[f.name].__name__ if isinstance(hints[f.name], type) else str(hints[f.name])
        rows.append(f"| `{f.name}` | {cell(kind)} | `{cell(repr(default))}` | {cell(docs[f.name])} |")
    return "\n".join(rows) + "\n"
