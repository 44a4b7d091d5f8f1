"""Schema-driven fuzzing of both HTTP services (schemathesis, a bounded number of cases per
operation, against live servers on 127.0.0.1): no 5xx, every status and body as documented."""

import threading

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import CFG
from tests.support import serve_in_thread
from trainer.transports.inprocess import Federation
from trainer.prepare import open_run

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CASES = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
TOKEN = "fuzz-token"
OPERATOR = "operator-token"


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    return serve_in_thread(app)


@pytest.fixture(scope="module")
def edge_api(bundle_dir):
    from edge_runtime.app import create_app
    url, server, thread = serve(create_app(bundle_dir, token=TOKEN, body_timeout=5))
    yield schemathesis.openapi.from_url(url + "/openapi.json")
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def coordinator_api(tmp_path_factory):
    from trainer.transports.coordinator.service import Coordinator
    from trainer.transports.coordinator.http import create_app
    run = tmp_path_factory.mktemp("fuzz") / "run"
    _, prep = open_run(run, CFG, resume=False)
    Federation(run, "hmoe", CFG, prep)
    coord = Coordinator(run, run.parent / "state.sqlite", TOKEN)
    url, server, thread = serve(create_app(coord, operator_token=OPERATOR))
    global DEVICE_TOKEN
    DEVICE_TOKEN = coord.enroll(TOKEN)["token"]
    yield schemathesis.openapi.from_url(url + "/openapi.json", headers={"Authorization": f"Bearer {OPERATOR}"})
    server.should_exit = True
    thread.join(10)
    coord.close()


DEVICE_TOKEN = ""


def fuzz(schema, headers: dict) -> int:
    """Every documented operation, each with a bounded number of generated cases; returns how
    many operations ran (schemathesis's pytest plugin does not run on this pytest)."""
    from hypothesis import given
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        @given(case=operation.as_strategy())
        @CASES
        def check(case) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        check()
    return len(operations)


@pytest.mark.slow
def test_edge_api_as_documented(edge_api):
    assert fuzz(edge_api, {"Authorization": f"Bearer {TOKEN}"}) == 3


@pytest.mark.slow
def test_coordinator_api_as_documented(coordinator_api):
    assert fuzz(coordinator_api, {"Authorization": f"Bearer {DEVICE_TOKEN}"}) == 8   # /status: 403 for a device
