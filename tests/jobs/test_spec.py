import pytest

from jobs.spec import SpecError, dump_toml, load_spec


@pytest.fixture
def data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    return tmp_path


def _write(path, text):
    path.write_text(text)
    return path


def test_minimal_spec_resolves_paths_against_spec_folder_and_fills_defaults(data):
    spec = load_spec(_write(data / "job.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'))
    assert spec.input.manifest == str(data / "data" / "manifest.jsonl")
    assert spec.output.dir == str(data / "out")
    assert spec.extract["text"].name == "minilm" and spec.extract["image"].name == "efficientnet-lite0"
    assert spec.extract["audio"].name == "logmel"
    assert spec.image.size == 224 and spec.audio.sample_rate == 16000
    assert spec.runner.name == "FnApiRunner" and spec.runner.num_workers() >= 1


def test_resolved_spec_round_trips_through_toml(data, tmp_path):
    spec = load_spec(_write(data / "job.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'
                                               '[text]\nnormalization = "NFC"\n[extract.image]\nbatch_size = 8\n'))
    again = load_spec(_write(tmp_path / "again.toml", dump_toml(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()
    assert again.text.normalization == "NFC" and again.extract["image"].batch_size == 8


def test_input_relative_to_cwd_is_accepted_when_not_next_to_spec(data, tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    monkeypatch.chdir(data)
    spec = load_spec(_write(tmp_path / "specs" / "j.toml", '[input]\nmanifest = "data/manifest.jsonl"\n'
                                                            '[output]\ndir = "o"\n'))
    assert spec.input.manifest == str(data / "data" / "manifest.jsonl")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[input]\nmanifest = "data/manifest.jsonl"\n', r"missing \[output\] dir"),
        ('[output]\ndir = "o"\n', r"missing \[input\]"),
        ('[input]\nmanifest = "nope.jsonl"\n[output]\ndir = "o"\n', r"\[input\] manifest = 'nope.jsonl'.*does not exist"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\ndirr = 1\n', r"unknown key 'dirr' in \[output\]"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[outptu]\n', r"unknown section \[outptu\]"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\nsamples_per_shard = "many"\n',
         r"samples_per_shard must be int"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\nsamples_per_shard = 0\n',
         r"samples_per_shard must be >= 1"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[runner]\nname = "Prizm"\n',
         r"\[runner\].*name must be one of"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.image]\nname = "minilm"\n',
         r"is an extractor of text, not of image"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.text]\nname = "bert-huge"\n',
         r"\[extract.text\].*bert-huge"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.video]\nname = "x"\n',
         r"unknown section \[extract.video\]"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[image]\nsize = 300\n',
         r"\[image\] size = 300 conflicts with \[extract.image\]"),
        ('[input]\nmanifest = "data/manifest.jsonl"\nfolder = "data"\n[output]\ndir = "o"\n', r"exactly one of"),
        ('[input\n', r"not valid TOML"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[runner]\ndevice = "cuda:x"\n',
         r"\[runner\].*device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[runner]\ndevice = "gpu"\n',
         r"device must be auto, cpu, cuda or cuda:N"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = ""\n', r"\[output\] dir is empty"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "data/manifest.jsonl"\n',
         r"\[output\] dir = '.*manifest.jsonl' is a file; choose a folder"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "data/manifest.jsonl/sub"\n',
         r"cannot be created: .*manifest.jsonl is a file"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract]\ntext = "minilm"\n',
         r"\[extract.text\] must be a table .* got str 'minilm'"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[runner]\noptions = "--foo"\n',
         r"\[runner\] options must be a list of strings"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.text]\nname = "hf-text"\n'
         'path = "/nonexistent/bert"\n', r"\[extract.text\] hf-text: the model path '/nonexistent/bert' does not exist"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.image]\nname = "hf-image"\n'
         'path = "data"\n', r"\[extract.image\]: .*data is not a local Hugging Face model folder"),
        ('[input]\nfolder = "data"\n[output]\ndir = "data/out"\n',
         r"\[output\] dir = '.*data/out' is inside \[input\] folder = '.*data', whose every file is read"),
        ('[input]\nshards = "data"\n[output]\ndir = "o"\n', r"\[input\] shards '.*data' is a folder holding no tar \(a file named \*.tar, "),
        ('[input]\nmanifest = ["data/manifest.jsonl"]\n[output]\ndir = "o"\n',
         r"\[input\] manifest must be str or None, got \['data/manifest.jsonl'\]"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.text]\nmax_length = 1024\n',
         r"\[extract.text\]: max_length = 1024 exceeds the 512 positions of the model .*; set max_length <= 512"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.text]\nmax_length = 2\n',
         r"\[extract.text\]: MiniLMConfig.max_length must be >= 3: the tokenizer adds its own tokens around each text "
         r"\(\[CLS\] and \[SEP\] for BERT\), and at least one token of the text must fit beside them, got 2"),
        ('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "o"\n[extract.audio]\nn_mels = 256\n',
         r"\[extract.audio\]: LogMelConfig.n_mels must be <= n_fft // 2 \+ 1 = 201, the frequency bins of n_fft = 400: "
         r".*; set n_mels <= 201, or n_fft >= 510, got 256"),
    ],
)
def test_bad_specs_name_what_to_fix(data, body, message):
    with pytest.raises(SpecError, match=message):
        load_spec(_write(data / "bad.toml", body))


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="is a folder; give the job's .toml file"):
        load_spec(tmp_path)


