"""Every `d3tune ...` command shown in README.md and docs/ parses with today's argument parser,
and every spec file such a command names exists: documentation that cannot drift silently."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_commands(text: str) -> list[str]:
    """`d3tune ...` lines inside fenced code blocks (synopsis lines with [options] skipped),
    comments cut, `a && b` chains split."""
    out, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            continue
        line = line.split(" #", 1)[0].strip().removeprefix("$ ")
        for part in line.split("&&"):
            part = part.strip().strip("'\"").strip()
            if part.startswith("d3tune ") and "[" not in part and "<" not in part:
                out.append(part)
    return out


COMMANDS = [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES
            for cmd in fenced_commands(page.read_text())]


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 15
    assert {c.split()[1] for _, c in COMMANDS} >= {"run", "sweep", "ablate", "robust",
                                                   "leaderboard", "report", "defaults"}


@pytest.mark.parametrize("page,cmd", COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_documented_command_parses_and_names_existing_specs(page, cmd):
    from d3tune.cli import build_parser

    argv = shlex.split(cmd)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's exit on a bad command line
        pytest.fail(f"{page}: `{cmd}` does not parse (exit {exc.code})")
    for arg in argv:
        if re.match(r"^(search_spaces|ablations|docs/results)/.+\.ya?ml$", arg):
            assert (ROOT / arg).is_file(), f"{page}: `{cmd}` names {arg}, which does not exist"


@pytest.mark.parametrize("page,kind", [("docs/robust.md", "robust"),
                                       ("docs/leaderboard.md", "leaderboard")])
def test_the_example_spec_on_each_page_loads(page, kind):
    from d3tune.specs.leaderboard_spec import leaderboard_plan
    from d3tune.specs.robust_spec import robust_plan
    from d3tune.yamlio import parse_yaml

    text = (ROOT / page).read_text().split("## The spec", 1)[1]
    example = text.split("```yaml", 1)[1].split("```", 1)[0]
    load = robust_plan if kind == "robust" else leaderboard_plan
    load(parse_yaml(example, page), page)  # a UsageError here names the field that drifted


def test_the_folder_and_record_examples_load(tmp_path, monkeypatch):
    """The worked examples of populations on a dataset folder and on BackdoorBench records
    load as written, with the records (and the data where they say) in the working folder."""
    from test_backdoorbench import make_record
    from test_real_datasets import write_cifar

    from d3tune.specs.leaderboard_spec import leaderboard_plan
    from d3tune.specs.robust_spec import robust_plan
    from d3tune.yamlio import parse_yaml

    monkeypatch.chdir(tmp_path)
    for name in ("badnet_0_1", "blended_0_1"):
        make_record(tmp_path / "record" / name)
    write_cifar(tmp_path / "data" / "cifar10")
    section = (ROOT / "docs/robust.md").read_text().split(
        "## Populations on dataset folders and BackdoorBench records", 1)[1].split("\n## ", 1)[0]
    examples = [b.split("```", 1)[0] for b in section.split("```yaml")[1:]]
    assert len(examples) == 2
    specs = [robust_plan(parse_yaml(e, "robust.md"), "robust.md") for e in examples]
    assert specs[0].members[0].fields["data.data_dir"] == str(tmp_path / "data" / "cifar10")
    assert {m.fields["data.data_dir"] for m in specs[1].members} == {
        str(tmp_path / "data" / "cifar10")}  # found where the records say
    board = (ROOT / "docs/leaderboard.md").read_text().split("name: leaderboard_bb", 1)[1]
    spec = leaderboard_plan(parse_yaml("name: leaderboard_bb" + board.split("```", 1)[0],
                                       "leaderboard.md"), "leaderboard.md", {None: "elsewhere"})
    assert spec.defenses == ("d3", "ft")
    assert {m.fields["data.data_dir"] for m in spec.searches[0].members} == {
        str(tmp_path / "elsewhere")}


@pytest.mark.parametrize("page", LINKED_PAGES := [*PAGES, ROOT / "CONTRIBUTING.md",
                                                   ROOT / "benchmarks" / "README.md",
                                                   *sorted((ROOT / "docs" / "results").rglob("*.md"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = [t for t in re.findall(r"\]\(([^)#\s]+)", page.read_text())
              if not t.startswith(("http://", "https://", "mailto:"))
              and not (page.parent / t).exists()]
    assert not broken, f"{page.name}: links to missing files {broken}"


def heading_anchors(markdown: str) -> set[str]:
    """Both slugs a heading may get: GitHub's (each space a hyphen) and MkDocs' (runs of
    spaces and hyphens collapsed), so a link works on either site."""
    out, fence = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"^#{1,6} ", line):
            text = re.sub(r"[^\w\s-]", "", line.lstrip("#").strip().replace("`", "")).lower()
            out |= {text.replace(" ", "-"), re.sub(r"[-\s]+", "-", text).strip("-")}
    return out


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_to_headings_find_them(page):
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = page if not target else page.parent / target
        if path.suffix == ".md" and path.is_file() and anchor not in heading_anchors(
                path.read_text()):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: links to missing headings {broken}"


def test_the_heading_check_can_fail():
    anchors = heading_anchors("# Top\n## Three seeds: D3 vs FT-SAM\n```\n# not a heading\n```")
    assert "three-seeds-d3-vs-ft-sam" in anchors and "not-a-heading" not in anchors


# Words and paths a reader outside the team cannot place. "its own session of processes" is
# POSIX's process session (cluster.md), not ours.
INSIDER = re.compile(r"\bthe issue\b|\b[Ii]ssue \d+|\bsessions?\b|device call|timeout_s")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|tmp/pytest)/")


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                                  *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pages_use_no_insider_words_or_machine_paths(page):
    bad = []
    for i, line in enumerate(page.read_text().splitlines(), 1):
        clean = line.replace("its own session of processes", "")
        bad += [f"{i}: {m.group(0)!r}" for rx in (INSIDER, MACHINE_PATH)
                for m in rx.finditer(clean)]
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def test_the_insider_check_can_fail():
    assert INSIDER.search("as issue 17 asked") and INSIDER.search("to fit the session")
    assert MACHINE_PATH.search("in /work/runs/x") and not MACHINE_PATH.search("d3tune/work/x")


def test_every_shipped_spec_is_named_on_a_page():
    """A spec in search_spaces/ or ablations/ that no page names is one a user cannot find."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    specs = sorted(p.relative_to(ROOT).as_posix() for folder in ("search_spaces", "ablations")
                   for p in (ROOT / folder).glob("*.yaml"))
    unnamed = [s for s in specs if s not in text]
    assert specs and not unnamed, f"shipped specs no page names: {unnamed}"


