"""The docs cannot part ways with the code: every command they show works, the reference pages
name every config group, option, key and console-script argument, each ``--help`` is written
for a user, and the README stays a short front page."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from caitlab.compat import parser_arguments, parser_subcommands
from caitlab.resolvers import register_resolvers
from caitlab.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference as ref  # noqa: E402

register_resolvers()
BIN = Path(sys.executable).parent
# pages written by hand (the generated ones are checked through their generator)
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if p.parent.name != "performance")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def shown_commands(markdown: str) -> list[tuple[str, Path]]:
    """The caitlab console-script command lines of a page's ```bash (or sh) blocks, with their
    continuation lines joined and comments dropped, each with the folder it runs in: the
    checkout, or the folder of the checkout a ``cd`` line before it in its block names."""
    found = []
    for lang, body in FENCE.findall(markdown):
        if lang not in ("bash", "sh", "shell"):
            continue
        cwd = ROOT
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            moved = re.match(r"cd (\S+)", line)
            if moved and (ROOT / moved[1]).is_dir():
                cwd = ROOT / moved[1]
            if not re.match(r"(\.venv/bin/)?caitlab-\w+ ", line + " "):
                continue
            try:
                found.append((shlex.join(shlex.split(line, comments=True)), cwd))
            except ValueError:  # unbalanced quotes: shown as is, and its test fails
                found.append((line, cwd))
    return found


def _doc_commands() -> list[tuple[str, str, Path]]:
    """(where it is shown, the command, the folder it runs in) for every page and README."""
    out = []
    for page in [ROOT / "README.md", *PAGES]:
        name = page.relative_to(ROOT).as_posix()
        text = ref.fill_tables(page.read_text())
        out += [(name, cmd, cwd) for cmd, cwd in shown_commands(text)]
    out += [("reference/cli.md", cmd, cwd) for cmd, cwd in shown_commands(ref.cli_page())]
    return out


COMMANDS = _doc_commands()


def filled(command: str) -> str:
    """``command`` with each placeholder the reader fills in (``<signature>``) given a value."""
    return re.sub(r"<[\w .-]+>", "x", command)


def as_composition(words: list[str]) -> list[str]:
    """A ``caitlab-train`` command's arguments as one composition: ``-m`` dropped and each
    sweep (``a,b``, ``range(8)``) replaced by its first value, as its first run composes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for word in words:
        if word in ("-m", "--multirun"):
            continue
        if word.startswith("-") or "=" not in word:
            out.append(word)
            continue
        override = parser.parse_override(word)
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            word = f"{override.get_key_element()}={first}"
        out.append(word)
    return out


def test_the_docs_show_commands_to_check():
    scripts = {cmd.split()[0].rsplit("/", 1)[-1] for _, cmd, _ in COMMANDS}
    assert set(ref.SCRIPTS) <= scripts
    assert len(COMMANDS) >= 40


TRAIN_COMMANDS = [c for c in COMMANDS if "caitlab-train" in c[1].split()[0]]


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, str], list]:
    """Every caitlab-train command shown, composed with --cfg job by one process (each as the
    console script runs it): its exit status and the end of its stderr."""
    todo = [[str(cwd), as_composition(shlex.split(filled(cmd))[1:])]
            for _, cmd, cwd in TRAIN_COMMANDS]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compose_commands.py")],
                          input=json.dumps(todo), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(page, cmd): result for (page, cmd, _), result in
            zip(TRAIN_COMMANDS, json.loads(proc.stdout), strict=True)}


