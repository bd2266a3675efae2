import apache_beam as beam
import pytest
from apache_beam.runners.portability import prism_runner
from apache_beam.testing.util import assert_that, equal_to

from pipelines.build import make_runner


def test_direct_runner_never_tries_prism(monkeypatch):
    # Beam's own DirectRunner first runs a batch pipeline on Prism, downloading its binary at run time.
    # (Beam catches any error of that try and falls back, so the try is recorded, not raised.)
    tried = []

    def no_prism(self, *args, **kwargs):
        tried.append(self)
        raise RuntimeError("no Prism here")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    with beam.Pipeline(make_runner("DirectRunner")) as p:
        assert_that(p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 10), equal_to([10, 20, 30]))
    assert tried == []


@pytest.mark.parametrize("name", ["DataflowRunner", "FlinkRunner"])
def test_remote_runners_are_left_to_beam_by_name(name):
    assert make_runner(name) == name