def test_readme_names_every_attack_and_defense_with_its_paper():
    """A registered method missing from the README's table is one a reader cannot cite."""
    from d3tune.attacks import ATTACKS
    from d3tune.defenses import DEFENSES

    section = (ROOT / "README.md").read_text().split("## Attacks and defenses", 1)[1].split(
        "\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+) \|$", section, flags=re.M))
    builtin = {name for reg in (ATTACKS, DEFENSES) for name in reg  # plugins document themselves
               if (reg[name].make if reg is ATTACKS else reg[name].run).__module__.startswith(
                   "d3tune.")}
    missing = sorted(builtin - set(rows))
    assert not missing, f"README's attack/defense table lacks {missing}"
    assert all(len(paper) > 20 for paper in rows.values())


@pytest.mark.slow
def test_the_site_renders_its_tables_and_images(tmp_path):
    """The built site opened in headless Chromium: tables became tables and every image
    decoded (docs/results/site/site_check.py; its screenshots are committed beside it)."""
    import shutil
    import subprocess
    import sys

    mkdocs = shutil.which("mkdocs") or str(ROOT / ".venv-docs" / "bin" / "mkdocs")
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    if not Path(mkdocs).exists():
        pytest.skip("mkdocs is not installed (.ci/run puts it in .venv-docs)")
    done = subprocess.run([sys.executable, str(ROOT / "docs/results/site/site_check.py"),
                           str(tmp_path), "--mkdocs", mkdocs], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" ok") == 2
    assert (tmp_path / "home.png").stat().st_size > 10_000
    assert (tmp_path / "leaderboard.png").stat().st_size > 10_000