@pytest.mark.parametrize(("gpus", "device", "error"), [
    (0, "cuda", "torch sees no GPU on this machine"),
    (0, "cuda:0", "torch sees no GPU"),
    (2, "cuda:1", None),
    (2, "cuda:2", r"sees 2 GPUs \(cuda:0..cuda:1\)"),
    (1, "cuda:3", r"sees 1 GPU \(cuda:0..cuda:0\)"),
    (0, "cpu", None),
    (0, "auto", None),
])
def test_a_local_run_on_a_missing_gpu_fails_before_any_worker_starts(monkeypatch, gpus, device, error):
    import torch

    from jobs.runner_config import RunnerConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    runner = RunnerConfig(device=device)
    if error is None:
        runner.check_device()
    else:
        with pytest.raises(SpecError, match=error) as exc:
            runner.check_device()
        assert 'use device = "auto"' in str(exc.value)
    RunnerConfig(name="DataflowRunner", device="cuda:7").check_device()  # its workers hold the GPUs, not this machine


def test_a_changed_shard_layout_is_reported_against_the_version_it_differs_from(data, tmp_path, caplog):
    import logging

    from jobs.preprocess import _warn_output_changes

    out = tmp_path / "out"
    (out / "versions").mkdir(parents=True)
    (out / "versions" / "000003.toml").write_text('[output]\ndir = "x"\nsamples_per_shard = 1000\ninclude_media = false\n')
    spec = load_spec(_write(data / "job.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'
                                               'samples_per_shard = 2\n'))
    with caplog.at_level(logging.WARNING):
        _warn_output_changes(str(out), 3, spec)
        _warn_output_changes(str(out), 2, spec)  # no spec kept for that version: nothing to compare
    assert caplog.text.count("samples_per_shard 1000 -> 2") == 1 and "since version 3" in caplog.text
    assert "include_media" not in caplog.text and "--full" in caplog.text


@pytest.mark.parametrize("name, options, error", [
    ("PrismRunner", [], r"makes Beam download the Prism runner binary .* give --prism_location=\.\.\. or --job_endpoint"),
    ("FlinkRunner", ["--flink_master=host:8081"], r"the Flink job server jar"),
    ("SparkRunner", [], r"the Spark job server jar"),
    ("PrismRunner", ["--prism_location=https://example.com/prism.zip"], r"is not a file on this machine"),
    ("PrismRunner", ["--prism_location={file}"], None),
    ("FlinkRunner", ["--flink_job_server_jar", "{file}"], None),
    ("SparkRunner", ["--job_endpoint=localhost:8099"], None),
    ("DataflowRunner", [], None),
])
def test_runners_that_would_download_need_a_local_copy_or_a_job_server(tmp_path, name, options, error):
    from jobs.runner_config import RunnerConfig

    (tmp_path / "artifact").write_bytes(b"")
    runner = RunnerConfig(name=name, options=[o.format(file=tmp_path / "artifact") for o in options])
    for check in (runner.check_offline, lambda: RunnerConfig(name=name).check_offline(runner.options)):  # or after `--`
        if error is None:
            check()
        else:
            with pytest.raises(SpecError, match=error):
                check()