@pytest.mark.parametrize(("page", "command", "cwd"), TRAIN_COMMANDS,
                         ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_every_caitlab_train_command_shown_composes(page, command, cwd, composed):
    status, stderr = composed[(page, command)]
    assert status == 0, f"{page}: {command}\n{stderr}"


@pytest.mark.parametrize(("page", "command", "cwd"),
                         [c for c in COMMANDS if "caitlab-train" not in c[1].split()[0]],
                         ids=lambda v: v if isinstance(v, str) and " " in v else "")
def test_every_other_console_script_command_shown_parses(page, command, cwd, capsys):
    words = shlex.split(filled(command))
    parser = ref.build_parser(words[0].rsplit("/", 1)[-1])
    try:
        parser.parse_args(words[1:])
    except SystemExit as stop:
        pytest.fail(f"{page}: {command}: {capsys.readouterr().err.strip()} ({stop})")


def test_every_config_group_has_a_meaning_in_the_help_page():
    missing = set(ref.groups()) - set(ref.group_meanings())
    assert not missing, f"groups without a line in {ref.HELP_TEMPLATE}: {sorted(missing)}"


def _file_keys(path: Path, package: str) -> set[str]:
    """Every leaf key a config file sets, read by OmegaConf, not by the page's generator."""
    node = OmegaConf.load(path)
    flat: set[str] = set()

    def walk(value, prefix):
        if OmegaConf.is_dict(value) and len(value):
            for key in value:
                if prefix or key != "defaults":
                    walk(value._get_node(key), f"{prefix}.{key}" if prefix else str(key))
        elif prefix:  # an empty file sets nothing
            flat.add(prefix)

    walk(node, "")
    first = path.read_text().splitlines()[0]
    if first.startswith("# @package"):
        package = first.split(None, 2)[2].strip()
    package = "" if package == "_global_" else package
    return {f"{package}.{k}" if package else k for k in flat}


def test_the_config_reference_names_every_group_option_and_key():
    page = ref.config_page()
    missing = []
    for group, files in ref.groups().items():
        if f"{{#{ref.anchor(group)}}}" not in page:
            missing.append(f"group {group}")
        for path in files:
            if f"### `{group}={path.stem}`" not in page:
                missing.append(f"option {group}={path.stem}")
            missing += [f"key {k} ({group}/{path.name})"
                        for k in _file_keys(path, group.replace("/", "."))
                        if f"`{k}`" not in page]
    assert not missing, missing


def test_the_config_reference_names_every_key_of_the_default_config():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo"])
    page = ref.config_page()
    keys = [k for k in _leaves(OmegaConf.to_container(cfg, resolve=False)) if
            f"`{k}`" not in page and not k.startswith("hydra.")]
    assert not keys, keys


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif node != {}:  # an empty group (callbacks=default) sets no key
        yield prefix


def _parsers():
    """(title, parser) of every console script's parser and subcommand parser."""
    todo = [(name, ref.build_parser(name)) for name in ref.PARSERS]
    while todo:
        title, parser = todo.pop(0)
        yield title, parser
        todo += [(f"{title} {sub}", p) for sub, p in parser_subcommands(parser).items()]


def test_the_cli_reference_names_every_argument_of_every_script():
    page = ref.cli_page()
    missing = [f"{title}: {opt}" for title, parser in _parsers()
               for action in parser_arguments(parser)
               for opt in action.option_strings or [action.dest]
               if not isinstance(action.choices, dict) and opt not in page]
    missing += [f"section {t}" for t, _ in _parsers() if f"{{#{ref.anchor(t)}}}" not in page]
    assert not missing, missing


@pytest.mark.parametrize("script", list(ref.PARSERS))
def test_each_console_scripts_help_is_written_for_a_user(script):
    for title, parser in _parsers():
        if title.split()[0] != script:
            continue
        description = parser.description or ""
        assert len(description.split()) >= 8, f"{title}: no description"
        for dev_note in (":mod:", ":func:", "``", "Stdlib", "import"):
            assert dev_note not in description, f"{title}: {dev_note!r} in its description"
        examples = [ln.strip() for ln in (parser.epilog or "").splitlines()
                    if ln.strip().startswith(title.split()[0])]
        assert len(examples) >= 2, f"{title}: fewer than two examples"
        undocumented = [a.dest for a in parser_arguments(parser)
                        if not a.help and not isinstance(a.choices, dict)]
        assert not undocumented, f"{title}: arguments without help: {undocumented}"


def test_caitlab_train_help_is_caitlabs_page():
    page = ref.train_help()
    assert page.startswith("caitlab-train: trains one configuration")
    for group in ref.groups():
        assert re.search(rf"^  {re.escape(group)} ", page, re.M), f"{group} not described"
        listed = group.startswith("hydra/") or re.search(rf"^{re.escape(group)}: ", page, re.M)
        assert listed, f"{group}'s options not listed"
    assert "signature_exclude" not in page  # not the resolved config: that is --cfg job
    assert "site/reference/config.html" in page


def test_the_help_pages_examples_and_common_overrides_compose():
    text = ref.HELP_TEMPLATE.read_text()
    section = text.split("== Common overrides ==")[1].split("==")[0]
    overrides = section.split()
    examples = [ln.split("  ")[0].split()[1:] for ln in
                text.split("== Examples ==")[1].split("$")[0].splitlines()
                if ln.strip().startswith("caitlab-train")]
    assert len(examples) >= 4
    for args in [overrides, *examples]:
        args = [a for a in as_composition(args) if a not in ("--cfg", "job")]
        proc = subprocess.run([str(BIN / "caitlab-train"), *args, "--cfg", "job"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-1000:]}"


DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
HISTORY = re.compile(r"\b(at|commit|before) [0-9a-f]{7,40}\b|no GPU machine was lent", re.I)


def test_the_readme_is_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert not DATE.search(text) and not HISTORY.search(text)
    assert not re.search(r"\b[0-9a-f]{7,40}\b", re.sub(r"`[^`]*`", "", text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT / "docs").as_posix())
def test_a_docs_page_says_what_is_not_when(page):
    text = page.read_text()
    assert not DATE.search(text), DATE.search(text)
    assert not HISTORY.search(text), HISTORY.search(text)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """A short run with the defaults users run (the wandb logger, offline), and its report."""
    out = tmp_path_factory.mktemp("docs_run")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer.max_epochs=2", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            "trainer.enable_progress_bar=false", f"paths.output_dir={out}",
            f"paths.run_dir={out}/sweep/run"])
    from caitlab.analysis.report import main as report
    from caitlab.training.task import train

    assert train(cfg)["status"] == "completed"
    assert report([str(out / "sweep")]) == 0
    return out / "sweep"


def _documented(name: str) -> set[str]:
    text = FENCE.sub("", (ROOT / "docs" / "reference" / name).read_text())
    return set(re.findall(r"`([^`\n]+)`", text))


def test_every_summary_key_of_a_run_is_documented(default_run):
    summary = json.loads((default_run / "run" / "summary.json").read_text())
    missing = sorted(set(summary) - _documented("run-folder.md"))
    assert not missing, f"summary.json keys missing from docs/reference/run-folder.md: {missing}"


def test_every_report_column_is_documented(default_run):
    with open(default_run / "report.csv", newline="") as f:
        columns = set(csv.DictReader(f).fieldnames or [])
    keys = set(json.loads((default_run / "report.json").read_text()))
    missing = sorted((columns | keys) - _documented("run-folder.md"))
    assert not missing, f"report columns missing from docs/reference/run-folder.md: {missing}"
