"""Property-based fuzzing of the OpenAPI spec with schemathesis, in-process over the tiny model:
valid and invalid requests to every operation, and no answer may be a 5xx or disagree with the spec.

The server here allows at most 128 px and 4 steps (`Settings`), so that valid requests at the
schema's own limits (2048 px, 50 steps, 8 images) are answered quickly — with a 400 that the spec
documents — instead of generating for minutes on a CPU."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from turbokit.pipeline import TurboPipeline
from turbokit.serve import Settings
from turbokit.serve.app import create_app
from turbokit.tiny import save_tiny_model

EXAMPLES_PER_OPERATION = 100


def load_tiny_pipeline() -> TurboPipeline:
    with tempfile.TemporaryDirectory() as folder:
        return TurboPipeline.from_pretrained(save_tiny_model(Path(folder) / "sd2"), device="cpu")


# The app loads its model when schemathesis first calls it (the factory form of create_app), not
# when pytest collects this module; the spec is FastAPI's own.
APP = create_app(load_tiny_pipeline, Settings(max_side=128, max_steps=4, timeout=30))
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=EXAMPLES_PER_OPERATION,
)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case: schemathesis.Case) -> None:
    case.call_and_validate(
        app=APP,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ],
    )
