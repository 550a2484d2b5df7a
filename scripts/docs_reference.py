"""The documentation's reference pages, generated from the code at build time.

A mkdocs hook (``mkdocs.yml``: ``hooks``), so that the reference cannot drift from the code:

- ``reference/config.md``: every config group of ``src/caitlab/conf`` with its one-line
  meaning (the group lines of ``caitlab-train --help``'s template), every option with its
  header comment, and every key with its default and the comment beside or above it;
- ``reference/cli.md``: every console script's description, arguments and examples, read from
  its argument parser (``caitlab-train``'s from its ``--help`` page);
- in a hand-written page, ``<!-- generated: NAME -->`` is replaced by the table ``NAME``
  (``experiments``: the shipped experiments; ``recipes``: the papers' recipes the tests pin).

Run as a script it prints a page: ``.venv/bin/python scripts/docs_reference.py config``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "caitlab" / "conf"
HELP_TEMPLATE = CONF / "hydra" / "help" / "caitlab.yaml"
# console script -> the module whose build_parser() makes its argument parser
PARSERS = {
    "caitlab-report": "caitlab.analysis.report",
    "caitlab-sweep": "caitlab.sweeps.cli",
    "caitlab-bench": "caitlab.analysis.bench",
    "caitlab-attention": "caitlab.analysis.attention_cli",
}
SCRIPTS = ("caitlab-train", *PARSERS)
# Hydra's own settings are no user's axis; its launcher group is
HIDDEN_GROUPS = ("hydra", "hydra/help")
GENERATED_MARK = re.compile(r"<!-- generated: (\w+) -->")


# --- config groups ---------------------------------------------------------------------------

@dataclass
class Key:
    """One key of a config file: its dotted name, its default as written, and its meaning."""

    name: str
    default: str
    meaning: str


@dataclass
class Option:
    """One option of a group (``model/residual=layerscale``): its file's header and keys."""

    group: str
    name: str
    about: str
    keys: list[Key] = field(default_factory=list)


def group_meanings() -> dict[str, str]:
    """Each config group's one-line meaning, as ``caitlab-train --help`` prints it."""
    text = HELP_TEMPLATE.read_text()
    section = text.split("== Config groups ==", 1)[1].split("==", 1)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^ {4}(\S+) {2,}(.+)$", section, re.M)}


def groups() -> dict[str, list[Path]]:
    """Every config group under ``conf/`` with its option files, by group path."""
    found: dict[str, list[Path]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != "." and group not in HIDDEN_GROUPS:
            found.setdefault(group, []).append(path)
    return found


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment), ``#`` inside quotes or ``${..}`` kept."""
    quote, depth = "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def read_option(path: Path, group: str) -> Option:
    """A config file's header comment and keys, each with the comment beside it or in the
    block directly above it; nested keys dotted under the file's package."""
    lines = path.read_text().splitlines()
    package = group.replace("/", ".")
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].lstrip()[1:].strip()
        if text.startswith("@package"):
            package = text.split(None, 1)[1].strip()
        else:
            header.append(text)
        i += 1
    package = "" if package == "_global_" else package
    option = Option(group, path.stem, " ".join(header))
    above: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings around a line
    skip_deeper = -1  # inside a block scalar or the defaults list: deeper lines are its own
    items: dict[str, list[str]] = {}  # a key written as a block list: its items
    listed: Key | None = None  # the last key with nothing after its colon
    for line in lines[i:]:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            above = []
            continue
        if skip_deeper >= 0:
            if indent > skip_deeper or (indent == skip_deeper and stripped.startswith("- ")):
                continue
            skip_deeper = -1
        if stripped.startswith("#"):
            above.append(stripped[1:].strip())
            continue
        if stripped.startswith("- "):
            if listed is not None:
                items.setdefault(listed.name, []).append(_split_comment(stripped[2:])[0])
            above = []
            continue
        match = re.match(r"^(\"[^\"]+\"|'[^']+'|[^\s:#][^:#]*?):(?:\s+(.*))?$", stripped)
        if not match:
            above = []
            continue
        name = match[1].strip("\"'")
        value, comment = _split_comment(match[2] or "")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [name])
        meaning = comment or " ".join(above)
        above = []
        if not stack and name == "defaults":
            skip_deeper = indent
            continue
        key = Key(".".join(filter(None, [package, dotted])), value, meaning)
        option.keys.append(key)
        listed = None
        if value in ("|", "|-", ">", ">-"):
            skip_deeper = indent
        elif not value:
            stack.append((indent, name))
            listed = key
    for key in option.keys:
        if key.name in items:
            key.default = "[" + ", ".join(items[key.name]) + "]"
    # mappings with keys under them are headings of their keys, not keys of their own
    parents = {k.name.rsplit(".", 1)[0] for k in option.keys if "." in k.name}
    option.keys = [k for k in option.keys if k.default or k.name not in parents]
    return option


