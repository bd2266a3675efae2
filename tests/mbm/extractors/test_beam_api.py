import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_job_driver_imports_neither_torch_nor_scipy():
    # Beam's RunInference module imports its ModelManager, and that torch and scipy, at import time.
    code = ("import sys, jobs.cli, jobs.preprocess, pipelines.build, pipelines.extract, mbm.extractors.handler; "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    assert _run(code) == "[]"


def test_the_model_manager_still_imports_on_demand():
    code = ("import mbm.extractors.beam_api, sys; "
            "from apache_beam.ml.inference.model_manager import ModelManager; "
            "print(ModelManager.__name__, 'torch' in sys.modules)")
    assert _run(code) == "ModelManager True"


def test_an_already_imported_beam_module_is_left_as_it_is():
    code = ("import apache_beam.ml.inference.base as base, mbm.extractors.beam_api as api; "
            "print(api.RunInference is base.RunInference, base.ModelManager is not None)")
    assert _run(code) == "True True"


def test_beam_still_reads_the_memory_a_model_load_took():
    # The failed manager import also left Beam's RunInference without the resource module, so each
    # model load logged "Resource module is not available for current platform".
    code = ("import mbm.extractors.beam_api, logging, io; from apache_beam.ml.inference import base; "
            "s = io.StringIO(); logging.basicConfig(stream=s); "
            "print(base._get_current_process_memory_in_bytes() > 0, repr(s.getvalue()))")
    assert _run(code) == "True ''"
