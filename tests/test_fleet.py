"""Mixed fleets: fleet files, cost predictions, who is asked to train, resource-aware rounds."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from tests.support import FCFG, STRONG, WEAK, book_for
from tests.conftest import CFG
from trainer.device.config import LocalConfig
from trainer.protocol.fleet import CostBook, Fleet, FleetError, Tier
from trainer.protocol.fleet import COSTS
from trainer.transports.inprocess import Federation
from trainer.prepare import open_run

def test_fleet_file_errors_name_what_is_wrong(tmp_path):
    ok = {"deadline_s": 3, "tiers": [STRONG, WEAK]}
    assert Fleet.from_dict(ok).tiers[1] == Tier("weak", 0.5, 2.0, 0.5)
    for bad, words in (
        ({**ok, "tiers": [STRONG, {**WEAK, "share": 0.4}]}, "sum to 0.9"),
        ({**ok, "deadlines": 3}, "unknown keys \\['deadlines'\\]"),
        ({**ok, "tiers": [STRONG, {**WEAK, "ram": 3}]}, "tier 1: unknown keys \\['ram'\\]"),
        ({**ok, "tiers": [STRONG, {**WEAK, "memory_mb": -1}]}, "'weak': memory_mb and speed must be positive"),
        ({**ok, "tiers": [STRONG, {**WEAK, "speed": "fast"}]}, "speed must be a finite number"),
        ({**ok, "tiers": [STRONG, {k: v for k, v in WEAK.items() if k != "memory_mb"}]}, "missing \\['memory_mb'\\]"),
        ({**ok, "tiers": [STRONG, {**WEAK, "name": "strong"}]}, "names repeat"),
        ({**ok, "deadline_s": -1}, "deadline_s must be a non-negative"),
        ({**ok, "tiers": []}, "non-empty list"),
    ):
        with pytest.raises(FleetError, match=words):
            Fleet.from_dict(bad)
    (tmp_path / "f.json").write_text("{not json")
    with pytest.raises(FleetError, match="not valid JSON"):
        Fleet.load(tmp_path / "f.json")
    with pytest.raises(FleetError, match="no such fleet file"):
        Fleet.load(tmp_path / "missing.json")


def test_tiers_are_placed_by_share_and_seed_alone():
    fleet = Fleet.from_dict({"tiers": [{**STRONG, "share": 0.75}, {**WEAK, "share": 0.25}]})
    a = fleet.assign(20, seed=3)
    assert a.count(1) == 5 and a.count(0) == 15
    assert a == fleet.assign(20, seed=3) and a != fleet.assign(20, seed=4)
    thirds = Fleet.from_dict({"tiers": [{**STRONG, "share": 1 / 3, "name": n} for n in "abc"]})
    assert sorted(thirds.assign(10, 0).count(i) for i in range(3)) == [3, 3, 4]


def test_prediction_falls_back_to_micro_batch_one_and_honours_the_deadline():
    from trainer.device.config import NetConfig
    net = NetConfig((1, 28, 28), 3, 4).resolved()
    book = CostBook()
    book.add(net, LocalConfig(), {"mem_mb": 6.0, "mem_mb_mb1": 1.5, "ms_per_sample": 0.1, "ms_per_sample_mb1": 0.4})
    roomy, tight, tiny = Tier("a", 1, 8, 1.0), Tier("b", 1, 2, 0.5), Tier("c", 1, 1, 1.0)
    p = book.predict(net, LocalConfig(epochs=2), 1000, roomy, 0)
    assert p.fits and p.micro_batch == 0 and p.seconds == pytest.approx(0.2) and p.mem_mb == 6.0
    p = book.predict(net, LocalConfig(), 1000, tight, 0)
    assert p.fits and p.micro_batch == 1 and p.seconds == pytest.approx(0.8)
    p = book.predict(net, LocalConfig(), 1000, tight, 0.5)
    assert not p.fits and "deadline" in p.reason
    p = book.predict(net, LocalConfig(), 1000, tiny, 0)
    assert not p.fits and "1.5 MB at micro-batch 1 > 1 MB" in p.reason
    assert book.max_epochs(net, LocalConfig(epochs=9), 1000, tight, 2.0) == 2
    assert CostBook.load_dict(book.to_dict()).get(net, LocalConfig()) == book.get(net, LocalConfig())


def _run(tmp_path, name, cfg, book=None, kind="hmoe"):
    cfg, prep = open_run(tmp_path / name, cfg, resume=False, kinds=(kind,), seed_book=book)
    fed = Federation(tmp_path / name, kind, cfg, prep)
    fed.run(progress=False)
    return fed


@pytest.mark.parametrize("assignment", ["one", "resource-aware"])
def test_a_fleet_of_strong_devices_trains_exactly_as_no_fleet(tmp_path, assignment):
    cfg = replace(FCFG, assignment=assignment)
    plain = _run(tmp_path, "plain", cfg)
    strong = _run(tmp_path, "strong", replace(cfg, fleet={"tiers": [{**STRONG, "share": 1.0}]}), book_for(cfg))
    assert [e["task"] for e in plain.state["log"]] == [e["task"] for e in strong.state["log"]]
    for key in plain.tasks:
        for name, arr in plain.weights[key].items():
            np.testing.assert_array_equal(arr, strong.weights[key][name], err_msg=f"{key}/{name}")
    assert all(not e["unfit"] for e in strong.state["log"])


def test_a_client_is_never_asked_for_a_task_its_tier_cannot_afford(tmp_path):
    cfg = replace(FCFG, assignment="resource-aware", hmoe_rounds=10,
                  fleet={"deadline_s": 0.5, "tiers": [STRONG, WEAK]})
    book = book_for(cfg)
    fed = _run(tmp_path, "run", cfg, book)
    tiers = fed.fleet.client_tier
    log = fed.state["log"]
    # the premise: the root does not fit a weak device (memory), some smaller expert does
    weak = [c for c in range(cfg.clients) if tiers[c] == 1]
    assert not any(fed.can_take(c, "root") for c in weak)
    assert any(fed.can_take(c, k) for c in weak for k in fed.tasks)
    asked = [(int(c), k, e) for e in log for c, k in e["assigned"].items()]
    assert any(tiers[c] == 1 for c, _, _ in asked), "weak devices should train something"
    for c, key, e in asked:   # every round asked of anyone fits that client's tier, with the epochs it was given
        local = LocalConfig.from_dict(e["client_config"][str(c)])
        assert fed.predict(c, key, local).fits, (c, key, local)
    # in rounds that trained the root, weak clients trained other experts: several experts per round
    assert any(len(e["tasks"]) > 1 for e in log)
    report_keys = json.loads((tmp_path / "run" / COSTS).read_text())["entries"]
    assert len(report_keys) == len({t.net.to_json() for t in fed.tasks.values()})


def test_resource_aware_run_resumes_exactly(tmp_path):
    cfg = replace(FCFG, assignment="resource-aware", fleet={"deadline_s": 0.5, "tiers": [STRONG, WEAK]})
    book = book_for(cfg)
    whole = _run(tmp_path, "whole", cfg, book)
    cfg2, prep = open_run(tmp_path / "part", cfg, resume=False, kinds=("hmoe",), seed_book=book)
    Federation(tmp_path / "part", "hmoe", cfg2, prep).run(3, progress=False)
    cfg2, prep = open_run(tmp_path / "part", cfg, resume=True, kinds=("hmoe",))
    resumed = Federation(tmp_path / "part", "hmoe", cfg2, prep)
    resumed.run(progress=False)
    assert [e["assigned"] for e in resumed.state["log"]] == [e["assigned"] for e in whole.state["log"]]
    for key in whole.tasks:
        for name, arr in whole.weights[key].items():
            np.testing.assert_array_equal(arr, resumed.weights[key][name])


def test_a_fleet_that_cannot_train_is_refused_before_the_run_is_written(tmp_path):
    book = book_for(FCFG)
    tiny = {**WEAK, "memory_mb": 0.001}
    with pytest.raises(FleetError, match="tier 'weak' \\(0.001 MB\\) fits no task of this run: the smallest, "):
        open_run(tmp_path / "a", replace(FCFG, fleet={"tiers": [STRONG, tiny]}), False, kinds=("hmoe",),
                 seed_book=book)
    assert not (tmp_path / "a").exists()
    with pytest.raises(FleetError, match="no client can meet the round deadline of 1e-06 s"):
        open_run(tmp_path / "b", replace(FCFG, fleet={"deadline_s": 1e-6, "tiers": [STRONG, WEAK]}), False,
                 kinds=("hmoe",), seed_book=book)
    assert not (tmp_path / "b").exists()
    # the flat baseline's weak devices never train: a warning, and they are never asked
    cfg = replace(FCFG, flat_rounds=4, flat_width=16, fleet={"tiers": [STRONG, WEAK]})
    fed = _run(tmp_path, "flat", cfg, book_for(cfg, ("flat",)), kind="flat")
    assert all(fed.fleet.client_tier[int(c)] == 0 for e in fed.state["log"] for c in e["assigned"])
    assert sum(len(e["unfit"]) for e in fed.state["log"]) > 0


def test_cli_measures_costs_and_reports_the_fleet(tmp_path):
    """Real measurement (fresh processes) of the flat model, prediction and report, through the CLI."""
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps({"deadline_s": 0, "tiers": [{**STRONG, "share": 0.75}, {**WEAK, "share": 0.25,
                                                                                        "memory_mb": 0.0001}]}))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "exporter.cli", "train", "--model", "flat", "--out", str(run), "--fleet", str(fleet),
            "--dataset", CFG.dataset, "--clients", "4", "--clients-per-round", "4", "--flat-rounds", "2",
            "--flat-width", "4", "--batch-size", "16", "--cost-clients", "0", "--no-progress"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "warning: tier 'weak' (0.0001 MB) fits no task of this run" in out.stderr
    report = json.loads((run / "report.json").read_text())
    f = report["fleet"]
    assert f["client_tiers"].count("weak") == 1
    entry = f["costs"]["entries"][0]
    assert entry["mem_mb"] > 0 and entry["ms_per_sample"] > 0 and entry["measured"]["micro_batch_1"]["micro_batch"] == 1
    assert f["predictions"]["flat"]["weak"]["flat"]["fits"] is False
    assert f["families"]["flat"]["trained_client_rounds_per_tier"]["weak"] == 0
    assert f["families"]["flat"]["unfit_client_rounds"] == 2
    assert 0 < f["families"]["flat"]["data_used"] < 1
    assert "not asked (unfit)" in out.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tiers": [{**STRONG, "share": 0.6}]}))
    out = subprocess.run(args[:7] + [str(tmp_path / "run2"), "--fleet", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "tier shares sum to 0.6" in out.stderr and "Traceback" not in out.stderr


def test_resource_aware_assignment_follows_the_schedule_and_keeps_cohorts():
    from hierarchy import load_taxonomy
    from trainer.protocol.strategy import Strategy, make_tasks
    tree = load_taxonomy("fashion-mnist")
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 4)
    ra = Strategy(tree, tasks, "round-robin", 0, assignment="resource-aware", min_clients=2)
    one = Strategy(tree, tasks, "round-robin", 0)
    assert ra.order(1) == ["Clothes", "Goods", "Tops", "Shoes", "root"]
    every = set(tasks)
    offers = {0: every, 1: every, 2: {"Goods", "Tops"}, 3: {"Goods", "Shoes"}, 4: {"Shoes"}, 5: set()}
    assert one.assign(1, offers) == {0: "Clothes", 1: "Clothes"}
    # 2 and 3 form a cohort on Goods; 4 alone on Shoes finds no cohort and sits out
    assert ra.assign(1, offers) == {0: "Clothes", 1: "Clothes", 2: "Goods", 3: "Goods"}
    # a lone client on its first choice moves on to a choice it shares with another
    offers = {0: every, 2: {"Goods", "Tops"}, 3: {"Tops"}}
    assert ra.assign(1, offers) == {0: "Clothes", 2: "Tops", 3: "Tops"}
    # the round's own task trains even with one client, as with one task a round
    assert ra.assign(1, {0: every}) == one.assign(1, {0: every}) == {0: "Clothes"}
    # every client able to take the round's task: the same plan as one task a round
    assert ra.assign(3, {c: every for c in range(5)}) == one.assign(3, {c: every for c in range(5)})


def test_the_coordinator_plans_a_resource_aware_fleet_round_as_the_simulation_does(tmp_path):
    """Several experts in one round on the coordinator: once every device has reported its
    samples, each gets the task, hyper-parameters and seed the simulation's plan gives its
    client (the weak tier its affordable expert), or the same excusal."""
    from trainer.transports.coordinator.service import Coordinator
    cfg = replace(FCFG, assignment="resource-aware", min_cohort=1, clients_per_round=8,
                  fleet={"deadline_s": 0, "tiers": [STRONG, WEAK]})
    cfg, prep = open_run(tmp_path / "run", cfg, resume=False, kinds=("hmoe",), seed_book=book_for(cfg, ("hmoe",)))
    fed = Federation(tmp_path / "run", "hmoe", cfg, prep)
    plan = fed.driver.plan(0, simulate_dropout=False)
    assert len(set(plan.assigned.values())) > 1, "the fleet should make round 0 train several experts"
    coord = Coordinator(tmp_path / "run", tmp_path / "c.db", "s" * 32)
    try:
        devices = [coord.enroll("s" * 32)["device_id"] for _ in prep.parts]
        counts = [np.bincount(prep.data.train_y[p], minlength=fed.tree.num_leaves).tolist() for p in prep.parts]
        waits = [coord.assignment(d, c)["wait"] for d, c in zip(devices, counts)]
        assert all(waits[:-1]) and not waits[-1]   # planned once all eight have reported their samples
        answers = [coord.assignment(d) for d in devices]
        for c, a in enumerate(answers):
            if c in plan.assigned:
                assert (a["expert"], a["seed"]) == (plan.assigned[c], plan.seeds[c])
                assert a["hyperparameters"] == plan.configs[c].to_dict() and a["excused"] is None
            else:
                assert a["samples"] == 0 and a["excused"] == plan.excusal(c)
        assert coord.status()["assigned"] == {str(c): k for c, k in plan.assigned.items()}
    finally:
        coord.close()


def test_mixed_fleet_benchmark_runs_end_to_end(tmp_path):
    """The benchmark at toy scale, on real Fashion-MNIST, with the committed cost file."""
    from pathlib import Path

    from tests.support import fashion_available
    if not fashion_available():
        pytest.skip("Fashion-MNIST files not installed (make setup installs them)")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mf"
    args = [sys.executable, str(root / "benchmarks" / "mixed_fleet.py"), "--out", str(out), "--alphas", "0.5",
            "--weak-shares", "0", "0.5", "--models", "hmoe", "flat-large", "--rounds", "2", "--train-limit", "2000",
            "--test-limit", "300", "--jobs", "2", "--costs", str(root / "docs/results/mixed_fleet/costs.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["weak_share"]): r for r in result["rows"]}
    assert set(rows) == {("hmoe", 0.0), ("hmoe", 0.5), ("flat-large", 0.0), ("flat-large", 0.5)}
    # weak devices cannot afford flat-large's round: at 50% weak it uses less data and asks fewer clients
    assert rows[("flat-large", 0.5)]["client_rounds_per_tier"]["weak"] == 0
    assert rows[("flat-large", 0.5)]["data_used"] < rows[("flat-large", 0.0)]["data_used"]
    assert rows[("hmoe", 0.5)]["client_rounds_per_tier"]["weak"] > 0
    assert (out / "f1_vs_weak_share.png").stat().st_size > 10_000 and "| 0.5 | 50% | hmoe |" in (out / "results.md").read_text()


def test_spread_assignment_gives_each_expert_a_cohort_in_the_schedules_order():
    """'spread' (issue 27): a round trains several experts, min_clients clients each, in the
    schedule's order; a client trains one expert; leftovers join a cohort they can take."""
    from hierarchy import load_taxonomy
    from trainer.protocol.strategy import Strategy, make_tasks
    tree = load_taxonomy("fashion-mnist")
    tasks = make_tasks(tree, "hmoe", (1, 28, 28), 4)
    sp = Strategy(tree, tasks, "round-robin", 0, assignment="spread", min_clients=2)
    every = set(tasks)
    # round 1 of 7 clients in cohorts of 2: the schedule's order from step 1 x 3 cohorts
    assert sp.order(3) == ["Tops", "Shoes", "root", "Clothes", "Goods"]
    plan = sp.assign(1, {c: every for c in range(7)})
    assert plan == {0: "Tops", 1: "Tops", 2: "Shoes", 3: "Shoes", 4: "root", 5: "root", 6: "Tops"}
    # a task too few clients can take is passed over; a client that can take nothing sits out
    offers = {0: every, 1: {"Goods"}, 2: {"Tops"}, 3: {"Tops", "root"}, 4: set()}   # order from step 2
    assert sp.assign(1, offers) == {0: "Goods", 1: "Goods", 2: "Tops", 3: "Tops"}
    # every round's plan covers the experts in turn, so all of them train within a few rounds
    trained = {k for rnd in range(3) for k in sp.assign(rnd, {c: every for c in range(4)}).values()}
    assert trained == every
    # clients in proportion to the data: the root (all samples) earns a cohort of 3 of 10 and
    # trains every round; the rest take turns, 2 clients each
    shares = {"root": 1.0, "Clothes": 0.6, "Goods": 0.4, "Tops": 0.3, "Shoes": 0.3}
    sp = Strategy(tree, tasks, "round-robin", 0, assignment="spread", min_clients=2, shares=shares)
    plan = sp.assign(0, {c: every for c in range(10)})
    assert plan == {0: "root", 1: "root", 2: "root", 3: "Clothes", 4: "Clothes", 5: "Goods", 6: "Goods",
                    7: "Tops", 8: "Tops", 9: "root"}
    assert sorted(set(sp.assign(1, {c: every for c in range(10)}).values())) == ["Clothes", "Goods", "Shoes", "root"]