def _cell(text: str) -> str:
    """``text`` as one table cell: pipes escaped, ``<name>`` shown rather than read as HTML."""
    return (text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")
            .replace(">", "&gt;"))


def _key_table(keys: list[Key]) -> list[str]:
    if not keys:
        return []
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in keys:
        default = f"`{_cell(key.default)}`" if key.default else ""
        rows.append(f"| `{key.name}` | {default} | {_cell(key.meaning)} |")
    return rows + [""]


def anchor(name: str) -> str:
    """A group's (or option's) anchor on the config page: ``model/residual`` -> model-residual."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def _fill_meanings(options: list[Option]) -> None:
    """A key without a comment of its own (an experiment's ``trainer.max_epochs``) takes the
    meaning written where the key is declared (``train.yaml``, a group's option)."""
    known: dict[str, str] = {}
    for option in options:
        for key in option.keys:
            if key.meaning and option.group != "experiment":
                known.setdefault(key.name, key.meaning)
    for option in options:
        for key in option.keys:
            key.meaning = key.meaning or known.get(key.name, "")


def config_page() -> str:
    """``reference/config.md``: the primary config's keys, then every group and option."""
    meanings = group_meanings()
    primary = read_option(CONF / "train.yaml", "")
    by_group = {group: [read_option(p, group) for p in files] for group, files in groups().items()}
    _fill_meanings([primary, *(o for options in by_group.values() for o in options)])
    out = ["# Config groups and options", "",
           "Every config group, option and key `caitlab-train` knows, generated from the",
           "config files when the site is built. A group is switched with one override",
           "(`model/residual=layerscale`), a key set with another (`model.depth=24`);",
           "`caitlab-train --cfg job <overrides>` prints the whole config they compose to.",
           "A default written `${...}` follows another key.", "",
           "## The primary config (`train.yaml`) {#train}", "",
           "Keys every run has, whichever options it chooses.", ""]
    out += _key_table(primary.keys)
    for group, options in by_group.items():
        out += [f"## {group} {{#{anchor(group)}}}", "", meanings.get(group, ""), "",
                "Options: " + ", ".join(f"[`{o.name}`](#{anchor(group + '-' + o.name)})"
                                        for o in options), ""]
        for option in options:
            out += [f"### `{group}={option.name}` {{#{anchor(group + '-' + option.name)}}}", "",
                    _cell(option.about), ""]
            out += _key_table(option.keys)
    return "\n".join(out) + "\n"


# --- console scripts -------------------------------------------------------------------------

def build_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser of a console script other than ``caitlab-train``."""
    return importlib.import_module(PARSERS[script]).build_parser()


@functools.cache  # a process of its own: asked once per build or test session
def train_help() -> str:
    """``caitlab-train --help`` as it prints (Hydra's help template filled in)."""
    return subprocess.run([sys.executable, "-m", "caitlab.train", "--help"], check=True,
                          capture_output=True, text=True, cwd=ROOT).stdout


def _default(action: argparse.Action) -> str:
    if action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
        return ""
    return f"`{action.default}`"


def _parser_section(parser: argparse.ArgumentParser, title: str, level: int) -> list[str]:
    from caitlab.compat import parser_arguments, parser_subcommands

    out = [f"{'#' * level} `{title}` {{#{anchor(title)}}}", "",
           (parser.description or "").strip(), "",
           "```text", parser.format_usage().strip(), "```", ""]
    rows = []
    for action in parser_arguments(parser):
        if isinstance(action.choices, dict) or action.help == argparse.SUPPRESS:
            continue  # the subcommands: each has a section of its own
        name = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        meaning = (action.help or "") % {**vars(action), "prog": parser.prog}
        rows.append(f"| `{_cell(name)}` | {_cell(meaning)} | {_default(action)} |")
    if rows:
        out += ["| argument | meaning | default |", "|---|---|---|", *rows, ""]
    epilog = (parser.epilog or "").strip()
    examples = [ln.strip() for ln in epilog.splitlines() if ln.strip().startswith("caitlab-")]
    if examples:
        out += ["Examples:", "", "```bash", *examples, "```", ""]
    for name, sub in parser_subcommands(parser).items():
        out += _parser_section(sub, f"{title} {name}", level + 1)
    return out


def cli_page() -> str:
    """``reference/cli.md``: every console script's help, from its parser."""
    out = ["# Console scripts", "",
           "Every console script with its arguments, generated from the scripts' own argument",
           "parsers (and `caitlab-train`'s help page) when the site is built. Each prints the",
           "same with `--help`.", "",
           "## `caitlab-train` {#caitlab-train}", "",
           "A Hydra app: its arguments are config overrides, listed with their meanings in",
           "[Config groups and options](config.md). Hydra's own flags: `--cfg job` prints the",
           "composed config and runs nothing, `-m` runs a sweep, `--hydra-help` lists the rest;",
           "`--debug` shows a full traceback instead of the one-line error.", "",
           "```text", train_help().strip(), "```", ""]
    for script in PARSERS:
        out += _parser_section(build_parser(script), script, 2)
    return "\n".join(out) + "\n"


# --- tables inside hand-written pages --------------------------------------------------------

def experiments_table() -> str:
    """The shipped experiments, each with the first sentence of its header comment."""
    rows = ["| experiment | what |", "|---|---|"]
    for path in groups()["experiment"]:
        about = re.split(r"(?<=\.)\s", read_option(path, "experiment").about, maxsplit=1)[0]
        rows.append(f"| [`{path.stem}`](config.md#{anchor('experiment-' + path.stem)}) "
                    f"| {_cell(about)} |")
    return "\n".join(rows)


def recipes_table() -> str:
    """The papers' recipes, from the fixture ``tests/test_recipes.py`` checks them against."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import recipe_table

    return recipe_table.table()


TABLES = {"experiments": experiments_table, "recipes": recipes_table}
PAGES = {"reference/config.md": config_page, "reference/cli.md": cli_page}


def fill_tables(markdown: str) -> str:
    """``markdown`` with each ``<!-- generated: NAME -->`` replaced by its table."""
    return GENERATED_MARK.sub(lambda m: TABLES[m[1]](), markdown)


# --- the mkdocs hook -------------------------------------------------------------------------

def on_files(files, config):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    """Adds the generated pages to the site."""
    from mkdocs.structure.files import File

    for uri, page in PAGES.items():
        files.append(File.generated(config, uri, content=page()))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201
    """Fills the generated tables of a hand-written page."""
    return fill_tables(markdown)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("config", "cli", *TABLES):
        print("usage: docs_reference.py config|cli|experiments|recipes", file=sys.stderr)
        return 2
    page = {"config": config_page, "cli": cli_page, **TABLES}[argv[0]]
    print(page())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
