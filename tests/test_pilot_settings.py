"""Generation settings: one path from Stage1Config's defaults through a named calibration and the flags
to a recorded configuration; the flags and the values read back from a pilot manifest checked against
the same ranges; the README's manual commands parse and take the bundled model's calibration."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BAD_PILOT_FLAGS = [
    ("--response-temperature", "-1"), ("--instruction-temperature", "abc"), ("--response-top-p", "2"),
    ("--response-top-p", "0"), ("--instruction-top-p", "1.5"), ("--response-repetition-penalty", "-1"),
    ("--response-repetition-penalty", "0"), ("--response-max-new-tokens", "0"), ("--instruction-max-new-tokens", "2.5"),
    ("--confidence-threshold", "nan"), ("--confidence-threshold", "inf"), ("--qc-runaway-rate-max", "1.5"),
    ("--qc-token-limit-rate-max", "-0.1"), ("--qc-critic-acceptance-rate-min", "2"), ("--qc-delimiter-leakage-max", "-1"),
    ("--qc-median-response-tokens-max", "0"), ("--count", "0"), ("--batch-size", "0"), ("--max-rounds", "0"), ("--seed", "-1"),
]
BAD_SCALE_FLAGS = [
    ("--count", "-5"), ("--num-shards", "0"), ("--num-shards", "1001"), ("--shard-index", "-1"), ("--batch-size", "0"),
    ("--seed", "-2"), ("--max-rounds", "0"), ("--response-top-p", "2"), ("--response-temperature", "-0.5"),
    ("--qc-critic-acceptance-rate-min", "1.01"),
]
BAD_TEST_SET_FLAGS = [("--count", "4"), ("--count", "x"), ("--seed", "-1")]


def _parse_error(parse_args, argv, capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        parse_args(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


# -- flags: checked at parse time (exit 2 naming the flag and the allowed range) --------------------
@pytest.mark.parametrize("flag,value", BAD_PILOT_FLAGS)
def test_pilot_refuses_a_bad_numeric_flag(flag, value, capsys):
    from generate_stage1_pilot_data import parse_args

    err = _parse_error(parse_args, [flag, value], capsys)
    assert f"argument {flag}" in err and ("expected" in err or "invalid" in err), err


@pytest.mark.parametrize("flag,value", BAD_SCALE_FLAGS)
def test_scale_refuses_a_bad_numeric_flag(flag, value, capsys):
    from generate_stage1_scale_data import parse_args

    err = _parse_error(parse_args, [flag, value], capsys)
    assert f"argument {flag}" in err and "expected" in err, err


@pytest.mark.parametrize("flag,value", BAD_TEST_SET_FLAGS)
def test_test_set_refuses_a_bad_numeric_flag(flag, value, capsys):
    from generate_test_instructions import parse_args

    err = _parse_error(parse_args, [flag, value], capsys)
    assert f"argument {flag}" in err, err


def test_temperature_zero_is_greedy_and_allowed():
    from generate_stage1_pilot_data import parse_args
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import pilot_config

    config, _ = pilot_config(parse_args(["--response-temperature", "0", "--instruction-temperature", "0"]), CALIBRATIONS["source"])
    assert config.response.temperature == 0 and config.response.greedy and config.instruction.greedy


def test_a_bad_flag_exits_2_as_a_command(tmp_path):
    from conftest import run_python_script

    # --model names nothing loadable, so a missing check fails fast at the load instead of running a model.
    done = run_python_script("generate_stage1_pilot_data.py", "--response-top-p", "2", "--output", tmp_path / "pilot",
                             "--model", tmp_path / "no-model")
    assert done.returncode == 2 and "--response-top-p: got 2.0, expected a number in (0, 1]" in done.stderr
    assert not (tmp_path / "pilot").exists()


# -- one settings path -----------------------------------------------------------------------------
def test_defaults_come_from_stage1config_alone():
    from generate_stage1_pilot_data import parse_args
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import TUNABLE_SETTINGS, Stage1Config, pilot_config

    args = parse_args([])
    assert all(getattr(args, s.name) is None for s in TUNABLE_SETTINGS)  # no second table of default numbers
    config, overrides = pilot_config(args, CALIBRATIONS["source"])
    assert config == Stage1Config() and overrides == {}


def test_pilot_config_layers_calibration_then_flags():
    from generate_stage1_pilot_data import parse_args
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import pilot_config

    gemma = CALIBRATIONS["gemma-3-270m"]
    config, overrides = pilot_config(parse_args(["--count", "7"]), gemma)
    assert (config.count, config.confidence_threshold, config.label_swap) == (7, 0.0, True)
    assert config.qc_thresholds["token_limit_rate_max"] == 0.4 and config.qc_thresholds["median_response_tokens_max"] == 80
    assert overrides == {}
    config, overrides = pilot_config(parse_args(["--confidence-threshold", "0.5", "--no-label-swap", "--qc-runaway-rate-max", "0.1"]),
                                     gemma)
    assert (config.confidence_threshold, config.label_swap) == (0.5, False)
    # A flag equal to the calibrated value changes nothing, so it is no override.
    assert overrides == {"confidence_threshold": {"from": 0.0, "to": 0.5}, "label_swap": {"from": True, "to": False}}


def _pilot_manifest(**config_changes):
    from utils.stage1_generation import Stage1Config

    config = Stage1Config(seed=7, label_swap=True).as_dict()
    for dotted, value in config_changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return {"config": config, "args": {"model": "some/model"}}


def test_scale_config_is_one_pure_function_of_manifest_and_flags():
    from generate_stage1_scale_data import parse_args
    from utils.stage1_generation import scale_config

    args = parse_args(["--count", "10", "--response-temperature", "0.25", "--max-rounds", "2"])
    before = dict(vars(args))
    config, overrides = scale_config(_pilot_manifest(), args, "pilot/session_manifest.json")
    assert vars(args) == before  # nothing written back into args
    assert (config.count, config.seed, config.label_swap, config.max_rounds, config.response.temperature) == (10, 7, True, 2, 0.25)
    assert overrides == {"response_temperature": {"from": 0.3, "to": 0.25}, "max_rounds": {"from": 6, "to": 2}}
    config, _ = scale_config(_pilot_manifest(), parse_args(["--seed", "3"]), "m.json")
    assert config.seed == 3


@pytest.mark.parametrize("change,named", [
    ({"response__top_p": 2.0}, "config: response.top_p: got 2.0"),
    ({"response__temperature": -1}, "config: response.temperature: got -1"),
    ({"instruction__repetition_penalty": 0}, "config: instruction.repetition_penalty: got 0"),
    ({"qc_thresholds__runaway_rate_max": 1.5}, "config: qc_thresholds.runaway_rate_max: got 1.5"),
    ({"max_rounds": 0}, "config: max_rounds: got 0"),
    ({"confidence_threshold": "high"}, "config: confidence_threshold: got 'high'"),
    ({"label_swap": "yes"}, "config: label_swap: got 'yes'"),
    ({"response__max_new_tokens": None}, "config: missing field(s) response.max_new_tokens"),
    ({"surprise": 1}, "config: unknown field(s) surprise"),
])
def test_values_read_back_from_the_pilot_manifest_are_checked_like_flags(change, named):
    from generate_stage1_scale_data import parse_args
    from utils.exit_codes import BadInputError
    from utils.stage1_generation import scale_config

    with pytest.raises(BadInputError) as raised:
        scale_config(_pilot_manifest(**change), parse_args([]), "artifacts/pilot/session_manifest.json")
    assert str(raised.value).startswith("artifacts/pilot/session_manifest.json: ") and named in str(raised.value)


# -- calibrations --------------------------------------------------------------------------------------
def test_auto_calibration_follows_the_model_file_hash_not_its_name():
    from utils.calibration import choose_calibration
    from utils.clean_model_loader import BUNDLED_SHA256

    calibration, how = choose_calibration("auto", {"file_sha256": BUNDLED_SHA256, "model_id": "renamed.gguf"})
    assert calibration.name == "gemma-3-270m" and how.startswith("auto") and BUNDLED_SHA256[:12] in how
    calibration, how = choose_calibration("auto", {"model_id": "gemma-3-270m", "weights_fingerprint": "0" * 64})
    assert calibration.name == "source" and how.startswith("auto")
    calibration, how = choose_calibration("gemma-3-270m", {"weights_fingerprint": "0" * 64})
    assert calibration.name == "gemma-3-270m" and how == "named by --calibration gemma-3-270m"


def test_each_calibrated_value_is_a_setting_in_range_with_its_reason():
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import TUNABLE_SETTINGS, Stage1Config, setting_value, with_settings

    settings = {s.name: s for s in TUNABLE_SETTINGS}
    for calibration in CALIBRATIONS.values():
        assert set(calibration.reasons) == set(calibration.values)
        for name, value in calibration.values.items():
            allowed = settings[name].allowed
            assert (isinstance(value, bool) if allowed is None else allowed.problem(value) is None), (calibration.name, name)
            assert value != setting_value(Stage1Config(), settings[name]), f"{calibration.name}.{name} repeats the default"
        config = with_settings(Stage1Config(), calibration.values)
        record = calibration.as_record("test")
        assert record["values"] == calibration.values and all(setting_value(config, settings[n]) == v for n, v in record["values"].items())


def test_the_driver_sets_no_calibration_of_its_own():
    driver = (ROOT / "scripts" / "run_stage1.sh").read_text()
    code = "\n".join(line for line in driver.splitlines() if not line.lstrip().startswith("#"))
    for flag in ("--confidence-threshold", "--label-swap", "--qc-"):
        assert flag not in code, f"run_stage1.sh passes {flag}: calibrations live in scripts/utils/calibration.py"


def _readme_commands() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running the stages yourself"):]
    block = section[section.index("```bash") + 7: section.index("```", section.index("```bash") + 7)]
    commands = {}
    for command in block.replace("\\\n", " ").splitlines():
        words = shlex.split(command)
        if words and words[0] == "python":
            commands[Path(words[1]).name] = words[2:]
    return commands


def test_readme_manual_commands_parse_and_the_pilot_calibrates_the_bundled_model():
    import generate_stage1_pilot_data as pilot
    import generate_stage1_scale_data as scale
    import generate_test_instructions as test_set
    from utils.calibration import choose_calibration
    from utils.clean_model_loader import BUNDLED_SHA256
    from utils.stage1_generation import pilot_config

    commands = _readme_commands()
    test_set.parse_args(commands["generate_test_instructions.py"])
    scale.parse_args(commands["generate_stage1_scale_data.py"])
    args = pilot.parse_args(commands["generate_stage1_pilot_data.py"])
    assert args.calibration == "auto" and args.model is None  # the bundled model, calibrated by the pilot itself
    calibration, _ = choose_calibration(args.calibration, {"file_sha256": BUNDLED_SHA256})
    config, overrides = pilot_config(args, calibration)
    assert calibration.name == "gemma-3-270m" and overrides == {}
    assert (config.confidence_threshold, config.label_swap, config.qc_thresholds["token_limit_rate_max"]) == (0.0, True, 0.4)
    # The README names the calibration's values as they are.
    bullet = re.search(r"\*\*The bundled model is small\.\*\*(.*?)(\n- |\Z)", (ROOT / "README.md").read_text(), re.S).group(1)
    for text in ("threshold 0", "< 0.4", ">= 0.3", "< 0.1"):
        assert text in bullet


# -- the new recipe's settings ----------------------------------------------------------------------
def test_the_response_cap_follows_the_template_unless_given():
    from generate_stage1_pilot_data import parse_args
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import Stage1Config, pilot_config

    source = CALIBRATIONS["source"]
    assert (Stage1Config().response_template, Stage1Config().response.max_new_tokens) == ("response_v4", 256)
    config, overrides = pilot_config(parse_args(["--response-template", "response_v2"]), source)
    assert config.response.max_new_tokens == 80
    assert overrides == {"response_template": {"from": "response_v4", "to": "response_v2"},
                         "response_max_new_tokens": {"from": 256, "to": 80, "because": "--response-template"}}
    config, overrides = pilot_config(parse_args(["--response-template", "response_v2", "--response-max-new-tokens", "120"]), source)
    assert config.response.max_new_tokens == 120 and overrides["response_max_new_tokens"] == {"from": 256, "to": 120}
    config, overrides = pilot_config(parse_args(["--response-max-new-tokens", "64"]), source)
    assert config.response_template == "response_v4" and config.response.max_new_tokens == 64


def test_new_settings_parse_and_the_probe_threshold_is_the_pilots_alone(capsys):
    from generate_stage1_pilot_data import parse_args as pilot_args
    from generate_stage1_scale_data import parse_args as scale_args
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import pilot_config

    args = pilot_args(["--num-candidates", "4", "--relevance-min", "0.1", "--min-signal-auc", "0.8", "--constraint-fraction", "0.5",
                       "--constraint-families", "words_max,title"])
    config, _ = pilot_config(args, CALIBRATIONS["source"])
    assert (config.num_candidates, config.relevance_min, config.min_signal_auc, config.constraint_fraction) == (4, 0.1, 0.8, 0.5)
    assert config.constraint_families == ["words_max", "title"]
    assert not hasattr(scale_args([]), "min_signal_auc")  # a shard uses the pilot's verdict, never its own
    err = _parse_error(pilot_args, ["--response-template", "response_v9"], capsys)
    assert "argument --response-template: invalid choice" in err
    err = _parse_error(pilot_args, ["--constraint-families", "keyword_frequency"], capsys)
    assert "argument --constraint-families" in err and "held out of training" in err


@pytest.mark.parametrize("change,named", [
    ({"response_template": "response_v9"}, "config: response_template: got 'response_v9'"),
    ({"constraint_families": ["sections"]}, "config: constraint_families: constraint family 'sections' is held out"),
    ({"constraint_families": "words_max"}, "config: constraint_families: got 'words_max'"),
    ({"num_candidates": 0}, "config: num_candidates: got 0"),
    ({"relevance_min": float("nan")}, "config: relevance_min: got nan"),
    ({"min_signal_auc": 1.5}, "config: min_signal_auc: got 1.5"),
    ({"constraint_fraction": -0.1}, "config: constraint_fraction: got -0.1"),
])
def test_new_values_read_back_from_the_pilot_manifest_are_checked(change, named):
    from generate_stage1_scale_data import parse_args
    from utils.exit_codes import BadInputError
    from utils.stage1_generation import scale_config

    with pytest.raises(BadInputError) as raised:
        scale_config(_pilot_manifest(**change), parse_args([]), "artifacts/pilot/session_manifest.json")
    assert named in str(raised.value)


def test_settings_a_calibration_keeps_are_real_settings_it_does_not_change():
    from utils.calibration import CALIBRATIONS
    from utils.stage1_generation import TUNABLE_SETTINGS

    names = {s.name for s in TUNABLE_SETTINGS}
    for calibration in CALIBRATIONS.values():
        assert set(calibration.kept) <= names and not set(calibration.kept) & set(calibration.values), calibration.name
        assert calibration.as_record("test")["kept"] == calibration.kept
    assert CALIBRATIONS["source"].values == {} and CALIBRATIONS["source"].kept == {}
