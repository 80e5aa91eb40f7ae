"""Batched members (d3tune/batched.py): M members trained as one computation must end where each
would have ended alone — weights *and* BatchNorm running statistics, after a few steps — for
every defense with a batched form, and a robust search with ``member_batch`` must give the same
member figures as one without."""
from __future__ import annotations

import copy

import pytest
import torch

from d3tune.batched import fit_batched, stack
from d3tune.defenses import DEFENSES, DefenseConfig, DefenseContext
from d3tune.defenses.d3 import Params as D3Params
from d3tune.models import ModelSpec, build_model
from d3tune.train import Augment, make_sgd

SPEC = ModelSpec(num_classes=10, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,))
ATOL = 1e-4  # a grouped convolution sums in another order: float tolerance, not bit identity


def members(m: int = 3, n: int = 72):
    models, xs, ys = [], [], []
    for i in range(m):
        torch.manual_seed(100 + i)
        models.append(build_model("cnn", SPEC))
        g = torch.Generator().manual_seed(200 + i)
        xs.append(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g))
        ys.append(torch.randint(0, 10, (n,), generator=g))
    return models, xs, ys


def contexts(m: int) -> list[DefenseContext]:
    return [DefenseContext(num_classes=10, head="linear", aug=Augment(pad=1),
                           generator=torch.Generator().manual_seed(300 + i),
                           device=torch.device("cpu"), on_epoch=lambda e, logs: False)
            for i in range(m)]


def assert_same_state(alone: list[torch.nn.Module], together: list[torch.nn.Module]) -> None:
    for a, b in zip(alone, together):
        sa, sb = a.state_dict(), b.state_dict()
        assert any("running_var" in k for k in sa)  # BatchNorm statistics are compared too
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=ATOL, rtol=1e-4), k


CASES = [
    ("ft", None),
    ("d3", D3Params()),
    ("d3", D3Params(p=1.5, init="noise", lmd=4.0, eps=0.2, radius=1.3)),
    ("d3", D3Params(p=1.0, init="far")),
]


@pytest.mark.parametrize("name,params", CASES, ids=["ft", "d3", "d3-p1.5-noise-lmd4", "d3-p1-far"])
def test_batched_members_end_where_each_would_alone(name, params):
    models, xs, ys = members()
    cfg = DefenseConfig(name=name, epochs=2, lr=0.02, batch_size=32, weight_decay=5e-4,
                        params=params)
    alone = [copy.deepcopy(m) for m in models]
    for model, x, y, ctx in zip(alone, xs, ys, contexts(len(models))):
        DEFENSES[name].run(model, x, y, cfg, ctx)
    together = [copy.deepcopy(m) for m in models]
    DEFENSES[name].batched(together, xs, ys, cfg, contexts(len(models)))
    assert_same_state(alone, together)
    moved = sum(float((a.linear.weight - m.linear.weight).detach().abs().max())
                for a, m in zip(alone, models))
    assert moved > 1e-3  # the defense did train (a no-op would pass the comparison)


def test_a_mean_over_members_instead_of_a_sum_would_be_caught():
    """The comparison above is sharp enough to see the classic mistake: averaging the members'
    losses scales every gradient by 1/M."""
    models, xs, ys = members()
    cfg = DefenseConfig(name="ft", epochs=1, lr=0.02, batch_size=32)
    alone = [copy.deepcopy(m) for m in models]
    for model, x, y, ctx in zip(alone, xs, ys, contexts(len(models))):
        DEFENSES["ft"].run(model, x, y, cfg, ctx)
    together = [copy.deepcopy(m) for m in models]
    net = stack(together)
    opt, sched = make_sgd(list(net.params.values()), cfg.lr, cfg.momentum, 0.0, cfg.epochs)

    def mean_loss(logits, y):  # wrong on purpose: each member's loss divided by M
        from d3tune.batched import member_cross_entropy
        loss = member_cross_entropy(logits, y) / len(together)
        return loss, {}

    fit_batched(net, xs, ys, epochs=1, batch_size=32, optimizer=opt, scheduler=sched,
                aug=Augment(pad=1), generators=[c.generator for c in contexts(len(models))],
                loss_fn=mean_loss)
    net.write_back(together)
    with pytest.raises(AssertionError):
        assert_same_state(alone, together)


