import pytest

from jobs.cli import main
from jobs.environment import check_environment
from jobs.spec import SpecError


@pytest.mark.parametrize("env", [
    {}, {"MBM_FORKSERVER": "0"}, {"MBM_FORKSERVER": "1"}, {"MBM_NATIVE_BERT": " 0 "}, {"MBM_FORKSERVER": ""},
    {"MBM_MALLOC": "default"}, {"MBM_MALLOC": "Default"}, {"MBM_SCAN_CACHE": "0"}, {"MBM_SCAN_CACHE": "250000"},
    {"MBM_SCAN_DIR": "OFF"}, {"MBM_SCAN_DIR": "/no/such/folder/yet"}, {"MBM_SCAN_DIR": " "},
])
def test_documented_values_pass(env):
    check_environment(env)


def test_a_scan_dir_that_is_a_file_is_refused(tmp_path):
    check_environment({"MBM_SCAN_DIR": str(tmp_path)})
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match=r"MBM_SCAN_DIR='.*f' is not a folder: give a folder for the shard scans"):
        check_environment({"MBM_SCAN_DIR": str(tmp_path / "f")})


@pytest.mark.parametrize("env, said", [
    ({"MBM_FORKSERVER": "false"}, "MBM_FORKSERVER='false': give 0 (start preprocessing workers the usual way"),
    ({"MBM_NATIVE_BERT": "off"}, "MBM_NATIVE_BERT='off': give 0 (load BERT text models through transformers)"),
    ({"MBM_MALLOC": "glibc"}, "MBM_MALLOC='glibc': give 'default'"),
    ({"MBM_SCAN_CACHE": "abc"}, "MBM_SCAN_CACHE='abc': give the number of samples"),
    ({"MBM_SCAN_CACHE": "-5"}, "MBM_SCAN_CACHE='-5'"),
    ({"MBM_SCAN_CACHE": "1e5"}, "MBM_SCAN_CACHE='1e5'"),
])
def test_other_values_are_refused_naming_the_variable(env, said):
    with pytest.raises(SpecError) as exc:
        check_environment(env)
    assert said in str(exc.value)


def test_a_bad_value_stops_any_command_with_exit_2_before_it_starts(tmp_path, monkeypatch, capsys):
    """Read where they take effect, such values meant the default: MBM_FORKSERVER=false kept the fork server."""
    monkeypatch.setenv("MBM_FORKSERVER", "false")
    assert main(["versions", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mbm: error: MBM_FORKSERVER='false'")
