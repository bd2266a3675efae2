import argparse
import os

import pytest

from jobs.train_cli import add_train_parser, train_config
from mbm.train.config import TrainConfig, load_toml, merge
from mbm.train.run import RunDir
from mbm.train.schedule import warmup_cosine_factor


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('data = "ds"\nout = "r"\nsteps = 7\nlr = 0.1\nfusion = "gated"\n[max_tokens]\naudio = 16\n')
    cfg = train_config(parse(["--config", str(toml), "--steps", "9", "--pair", "text,audio"]))
    assert (cfg.steps, cfg.lr, cfg.fusion, cfg.pair) == (9, 0.1, "gated", ["text", "audio"])
    assert cfg.max_tokens == {"text": 64, "image": 64, "audio": 16}
    assert cfg.batch_size == TrainConfig().batch_size


def test_train_table_and_dashed_keys_are_accepted(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[train]\ndata = "ds"\nbatch-size = 3\n')
    assert load_toml(str(toml)) == {"data": "ds", "batch_size": 3}


def test_resume_starts_from_the_runs_saved_settings(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    run.write_config(merge({"data": "ds", "out": run.root, "d_model": 32, "heads": 2, "steps": 10}))
    cfg = train_config(parse(["--out", run.root, "--resume", "--steps", "20"]))
    assert (cfg.d_model, cfg.heads, cfg.steps, cfg.resume) == (32, 2, 20, True)
    assert cfg.data == os.path.abspath("ds")  # a relative path saved by an older run is read from here


def test_toml_round_trip(tmp_path):
    cfg = merge({"data": "d", "out": "o", "pair": ["text", "image"], "stop_at": 3, "tokenizer": "tok"})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert merge(load_toml(str(path))) == cfg


@pytest.mark.parametrize("settings, flag", [
    ({"steps": 0}, "--steps"), ({"fusion": "sum"}, "--fusion"), ({"lr": "fast"}, "--lr"),
    ({"d_model": 30, "heads": 4}, "--d-model"), ({"pair": "text"}, "--pair"), ({"val_fraction": 1.0}, "--val-fraction"),
    ({"val_fraction": 0.0}, r"--val-fraction must be in \(0, 1\), got 0.0; a run evaluates on its held-out split"),
    ({"max_tokens": {"smell": 3}}, "--max-tokens"), ({"workers": -1}, "--workers"),
    ({"pair": ["text", 3]}, r"--pair must be a list of names \(strings\), got \['text', 3\]"),
    ({"pair": ","}, r"--pair ',' names nothing; give modality names"), ({"pair": ""}, "--pair '' names nothing"),
])
def test_bad_settings_name_their_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        merge(settings)


def test_unknown_config_key_is_named(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        load_toml(str(toml))


def test_warmup_then_cosine_to_the_floor():
    f = [warmup_cosine_factor(s, 10, 110, 0.1) for s in range(0, 130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55)
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))


def test_loader_workers_default_to_none_on_the_cpu_and_the_rank_share_of_the_cores_on_a_gpu(monkeypatch):
    import os

    import torch

    from mbm import resources
    from mbm.train.config import merge
    from mbm.train.trainer import loader_workers

    monkeypatch.setattr(resources, "cgroup_cpu_limit", lambda *a: None)  # the machine's own quota, if any

    assert TrainConfig().workers is None and merge({"workers": 0}).workers == 0
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_workers(None, cpu) == 0 and loader_workers(3, cpu) == 3 and loader_workers(0, gpu) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, ranks, expected in [(16, None, 8), (6, None, 5), (2, None, 1), (1, None, 1), (16, "2", 7),
                                   (16, "8", 1), (64, "4", 8), (16, "junk", 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        if ranks is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert loader_workers(None, gpu) == expected, (cores, ranks)


def test_a_schedule_built_at_a_step_continues_as_one_stepped_there():
    import torch

    from mbm.train.schedule import warmup_cosine

    def optimizer(lr):
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)

    stepped = warmup_cosine(opt := optimizer(1e-2), 3, 10, 0.1)
    for _ in range(5):
        opt.step()
        stepped.step()
    resumed = warmup_cosine(optimizer(1e-2), 3, 10, 0.1, done=5)
    assert resumed.last_epoch == 5 and resumed.get_last_lr() == pytest.approx(stepped.get_last_lr())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * warmup_cosine_factor(5, 3, 10, 0.1))
    assert resumed.base_lrs == [1e-2]


def test_settings_that_cannot_be_used_are_one_line_before_anything_runs(tmp_path, capsys):
    from jobs.train_cli import main

    (tmp_path / "pair.toml").write_text('pair = ["text", 3]\n')
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config",
                 str(tmp_path / "pair.toml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mbm train: error: --pair must be a list of names (strings), got ['text', 3]"]
    long = str(tmp_path / ("a" * 300))
    assert main(["train", "--data", str(tmp_path), "--out", long]) == 2
    assert capsys.readouterr().err.strip() == f"mbm train: error: --out {long}: File name too long; give a folder for the run"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("settings, message", [
    ({"lr": 1e38}, r"^--lr 1e\+38 is too large: AdamW's first step moves a weight by up to 10 x --lr, which float32 "
                   r"cannot hold \(at most 3\.403e\+38\); learning rates are usually below 0\.01$"),
    ({"lr": 1e39}, r"^--lr 1e\+39 is beyond float32's range \(at most 3\.403e\+38\), in which the model trains$"),
    ({"weight_decay": 1e39}, r"^--weight-decay 1e\+39 is beyond float32's range"),
    ({"grad_clip": 1e300}, r"^--grad-clip 1e\+300 is beyond float32's range"),
    ({"lr": float("nan")}, r"^--lr must be a finite number, got nan$"),
    ({"grad_clip": float("inf")}, r"^--grad-clip must be a finite number, got inf$"),
])
def test_float_settings_that_overflow_float32_are_refused_naming_the_flag(settings, message):
    """Torch failed on them mid-run: "RuntimeError: value cannot be converted to type float without overflow"."""
    with pytest.raises(ValueError, match=message):
        merge(settings)
    assert merge({"lr": 1.0, "weight_decay": 1e30}).lr == 1.0  # large is not refused for being large


def test_an_overflowing_flag_is_one_line_before_anything_runs(tmp_path, capsys):
    from jobs.train_cli import main

    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--lr", "1e38",
                 "--warmup-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mbm train: error: --lr 1e+38 is too large")
    assert not (tmp_path / "r").exists()


def test_settings_paths_take_a_tilde_and_a_byte_order_mark(tmp_path, monkeypatch):
    """Quoted, "~/runs/a" reached mbm as written (a folder named ~ in the current one); a settings file
    saved by Windows Notepad starts with a BOM, which tomllib does not read."""
    from jobs.train_cli import build_parser, train_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.toml").write_bytes(b'\xef\xbb\xbfsteps = 7\nout = "~/runs/a"\n')
    parser = build_parser()
    cfg = train_config(parser.parse_args(["train", "--data", str(tmp_path), "--config", "~/t.toml"]))
    assert cfg.steps == 7 and cfg.out == str(tmp_path / "runs" / "a")
    cfg = train_config(parser.parse_args(["train", "--data", "~", "--config", "~/t.toml", "--out", "~/runs/b"]))
    assert cfg.out == str(tmp_path / "runs" / "b") and cfg.data == str(tmp_path.resolve())
    args = parser.parse_args(["evaluate", "--run", "~/runs/a", "--data", "~/ds", "--tokenizer", "~/tok"])
    assert (args.run, args.data, args.tokenizer) == tuple(str(tmp_path / p) for p in ("runs/a", "ds", "tok"))


@pytest.mark.parametrize("argv, said", [
    (["train", "--data", "", "--out", "{tmp}/r"], "mbm train: error: --data is empty; give the path"),
    (["train", "--data", "{tmp}", "--out", "{tmp}/r", "--tokenizer", " "],
     "mbm train: error: --tokenizer is empty; give the path"),
    (["evaluate", "--run", ""], "mbm evaluate: error: --run is empty; give the path"),
    (["evaluate", "--run", "{tmp}/r", "--data", ""], "mbm evaluate: error: --data is empty; give the path"),
    (["generate", "--run", "{tmp}/r", "--checkpoint", ""], "mbm generate: error: --checkpoint is empty; give the path"),
])
def test_an_empty_path_flag_is_one_line_not_the_default_or_the_current_folder(tmp_path, capsys, argv, said):
    """``evaluate --data ""`` went on with the run's dataset; ``train --data ""`` said --data was missing."""
    from jobs.train_cli import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err.splitlines() == [said]
    assert list(tmp_path.iterdir()) == []