def test_beam_options_beam_does_not_know_are_refused_naming_them(tmp_path):
    """Beam logs and drops an unknown option: a typo would run the job with other settings than asked."""
    from jobs.runner_config import RunnerConfig

    runner = RunnerConfig(options=["--max_num_workers=4", "--job_name", "mine"])
    runner.check_options(["--experiments=a", "--temp_location=/tmp/x"])  # all Beam's
    with pytest.raises(SpecError, match=r"Beam knows no option '--direct_num_worker=1' \(did you mean "
                                        r"--direct_num_workers\?\), '--some_beam_option=value'; it would"):
        runner.check_options(["--direct_num_worker=1", "--some_beam_option=value"])
    with pytest.raises(SpecError, match="'--flink_mastr=h:1'"):
        RunnerConfig(name="FlinkRunner", options=["--flink_mastr=h:1"]).check_options()


@pytest.mark.parametrize("name, options, extra, message", [
    ("FnApiRunner", ["--runner=DataflowRunner"], [],
     r"^Beam option --runner=DataflowRunner in \[runner\] options: mbm runs the job on \[runner\] name = 'FnApiRunner' "
     r"and would ignore it; set the runner with \[runner\] name \(or --runner\) instead$"),
    ("DirectRunner", [], ["--runner", "FlinkRunner"],
     r"^Beam option --runner=FlinkRunner after `--`: .* name = 'DirectRunner'"),
    ("FnApiRunner", [], ["--direct_num_workers=8"],
     r"^Beam option --direct_num_workers=8 after `--`: mbm sets it from \[runner\] workers \(or --workers\); set that "
     r"instead$"),
    ("DirectRunner", ["--direct_running_mode=multi_threading"], [],
     r"^Beam option --direct_running_mode=multi_threading in \[runner\] options: mbm sets it from \[runner\] workers"),
    ("DataflowRunner", [], ["--runner=DataflowRunner", "--direct_num_workers", "2"],
     r"--direct_num_workers=2 after `--`"),
])
def test_beam_options_mbm_sets_itself_are_refused_naming_the_spec_key(name, options, extra, message):
    """Beam took them and mbm went on with its own: a runner other than [runner] name's was ignored."""
    from jobs.runner_config import RunnerConfig

    with pytest.raises(SpecError, match=message):
        RunnerConfig(name=name, options=options).check_options(extra)
    RunnerConfig(name="DataflowRunner").check_options(["--runner=DataflowRunner"])  # says what [runner] name says
    RunnerConfig(name="DataflowRunner").check_options(["--runner", "dataflow"])


@pytest.mark.parametrize("extra, message", [
    (["--direct_num_workers=abc"], "Beam option --direct_num_workers: invalid int value: 'abc'; fix it in [runner] "
                                   "options or after `--`"),
    (["--job_name"], "Beam option --job_name: expected one argument; fix it in [runner] options or after `--`"),
])
def test_a_bad_beam_option_value_is_one_line_naming_the_option(extra, message, capsys):
    from jobs.runner_config import RunnerConfig

    with pytest.raises(SpecError) as info:
        RunnerConfig().check_options(extra)
    assert str(info.value) == message
    assert capsys.readouterr().err == ""  # not Beam's usage, some 300 lines of it


