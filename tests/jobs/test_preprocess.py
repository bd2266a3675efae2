import contextlib
import io
import logging
import threading

from jobs.preprocess import HeldErrors


@contextlib.contextmanager
def _root_handler():
    """A handler on the root logger, as the CLI sets one up; what it printed, in a StringIO."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, beam = logging.getLogger(), logging.getLogger("apache_beam")
    level = beam.level  # the CLI, run by other tests in this process, quiets Beam below ERROR
    root.addHandler(handler)
    beam.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        beam.setLevel(level)


def _beam_errors_and_a_thread_exception():
    logging.getLogger("apache_beam.runners.worker.data_plane").error("Failed to read inputs in the data plane.")
    logging.getLogger("apache_beam.runners.portability").warning("a Beam warning passes")
    logging.getLogger("mbm.other").error("not Beam's: passes")
    t = threading.Thread(target=lambda: 1 / 0, name="beam_control_read")
    t.start()
    t.join()


def test_beam_errors_are_held_during_the_run_then_printed(capsys):
    with _root_handler() as out:
        held = HeldErrors()
        with held:
            _beam_errors_and_a_thread_exception()
        printed = out.getvalue() + capsys.readouterr().err
        assert "a Beam warning passes" in printed and "not Beam's: passes" in printed
        assert "data plane" not in printed and "ZeroDivisionError" not in printed
        held.release()
        printed = out.getvalue() + capsys.readouterr().err
    assert "ERROR apache_beam.runners.worker.data_plane: Failed to read inputs in the data plane." in printed
    assert "Exception in thread beam_control_read" in printed and "ZeroDivisionError" in printed
    assert threading.excepthook is not held._thread_exception  # restored


def test_held_errors_of_a_failure_told_in_one_line_go_to_the_log(tmp_path, capsys):
    with _root_handler() as out:
        held = HeldErrors()
        with held:
            _beam_errors_and_a_thread_exception()
        log = tmp_path / ".worker.log"
        log.write_text("INFO worker line\n")
        held.divert(str(log))
        held.release()  # nothing left to print
        printed = out.getvalue() + capsys.readouterr().err
    assert "data plane" not in printed and "ZeroDivisionError" not in printed
    text = log.read_text()
    assert text.startswith("INFO worker line\n")
    assert "driver: ERROR apache_beam.runners.worker.data_plane: Failed to read inputs" in text
    assert "driver: Exception in thread beam_control_read" in text and "ZeroDivisionError" in text


def test_with_beam_at_debug_level_nothing_is_held(capsys):
    with _root_handler() as out:
        logging.getLogger("apache_beam").setLevel(logging.DEBUG)  # what `mbm preprocess -vv` sets
        held = HeldErrors()
        with held:
            logging.getLogger("apache_beam.runners.worker.data_plane").error("Failed to read inputs.")
        assert "Failed to read inputs." in out.getvalue() and held.records == []


def _tar(path, members: dict[str, bytes]) -> bytes:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_a_shard_cut_short_is_found_by_its_recorded_size_or_by_its_end(tmp_path):
    from jobs.preprocess import _cut_shard
    from schemas import DatasetManifest

    (tmp_path / "shards").mkdir()
    names = ["shards/v000001-000000.tar", "shards/v000001-000001.tar"]
    whole = [_tar(tmp_path / n, {f"s{i}.json": b"x" * 3000, f"s{i}.npy": b"\1" * 5000}) for i, n in enumerate(names)]
    recorded = DatasetManifest(version=1, shards=names, shard_sizes=[1, 1], num_samples=2, counts={}, index="",
                               shard_bytes=[len(w) for w in whole])
    older = DatasetManifest(version=1, shards=names, shard_sizes=[1, 1], num_samples=2, counts={}, index="")
    assert _cut_shard(str(tmp_path), recorded) is None and _cut_shard(str(tmp_path), older) is None
    (tmp_path / names[1]).write_bytes(whole[1][:4096])  # whole blocks, ending inside a member's data
    assert _cut_shard(str(tmp_path), recorded) == names[1] and _cut_shard(str(tmp_path), older) == names[1]
    (tmp_path / names[1]).write_bytes(whole[1] + b"\0" * 512)  # a zero block more: only the size tells
    assert _cut_shard(str(tmp_path), recorded) == names[1] and _cut_shard(str(tmp_path), older) is None
    (tmp_path / names[1]).write_bytes(whole[1][:1001])
    assert _cut_shard(str(tmp_path), older) == names[1]


def test_a_remote_runner_refused_by_beam_leaves_no_output_folder(tmp_path):
    """Beam's own check of Dataflow's options came after the output folder was created and locked."""
    import pytest

    from jobs.preprocess import run_preprocess
    from jobs.spec import SpecError, load_spec

    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "job.toml").write_text('[input]\nmanifest = "m.jsonl"\n[output]\ndir = "s3://bucket/out"\n'
                                       '[runner]\nname = "DataflowRunner"\n')
    with pytest.raises(SpecError, match=r"^\[runner\] DataflowRunner: Missing GCS path option: temp_location; "):
        run_preprocess(load_spec(str(tmp_path / "job.toml")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "m.jsonl"]


def test_a_runner_s_service_that_fails_is_told_in_one_line(tmp_path):
    from jobs.preprocess import runner_failure

    class RpcError(Exception):
        def details(self):
            return "Received http2 header with status: 404"

    log = tmp_path / ".worker.log"
    said = runner_failure(RpcError("<a multi-line\ndump>"), "SparkRunner", str(log))
    assert said == ("[runner] SparkRunner: the job did not run (RpcError: Received http2 header with status: 404); "
                    "check the runner's service and its options")
    assert "Traceback" not in said and "multi-line" in log.read_text()  # the whole error is kept in the log
    assert runner_failure(RuntimeError("Service failed to start up\nwith error 1"), "FlinkRunner", None) == (
        "[runner] FlinkRunner: the job did not run (RuntimeError: Service failed to start up with error 1); "
        "check the runner's service and its options")
    assert runner_failure(RuntimeError("x"), "FnApiRunner", None) is None  # mbm's own failures: told elsewhere
