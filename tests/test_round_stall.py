"""No device can keep a round open (issue 37, finding 1): every value an update carries is
parsed when it arrives, and the round's close never fails on what a reply held."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from tests.support import ALL, Server, enrol, make_run
from tests.test_coordinator import assignment, post_update
from trainer.protocol.messages import ClientMetrics, InvalidMetrics

# each header of /update with values a hostile or broken device might send
BAD_HEADERS = {
    "X-Metrics": ['{"loss_after": "x"}', '{"loss_after": null}', '{"seconds": []}', '{"seconds": -1}',
                  '{"seconds": Infinity}', '{"seconds": 1e400}', '{"peak_growth_mb": true}', '{"loss": 1}',
                  'null', '[]', '"x"', '1', '{"loss_after": {"a": 1}}', '{', ''],
    "X-Samples": ["1_0", "+10", "-1", "0", "1e3", "0x10", "", "NaN", "99999999999999999999999"],
    "X-Client-Samples": ["1_0", "0", "x", "", "3"],   # 3: fewer in all than under the expert
    "X-Round": ["1_0", "-1", "x", "", "1.0"],
    "X-Base-Version": ["0_0", "-1", "x", ""],
    "X-Expert": ["", "Hats", "x" * 300],
    "X-Idempotency-Key": ["", "k" * 200],
    "X-Hyperparameters": ["", "null", "[]", "{", '{"lr": "x"}', '{"momentum": 1e6}'],
}


@pytest.mark.parametrize("text", ['{"loss_after": "x"}', '{"loss_after": null}', '{"seconds": []}', '[]',
                                  '{"seconds": -1}', '{"seconds": NaN}', '{"other": 1}', '{"loss_after": true}'])
def test_metrics_that_are_not_numbers_are_refused(text):
    with pytest.raises(InvalidMetrics, match="metric|expected"):
        ClientMetrics.parse(json.loads(text))


def test_metrics_keep_a_diverged_loss_and_read_back_for_the_driver():
    m = ClientMetrics.parse({"loss_before": 2.0, "loss_after": float("nan"), "seconds": 1.5, "peak_growth_mb": 3})
    assert np.isnan(m.loss_after) and m.seconds == 1.5 and m.peak_growth_mb == 3.0
    assert np.isnan(m.result(7)["train_loss"]) and m.result(7)["num_samples"] == 7
    assert ClientMetrics.parse({}).result(2) == {"num_samples": 2, "train_loss": 0.0, "train_seconds": 0.0}
    assert ClientMetrics.parse(json.loads(json.dumps(m.to_dict()))).seconds == 1.5   # NaN survives json


def test_the_driver_leaves_out_a_reply_whose_metrics_are_not_numbers(tmp_path):
    """A transport that hands the driver unparsed metrics (an older store's rows, a Flower client)
    gets that reply left out with its reason, and the round closes."""
    from tests.conftest import CFG
    from trainer.prepare import open_run
    from trainer.transports.inprocess import Federation
    _, prep = open_run(tmp_path / "run", CFG, resume=False)
    fed = Federation(tmp_path / "run", "hmoe", CFG, prep)
    driver = fed.driver
    plan = fed.plan_round(0)
    clients = sorted(plan.assigned)
    results = {c: ({k: v.copy() for k, v in driver.weights[plan.assigned[c]].items()},
                   {"num_samples": 5, "train_loss": "x" if i == 0 else 0.5, "train_seconds": [] if i == 0 else 1.0})
               for i, c in enumerate(clients)}
    _, entry = driver.aggregate(plan, results)
    assert entry["left_out"][str(clients[0])].startswith("malformed metrics")
    assert entry["clients"] == len(clients) - 1


def test_every_fuzzed_update_is_answered_and_the_round_closes_by_its_deadline(tmp_path):
    run = make_run(tmp_path / "run", ALL)
    server = Server(run, tmp_path / "state.sqlite", min_devices=2, round_seconds=8)   # bob stays silent: the deadline closes it
    try:
        url = server.url
        alice, bob = enrol(url), enrol(url)
        assignment(url, alice)
        b = assignment(url, bob)
        a = assignment(url, alice)
        assert a["round"] == b["round"] and a["samples"], a
        w = load(httpx.get(url + f"/weights/{a['expert']}", headers=alice).content)
        w_new = {k: v + 0.001 for k, v in w.items()}
        before = server.status()
        answered = 0
        for header, values in BAD_HEADERS.items():
            for value in values:
                extra = {"X-Samples": 10} if header == "X-Client-Samples" else {}
                r = post_update(url, alice, a, w_new, **extra, **{header: value})
                assert 400 <= r.status_code < 500, (header, value, r.status_code, r.text)
                assert "detail" in r.json(), (header, value, r.text)
                answered += 1
        assert answered == sum(map(len, BAD_HEADERS.values()))
        assert server.status()["updates_received"] == before["updates_received"] == 0
        ok = post_update(url, alice, a, w_new, **{"X-Metrics": json.dumps({"loss_after": 0.4, "seconds": 2.5})})
        assert ok.status_code == 200, ok.text
        deadline = time.monotonic() + 30   # the round's own deadline is 8 s after it was planned
        while (s := server.status())["round"] == a["round"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s["round"] == a["round"] + 1, s
        assert "error" not in (s["last_aggregation"] or {}), s
        assert s["rounds_aggregated"] == 1
    finally:
        server.stop()