def test_members_that_cannot_train_in_lockstep_are_refused():
    models, xs, ys = members()
    with pytest.raises(ValueError, match="differ in size"):
        DEFENSES["ft"].batched(models, [xs[0], xs[1], xs[2][:40]], [ys[0], ys[1], ys[2][:40]],
                               DefenseConfig(name="ft", epochs=1, lr=0.01, batch_size=32),
                               contexts(3))
    wide = ModelSpec(num_classes=10, in_channels=3, image_size=8, mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    with pytest.raises(ValueError, match="architecture"):
        stack([models[0], build_model("cnn", wide)])


@pytest.fixture(scope="module")
def search_root(tmp_path_factory):
    """One model cache for the search tests: the backdoored models are trained once."""
    return tmp_path_factory.mktemp("batched_search")


def tiny_search(root):
    from d3tune.specs.robust_spec import robust_plan

    return robust_plan({
        "name": "batched", "defense": "d3",
        "base": {"train": {"epochs": 2}, "defense": {"epochs": 8}},
        "population": {"attacks": ["badnets", "blended", "wanet"], "datasets": ["digits"],
                       "seeds": [0]},
        "space": {"defense.lr": {"loguniform": [0.01, 0.05]}},
        "holdout_seeds": [1], "budget": 1, "cache_dir": str(root / "models"),
        "storage": str(root / "runs")}, "test")


def test_a_robust_search_with_member_batch_gives_the_same_member_figures(search_root):
    """The same setting on the same members, one by one and three at a time: every member's
    final ACC / ASR / DER agrees (evaluation on the full sets, as the search reads them)."""
    from dataclasses import replace

    from d3tune.search.robust_trainable import run_members

    spec = tiny_search(search_root)
    setting = {"defense.lr": 0.02, "defense.batch_size": 32}
    one = run_members(spec, spec.members, setting)
    three = run_members(replace(spec, member_batch=3), spec.members, setting)
    assert [r["member"] for r in one] == [r["member"] for r in three]
    assert {r["member_batch"] for r in three} == {3} and {r["member_batch"] for r in one} == {1}
    for a, b in zip(one, three):
        for k in ("acc_before", "asr_before", "acc_after", "asr_after", "der"):
            assert b[k] == pytest.approx(a[k], abs=0.01), (a["member"], k)


def test_in_float64_batched_and_sequential_d3_end_on_the_same_figures(search_root,
                                                                      monkeypatch):
    """Float32 figures drift apart over hundreds of steps (summation order, amplified), so a
    bug could hide behind "float tolerance". In float64 the rounding is too small to grow:
    every member's final ACC, ASR and DER must agree to 1e-6 — the same draws, the same
    batches, the same per-member statistics."""
    from dataclasses import replace

    import d3tune.trial
    from d3tune.models import Normalize
    from d3tune.search.robust_trainable import run_members

    build = d3tune.trial.model_for
    monkeypatch.setattr(d3tune.trial, "model_for", lambda *a, **k: build(*a, **k).double())

    def to_double(self, x):
        x = x.double().div(255.0) if x.dtype == torch.uint8 else x.double()
        return (x - self.mean.double()) / self.std.double()

    monkeypatch.setattr(Normalize, "forward", to_double)
    spec = tiny_search(search_root)
    setting = {"defense.lr": 0.03, "defense.batch_size": 16, "defense.init": "noise",
               "defense.p": 1.5}
    one = run_members(spec, spec.members, setting)
    three = run_members(replace(spec, member_batch=3), spec.members, setting)
    for a, b in zip(one, three):
        for k in ("acc_after", "asr_after", "der"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), (a["member"], k)


def test_member_batch_is_validated_at_the_edge_and_reaches_every_leaderboard_search(tmp_path,
                                                                                     capsys):
    from d3tune.cli import main
    from d3tune.specs.leaderboard_spec import load_leaderboard

    spec = tmp_path / "lb.yaml"
    body = ("name: lb\npopulation: {attacks: [badnets], datasets: [digits], seeds: [0]}\n"
            "holdout_seeds: [1]\ndefenses: [d3, ft]\nbudget: 1\n")
    spec.write_text(body + "member_batch: 6\n")
    assert {s.member_batch for s in load_leaderboard(spec).searches} == {6}
    spec.write_text(body + "member_batch: 0\n")
    assert main(["leaderboard", str(spec), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "member_batch: expected an integer >= 1, got 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_search_reuses_the_population_before_figures_and_its_members_end_the_same(
        search_root, monkeypatch):
    """Each setting used to evaluate every member's backdoored model again before defending
    it; the population phase measured exactly that already. Reusing it must change no figure
    and save one full evaluation per member."""
    import d3tune.trial
    from d3tune.search.robust_trainable import member_before, population_befores, run_members

    spec = tiny_search(search_root)
    setting = {"defense.lr": 0.02, "defense.batch_size": 32}
    befores = population_befores([member_before(spec, m) for m in spec.members])
    assert set(befores) == {m.id for m in spec.members}
    evaluations = []
    real = d3tune.trial.evaluate
    monkeypatch.setattr(d3tune.trial, "evaluate",
                        lambda *a, **k: evaluations.append(1) or real(*a, **k))
    measured = run_members(spec, spec.members, setting)
    again = len(evaluations)
    reused = run_members(spec, spec.members, setting, befores=befores)
    assert len(evaluations) - again == again - len(spec.members)  # one fewer per member
    for a, b in zip(measured, reused):
        for k in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "der"):
            assert b[k] == a[k], (a["member"], k)  # exactly: the same sets, model and threads


def test_a_members_figures_do_not_depend_on_what_ran_before_it_in_its_task(search_root):
    """Why the holdout may split a candidate's members over several tasks
    (robust_driver.holdout_parts): every member's row is the same, to the last bit, whether it
    runs after the others in one task or alone or in another order."""
    from d3tune.search.robust_trainable import run_members

    spec = tiny_search(search_root)
    setting = {"defense.lr": 0.02, "defense.batch_size": 32}
    together = {r["member"]: r for r in run_members(spec, spec.members, setting)}
    apart = run_members(spec, spec.members[2:], setting)
    apart += run_members(spec, spec.members[:2][::-1], setting)
    assert sorted(r["member"] for r in apart) == sorted(together)
    for r in apart:
        for k in ("acc_before", "asr_before", "acc_after", "asr_after", "der"):
            assert r[k] == together[r["member"]][k], (r["member"], k)
