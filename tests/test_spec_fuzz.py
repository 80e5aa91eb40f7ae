"""Property-based fuzzing of spec loading: whatever the input, the only error is a one-line UsageError.

Three generators, 200 examples each (fixed seed, so CI sees the same inputs every run):
- near-valid specs from a grammar of the real spec keys, trial sections and their fields,
  registry names, distribution names and dotted paths, with plausible and hostile scalars
  (huge integers, NaN, unicode, line separators), dumped to YAML and then mutated as text
  (YAML punctuation, tabs, anchors and aliases, tags, NUL, random characters);
- the same documents handed to the plan builders as Python objects (no YAML in between);
- random text and random bytes fed to ``parse_yaml``.
Everything that parses goes through ``sweep_plan``, ``ablation_plan`` and the pre-Ray data
folder check (``inputs.check_inputs``). No Ray is started and no file is written.
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d3tune.attacks import ATTACKS, AttackConfig
from d3tune.specs.inputs import check_inputs
from d3tune.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from d3tune.data import DATASETS
from d3tune.defenses import DEFENSES, DefenseConfig
from d3tune.errors import UsageError
from d3tune.models import MODELS
from d3tune.specs.fields import DISTRIBUTIONS
from d3tune.specs.sweep_spec import (ABLATION_KEYS, REPORTED_METRICS, SWEEP_KEYS, ablation_plan,
                                sweep_plan)
from d3tune.yamlio import parse_yaml

EXAMPLES = 200
SOURCE = "fuzz.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _names(cls, registry=None) -> list[str]:
    out = {f.name for f in dataclasses.fields(cls) if f.name != "params"}
    for name in registry or ():
        out.update(f.name for f in dataclasses.fields(registry[name].params))
    return sorted(out)


SECTION_FIELDS = {"data": _names(DataConfig), "attack": _names(AttackConfig, ATTACKS),
                  "defense": _names(DefenseConfig, DEFENSES), "model": _names(ModelConfig),
                  "train": _names(TrainConfig), "eval": _names(EvalConfig)}
PATHS = sorted({f"{s}.{f}" for s, fs in SECTION_FIELDS.items() for f in fs} | {"seed", "device"})
TOP_KEYS = sorted(SWEEP_KEYS | ABLATION_KEYS)
NAMES = sorted(set(ATTACKS) | set(DEFENSES) | set(MODELS) | set(DATASETS) | set(REPORTED_METRICS)
               | {"max", "min", "asha", "none", "cpu", "cuda", "auto", "badnet", "resnet9000",
                  "/nonexistent/dir", ".", ""})
LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]
JUNK = st.text(max_size=10)  # any unicode: NUL, surrogates, line separators, RTL marks
NASTY_KEYS = st.one_of(JUNK, st.sampled_from(LINE_BREAKS).map(lambda b: f"de{b}fense"),
                       st.integers(-3, 3), st.booleans(), st.none(), st.floats())

hostile = st.one_of(st.none(), st.booleans(), st.integers(), st.just(10 ** 400),
                    st.just(-(10 ** 400)), st.floats(), JUNK, st.lists(st.integers(), max_size=2),
                    st.dictionaries(JUNK.filter(str.isprintable), st.integers(), max_size=2))
plausible = st.one_of(st.sampled_from([0, 1, 2, 3, 10, 40, 0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 1.0,
                                       1.5, -0.1, -1]), st.sampled_from(NAMES))
leaf = st.one_of(plausible, plausible, hostile)  # mostly plausible, often hostile


def _mapping(keys, values, max_size=4, junk_keys=NASTY_KEYS):
    """A mapping of real keys, now and then with a junk key mixed in."""
    return st.builds(lambda real, junk: {**real, **junk}, st.dictionaries(keys, values, max_size=max_size),
                     st.dictionaries(junk_keys, values, max_size=1) | st.just({}))


def _specs(junk_keys):
    def m(keys, values, max_size=4):
        return _mapping(keys, values, max_size, junk_keys)

    dist = st.builds(lambda k, a: {k: a}, st.sampled_from([*DISTRIBUTIONS, "normal"]),
                     st.lists(leaf, max_size=3)) | leaf
    section = st.sampled_from(sorted(SECTION_FIELDS)).flatmap(
        lambda s: st.tuples(st.just(s), m(st.sampled_from(SECTION_FIELDS[s]), leaf)))
    base = st.lists(section, max_size=4).map(dict) | hostile
    space = (m(st.sampled_from(PATHS), dist) | section.map(lambda kv: {kv[0]: {
        k: {"uniform": [v, 1]} for k, v in kv[1].items()}}) | hostile)
    axes = (m(st.sampled_from(PATHS), st.lists(leaf, max_size=3) | leaf)
            | st.lists(m(st.sampled_from(PATHS), leaf, 2), max_size=3).map(lambda z: {"zip": z})
            | hostile)
    names = st.lists(st.sampled_from(NAMES) | leaf, max_size=3) | leaf
    metric = st.sampled_from(REPORTED_METRICS) | st.lists(st.sampled_from(REPORTED_METRICS), max_size=3) | leaf
    mode = st.sampled_from(["max", "min"]) | st.lists(st.sampled_from(["max", "min"]), max_size=3) | leaf
    fields = {
        "name": st.sampled_from(["ok", "my-sweep_1", "bad name", ""]) | leaf, "base": base,
        "space": space, "axes": axes, "attacks": names, "datasets": names, "archs": names,
        "seeds": st.lists(leaf, max_size=3) | leaf, "metric": metric, "mode": mode,
        "scheduler": m(st.sampled_from(["name", "grace_period", "reduction_factor", "metric",
                                        "mode"]), leaf) | hostile,
        "resources": m(st.sampled_from(["cpu", "gpu"]), leaf) | hostile,
        "per_defense": m(st.sampled_from(sorted(DEFENSES)), m(st.sampled_from(PATHS), dist)) | hostile,
        **{k: leaf for k in ("num_samples", "search_seed", "max_concurrent", "max_failures",
                             "storage", "experiment", "cache_dir")},
    }
    kinds = {"sweep": sorted(SWEEP_KEYS), "ablation": sorted(ABLATION_KEYS)}
    # A valid skeleton of one kind, then 0-3 top-level fields drawn from the grammar (mostly
    # that kind's keys, sometimes the other kind's or junk): inputs reach every check.
    good_base = st.fixed_dictionaries({}, optional={
        "data": st.fixed_dictionaries({"name": st.sampled_from(["digits", "synthetic"])}),
        "attack": st.fixed_dictionaries({"name": st.sampled_from(sorted(ATTACKS))}),
        "defense": st.fixed_dictionaries({"name": st.just("d3")},
                                         optional={"eps": st.sampled_from([0.0, 0.1])})})
    good_space = st.dictionaries(st.sampled_from(["defense.lr", "defense.eps", "defense.lmd"]),
                                 st.sampled_from([{"loguniform": [0.001, 0.1]}, {"uniform": [0.1, 0.5]}]),
                                 min_size=1, max_size=3)
    good_axes = st.dictionaries(st.sampled_from(["defense.lr", "defense.epochs", "seed"]),
                                st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=2),
                                min_size=1, max_size=2)
    skeletons = {"sweep": st.fixed_dictionaries({"base": good_base, "space": good_space}),
                 "ablation": st.fixed_dictionaries({"base": good_base, "axes": good_axes}, optional={
                     "attacks": st.lists(st.sampled_from(sorted(ATTACKS)), min_size=1, max_size=2),
                     "datasets": st.lists(st.sampled_from(sorted(DATASETS)), min_size=1, max_size=2)})}

    def spec(kind):
        key = st.sampled_from(kinds[kind]) | st.sampled_from(TOP_KEYS) | junk_keys
        extra = st.dictionaries(key, st.just(None), max_size=3).flatmap(
            lambda ks: st.fixed_dictionaries({k: fields.get(k, leaf) for k in ks}))
        return st.builds(lambda sk, ex: {**sk, **ex}, skeletons[kind],
                         st.just({}) | extra)

    return st.sampled_from(sorted(kinds)).flatmap(spec)


specs = _specs(NASTY_KEYS)
printable_specs = _specs(JUNK.filter(str.isprintable))  # what parse_yaml can return
PUNCTUATION = [*"{}[],:-?&*!|>'\"%@`#\t\n ", "&a ", "*a", "<<: *a", "---\n", "...\n", "\x00",
               "!!python/object/apply:os.system ", "!!binary ", "\ufeff", "\u2028", "0x", "1e400"]


def _dump(doc, flow: bool) -> str:
    try:
        return yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    except (yaml.YAMLError, ValueError, UnicodeEncodeError, RecursionError):
        return repr(doc)  # not YAML at all: still must be refused cleanly


@st.composite
def spec_texts(draw) -> str:
    text = _dump(draw(specs), draw(st.booleans()))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 4]))):  # text-level mutations
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "chars"]))
        if action == "insert":
            text = text[:pos] + draw(st.sampled_from(PUNCTUATION)) + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 8)):]
        else:
            text = text[:pos] + draw(st.text(max_size=6)) + text[pos:]
    return text


def _one_line(exc: UsageError) -> None:
    msg = str(exc)
    assert msg and len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg, repr(msg)


def _plans(data) -> None:
    for make in (lambda: sweep_plan(data, SOURCE), lambda: sweep_plan(data, SOURCE, 3),
                 lambda: ablation_plan(data, SOURCE)):
        try:
            check_inputs(make())
        except UsageError as exc:
            _one_line(exc)


def _load_everything(text: str) -> None:
    try:
        data = parse_yaml(text, SOURCE)
    except UsageError as exc:
        _one_line(exc)
        return
    _plans(data)


@FUZZ
@given(spec_texts())
def test_grammar_documents_fail_only_with_one_line_usage_errors(text):
    _load_everything(text)


@FUZZ
@given(printable_specs)
def test_parsed_objects_fail_only_with_one_line_usage_errors(doc):
    """The plan builders get the Python objects directly (what parse_yaml could return)."""
    _plans(doc)


@FUZZ
@given(st.one_of(st.text(max_size=200),
                 st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
                 st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_text_to_parse_yaml_fails_only_with_usage_errors(text):
    _load_everything(text)


def test_valid_specs_still_load():
    """The oracle is not vacuous: good specs load and pass the folder check; a bad one fails."""
    text = ("name: ok\nbase: {defense: {name: d3}}\nspace:\n  defense: {lr: {loguniform: "
            "[0.002, 0.05]}}\n  defense.eps: {uniform: [0.0, 0.5]}\n")
    check_inputs(sweep_plan(parse_yaml(text, SOURCE), SOURCE))
    plan = ablation_plan(parse_yaml("axes: {defense.eps: [0.0, 0.1]}\nattacks: [badnets, blended]\n",
                                    SOURCE), SOURCE)
    check_inputs(plan)
    assert len(plan.cells) == 4
    with pytest.raises(UsageError, match="defense.eps"):
        ablation_plan(parse_yaml("axes: {defense.eps: [-1]}\n", SOURCE), SOURCE)
    with pytest.raises(UsageError, match="line break in key"):
        parse_yaml('"de\\u2028fense": {}\n', SOURCE)