@pytest.mark.parametrize("key", ["manifest", "folder", "shards"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_input_path_is_refused_not_read_as_the_specs_folder(data, key, value):
    with pytest.raises(SpecError, match=rf"bad.toml: \[input\] {key} is empty; set the .* to read$"):
        load_spec(_write(data / "bad.toml", f'[input]\n{key} = "{value}"\n[output]\ndir = "o"\n'))


def test_a_spec_starting_with_a_byte_order_mark_is_read(data):
    """Windows Notepad saves UTF-8 with a BOM first; tomllib reads it as a stray character at line 1."""
    body = '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out/é"\n'
    (data / "bom.toml").write_bytes(b"\xef\xbb\xbf" + body.encode())
    spec = load_spec(data / "bom.toml")
    assert spec.input.manifest == str(data / "data" / "manifest.jsonl") and spec.output.dir == str(data / "out" / "é")


def test_home_in_spec_paths_is_expanded(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(data))
    spec = load_spec(_write(tmp_path / "j.toml",
                            '[input]\nmanifest = "~/data/manifest.jsonl"\n[output]\ndir = "~/o"\n'))
    assert spec.input.manifest == str(data / "data" / "manifest.jsonl") and spec.output.dir == str(data / "o")


def test_audio_trimming_is_turned_off_with_trim_db_0_and_stays_off_in_job_toml(data, tmp_path):
    """TOML has no null, and None was the only value that turned trimming off."""
    spec = load_spec(_write(data / "job.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'
                                               '[audio]\ntrim_db = 0\n'))
    assert spec.audio.trim_db == 0.0
    written = dump_toml(spec.to_dict())
    assert "[audio]" in written and "trim_db = 0.0" in written
    assert load_spec(_write(tmp_path / "again.toml", written)).audio == spec.audio
    default = load_spec(_write(data / "d.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'))
    assert default.audio.trim_db == 40.0
    with pytest.raises(SpecError, match=r"\[audio\] trim_db must be float, got False"):
        load_spec(_write(data / "b.toml", '[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n'
                                          '[audio]\ntrim_db = false\n'))


def test_a_manifest_that_gives_no_sample_exits_2_before_the_job_starts(data, capsys):
    import json

    from jobs.cli import main

    doc = {"info": {}, "images": [{"id": 9, "file_name": "9.jpg"}], "annotations": [{"id": 1, "image_id": 9}]}
    (data / "data" / "captions_train2017.json").write_text(json.dumps(doc, indent=2))
    _write(data / "coco.toml", '[input]\nmanifest = "data/captions_train2017.json"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(data / "coco.toml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "captions_train2017.json is one JSON object (keys: info, images, annotations), not rows" in err
    assert "a JSON manifest must be JSON Lines" in err and "convert it to rows of id, image, text" in err
    assert not (data / "out" / "dataset.json").exists()


@pytest.mark.parametrize("manifest, body, message", [
    ("data/captions.txt", "image,caption\n0.jpg,a dog\n",
     r"\[input\] manifest '.*captions.txt': it has no 'id' column \(columns: 'image', 'caption'\)"),
    ("data/train-*.parquet", None, r"\[input\] manifest = 'data/train-\*.parquet': .*/data/train-\*.parquet does not "
     r"exist \(manifest names one file and patterns are not expanded\)"),
])
def test_manifest_problems_are_spec_errors(data, manifest, body, message):
    if body is not None:
        (data / manifest).write_text(body)
    fmt = 'format = "csv"\n' if manifest.endswith(".txt") else ""
    with pytest.raises(SpecError, match=message):
        load_spec(_write(data / "bad.toml", f'[input]\nmanifest = "{manifest}"\n{fmt}[output]\ndir = "o"\n'))


def _pandas_columns(path):
    """What pandas' ``DataFrame({"id": [1, 2], "text": [...]}).to_json(path)`` writes."""
    path.write_text('{"id":{"0":1,"1":2},"text":{"0":"a cat","1":"a dog"}}')


def _pandas_values(path):
    """What pandas' ``to_json(path, orient="values")`` writes."""
    path.write_text('[[1,"a cat"],[2,"a dog"]]')


def _parquet(path, names, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], names=names), path)


@pytest.mark.parametrize("manifest, write, errors", [
    # a repeated mbm column: only the first would be read
    ("m.csv", "id,text,image,text\n1,a red square,a.png,\n",
     ["its header repeats a column mbm reads ('text' 2 times; columns: 'id', 'text', 'image', 'text')",
      "rename or remove the others"]),
    ("m.tsv", "id\ttext\tid\n7\ta caption\t\n", ["its header repeats a column mbm reads ('id' 2 times"]),
    ("m.parquet", lambda p: _parquet(p, ["id", "text", "text"], [[1], ["hello"], [None]]),
     ["its schema repeats a column mbm reads ('text' 2 times; columns: 'id', 'text', 'text')"]),
    # pandas' default to_json: columns, not rows
    ("m.json", _pandas_columns, ["one JSON object of columns, not rows ('id' holds an object of 2 values",
                                 'df.to_json(path, orient="records", lines=True)']),
    ("m.jsonl", _pandas_columns, ["one JSON object of columns, not rows"]),
    ("m.json", _pandas_values, ["m.json: its first rows are JSON arrays of values, not objects naming their columns",
                                'df.to_json(path, orient="records", lines=True)']),
    # an empty file: a version of it would remove every sample
    ("m.csv", "", ["job.toml: [input] manifest ", "m.csv' is empty (no header, no rows)"]),
    ("m.jsonl", " \n\n", ["m.jsonl' is empty", "write the manifest again"]),
    # so is one that cannot be read from its start: its version would hold no sample either
    ("m.jsonl.gz", "oops, plain text and not gzip\n",
     ["m.jsonl.gz': cannot read the file (BadGzipFile: Not a gzipped file (b'oo')): a job reading it",
      "removing every sample of the version before", "set [input] format"]),
    ("m.parquet", lambda p: p.write_bytes(b"PAR1" + bytes(300)),
     ["m.parquet': cannot read the file (ArrowInvalid: Parquet magic bytes not found in footer"]),
    # a header with no rows is judged too
    ("m.csv", "path,caption\n", ["it has no 'id' column (columns: 'path', 'caption')"]),
    ("m.tsv", "id\tpath\n", ["it has no text, image or audio column (columns: 'id', 'path')"]),
    # names that are mbm's but for spaces or case are shown quoted, with what was meant
    ("m.parquet", lambda p: _parquet(p, ["id ", "text"], [[1], ["a"]]),
     ["(columns: 'id ', 'text'); did you mean 'id' (not 'id ')? column names are matched exactly"]),
    ("m.csv", "ID,Caption\n1,a dog\n", ["did you mean 'id' (not 'ID'), 'caption' (not 'Caption')?"]),
    # a file that does not exist is not called a pattern to join
    ("missing[1].jsonl", None, ["[input] manifest = 'data/missing[1].jsonl': ",
                                "missing[1].jsonl does not exist (manifest names one file and patterns are not "
                                "expanded)"]),
])
def test_a_manifest_that_would_lose_or_misread_rows_exits_2_saying_what_to_fix(data, capsys, manifest, write,
                                                                                 errors):
    from jobs.cli import main

    path = data / "data" / manifest
    if callable(write):
        write(path)
    elif write is not None:
        path.write_text(write)
    _write(data / "job.toml", f'[input]\nmanifest = "data/{manifest}"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(data / "job.toml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for error in errors:
        assert error in err
    assert "[input]: [input]" not in err  # one prefix, not the section named twice
    assert "Join the files" not in err and not (data / "out").exists()


def test_a_manifest_with_a_caption_column_is_accepted(data):
    (data / "data" / "captions.csv").write_text("id,image,caption\ns0,0.jpg,a dog\n")
    spec = load_spec(_write(data / "job.toml", '[input]\nmanifest = "data/captions.csv"\n[output]\ndir = "o"\n'))
    assert spec.input.manifest == str(data / "data" / "captions.csv")


def test_default_workers_are_one_per_core_as_far_as_memory_holds(caplog):
    import logging

    from jobs.runner_config import auto_workers

    GiB = 1 << 30
    assert auto_workers("cpu", cores=16, memory=64 * GiB, gpu=0) == 16
    with caplog.at_level(logging.WARNING):
        assert auto_workers("cpu", cores=16, memory=15 * GiB, gpu=0) == 7  # (15 - 1) / 2
    assert "7 preprocessing workers, not one per core (16): that is what the free memory holds" in caplog.text
    assert auto_workers("cpu", cores=16, memory=int(1.5 * GiB), gpu=0) == 1  # never none
    assert auto_workers("cuda", cores=16, memory=128 * GiB, gpu=16 * GiB) == 5  # 16 * 0.9 / 2.5
    assert auto_workers("cuda", cores=16, memory=128 * GiB, gpu=141 * GiB) == 16  # an H200
    assert auto_workers("cpu", cores=4, memory=0, gpu=0) == 4  # memory unknown: one per core


def test_a_worker_count_neither_the_cores_nor_the_memory_hold_exits_before_any_worker_starts(caplog):
    import logging

    from jobs.runner_config import RunnerConfig, WorkerRoom

    GiB = 1 << 30
    room = WorkerRoom("cpu", cores=2, memory=21 * GiB, gpu=0)  # memory holds (21 - 1) / 2 = 10
    with pytest.raises(SpecError) as e:
        RunnerConfig(workers=99999).check_workers(room)
    assert str(e.value) == (
        "[runner] workers = 99999 (or --workers): this machine has 2 cores and its free memory holds about 10 "
        "workers (21.0 GiB; a worker may need 2.0 GiB); set workers = 0 for one per core as far as memory "
        "holds, or at most 10")
    with pytest.raises(SpecError, match=r"its GPU memory holds about 5 workers \(16.0 GiB; a worker may need 2.5"):
        RunnerConfig(workers=9, device="cuda").check_workers(WorkerRoom("cuda", cores=4, memory=64 * GiB,
                                                                        gpu=16 * GiB))
    with caplog.at_level(logging.WARNING):
        RunnerConfig(workers=10).check_workers(room)  # more than the cores, as many as memory holds: allowed
        RunnerConfig(workers=2).check_workers(room)
        RunnerConfig(workers=3).check_workers(WorkerRoom("cpu", cores=4, memory=2 * GiB, gpu=0))  # the cores hold it
        RunnerConfig(workers=500, name="DataflowRunner").check_workers(room)  # not this machine's workers
        RunnerConfig(workers=64).check_workers(WorkerRoom("cpu", cores=2, memory=0, gpu=0))  # memory unknown
    assert [r.getMessage() for r in caplog.records] == [
        "[runner] workers = 10 on 2 cores: the workers share the cores, which gains nothing for work that keeps "
        "a core busy",
        "[runner] workers = 64 on 2 cores: the workers share the cores, which gains nothing for work that keeps "
        "a core busy"]


def test_preprocess_refuses_a_worker_count_the_machine_cannot_hold(data, capsys, monkeypatch):
    import jobs.runner_config as runner_module
    from jobs.cli import main

    monkeypatch.setattr(runner_module, "memory_room", lambda: (5 << 30, "free memory"))  # holds 2 workers
    monkeypatch.setattr(runner_module, "usable_cores", lambda: 2)
    (data / "data" / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    _write(data / "job.toml", '[input]\nmanifest = "data/m.jsonl"\n[output]\ndir = "out"\n')
    assert main(["preprocess", str(data / "job.toml"), "--workers", "99999", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "[runner] workers = 99999 (or --workers): this machine has 2 cores" in err and "at most 2" in err
    assert "Traceback" not in err and not (data / "out" / "dataset.json").exists()

def test_the_default_worker_count_is_worked_out_once_and_job_toml_keeps_workers_0(tmp_path, monkeypatch):
    import jobs.runner_config as runner_module
    import jobs.spec as spec_module
    from jobs.runner_config import RunnerConfig

    calls = []
    monkeypatch.setattr(runner_module, "auto_workers", lambda device: calls.append(device) or 3)
    runner = RunnerConfig(device="cpu")
    assert runner.num_workers() == 3 and runner.num_workers() == 3 and calls == ["cpu"]
    assert spec_module._asdict(runner)["workers"] == 0 and "_auto_workers" not in spec_module._asdict(runner)
    assert RunnerConfig(workers=5).num_workers() == 5  # chosen: as it is
    assert RunnerConfig(name="DataflowRunner").num_workers() == (__import__("os").cpu_count() or 1)


def test_free_memory_and_gpu_memory_are_read_without_starting_cuda(tmp_path, monkeypatch):
    import os

    from jobs.runner_config import gpu_memory
    from mbm.resources import available_memory

    memory = available_memory()
    assert memory is None or memory > 0
    tool = tmp_path / "nvidia-smi"
    tool.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho 81559\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu_memory("cuda:1") == 81559 << 20
    assert (tmp_path / "args").read_text().split() == [
        "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "1"]
    assert gpu_memory("cpu") is None
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert gpu_memory("auto") is None


def test_a_job_endpoint_nothing_listens_on_is_refused_at_once(tmp_path):
    """Beam waited its --job_server_timeout (300 s) for the job server, then printed a traceback."""
    import socket

    from jobs.runner_config import RunnerConfig

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        RunnerConfig(name="FlinkRunner", options=[f"--job_endpoint=127.0.0.1:{port}"]).check_endpoint()
    with pytest.raises(SpecError) as exc:  # the port is closed now
        RunnerConfig(name="SparkRunner").check_endpoint([f"--job_endpoint=127.0.0.1:{port}"])
    assert str(exc.value) == (f"[runner] --job_endpoint=127.0.0.1:{port}: no SparkRunner job server answers there "
                              "(Connection refused); start it first, or give the address it listens on")
    RunnerConfig(name="FnApiRunner").check_endpoint([f"--job_endpoint=127.0.0.1:{port}"])  # not its option
    RunnerConfig(name="PrismRunner").check_endpoint(["--job_endpoint=embed"])  # Beam's own


def test_beam_s_check_of_a_remote_runner_s_options_is_one_line():
    from jobs.runner_config import RunnerConfig

    with pytest.raises(SpecError) as exc:
        RunnerConfig(name="DataflowRunner").check_beam_options()
    said = str(exc.value)
    assert "\n" not in said and said.startswith("[runner] DataflowRunner: Missing GCS path option: temp_location; ")
    assert "Missing required option: project; Missing required option: region; pass the runner's options" in said
    RunnerConfig(name="FnApiRunner").check_beam_options()
    RunnerConfig(name="FlinkRunner").check_beam_options()
