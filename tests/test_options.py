"""Declared options (Option tables on passes, targets, strategies): checked before anything runs."""

from __future__ import annotations

import pytest

from conftest import run_cli
from graphopt.config import RunConfig
from graphopt.errors import UsageError
from graphopt.plugin import Option
from graphopt.registry import PASSES, STRATEGIES, TARGETS, check_options, option_table


def _cfg(**kw) -> RunConfig:
    return RunConfig(model="m.onnx", **kw)


@pytest.mark.parametrize("kw,flag,msg", [
    (dict(target="ort", target_options={"repaet": 3}), "--target-opt repaet=3",
     "unknown option of target 'ort'; valid: number, profile, repeat, threads, warmup"),
    (dict(target="x86", target_options={"repeat": "many"}), "--target-opt repeat='many'", "expected an integer"),
    (dict(target="x86", target_options={"warmup": -1}), "--target-opt warmup=-1", "expected a number >= 0"),
    (dict(target="cuda", target_options={"compiler": "clang"}), "--target-opt compiler='clang'",
     "expected one of nvrtc, nvcc"),
    (dict(target="rpi4", target_options={"estimate": "maybe"}), "--target-opt estimate='maybe'", "expected 1 or 0"),
    (dict(strategy="evolutionary", strategy_options={"populaton": 4}), "--strategy-opt populaton=4",
     "unknown option of strategy 'evolutionary'; valid: crossover, max_mutations, population"),
    (dict(strategy="grid", strategy_options={"knobs": "layers"}), "--strategy-opt knobs='layers'",
     "expected one of passes, sites"),
    (dict(strategy="random", strategy_options={"population": 4}), "--strategy-opt population=4",
     "unknown option of strategy 'random'; valid: (none)"),
    (dict(passes=["conv_bn", "width"], pass_options={"width_importance": "l3"}),
     "--pass-opt width_importance='l3'", "expected one of auto, l1, l2, ls"),
    (dict(passes=["conv_bn"], pass_options={"depth_repair": 1}), "--pass-opt depth_repair=1",
     "unknown option of pass 'conv_bn'; valid: finetune_threads, recover_loss, recover_temperature, "
     "recover_train_size, repair"),  # the run-wide recovery options are valid for every pass
    (dict(passes=["int8"], pass_options={"int8_activations": "int4"}), "--pass-opt int8_activations='int4'",
     "expected one of uint8, int8 (pass 'int8')"),
    (dict(passes=["int8"], pass_options={"int8_reduce_range": "maybe"}), "--pass-opt int8_reduce_range='maybe'",
     "expected auto, true or false (pass 'int8')"),
    (dict(passes=["int8"], pass_options={"int8_reduce_range": 2}), "--pass-opt int8_reduce_range=2",
     "expected auto, true or false (pass 'int8')"),
    (dict(passes=["int8"], pass_options={"int8_activation": "int8"}), "--pass-opt int8_activation='int8'",
     "unknown option of pass 'int8'; valid: finetune_threads, int8_activations, int8_reduce_range, recover_loss"),
    (dict(passes=["trim_padding"], pass_options={"max_tokens": 32}), "--pass-opt max_tokens=32",
     "unknown option of pass 'trim_padding'; valid: finetune_threads, recover_loss, recover_temperature, "
     "recover_train_size, repair"),
    (dict(passes=["resolution"], pass_options={"size": 200}), "--pass-opt size=200",
     "unknown option of pass 'resolution'; valid: finetune_threads, recover_loss"),
])
def test_bad_options_stop_before_the_run(kw, flag, msg):
    with pytest.raises(UsageError) as e:
        _cfg(**kw).validate()
    text = str(e.value)
    assert text.startswith(flag) and msg in text and "\n" not in text, text


@pytest.mark.parametrize("kw", [
    dict(target="ort", target_options={"repeat": "3", "profile": "1", "threads": 2}),
    dict(target="x86", target_options={"mattr": ["+avx2"], "tracker": "h:9190", "key": "k", "trials": 0}),
    dict(target="rpi4", target_options={"estimate": 1, "check_tol": 1e-3, "mcpu": "x"}),  # mcpu: rpi4 refuses it itself
    dict(strategy="evolutionary", strategy_options={"population": 8, "crossover": 0.5}),
    dict(strategy="sensitivity", strategy_options={"mode": "int8", "evolutionary_population": 4}),
    dict(passes=["width", "depth"], pass_options={"repair": False, "width_importance": "l2", "depth_repair": True}),
    dict(passes=["int8"], pass_options={"int8_reduce_range": "auto", "int8_activations": "int8"}),
    dict(passes=["int8", "trim_padding"], pass_options={"int8_reduce_range": True}),
    dict(passes=["int8"], pass_options={"int8_reduce_range": 0}),  # --pass-opt int8_reduce_range=0 (JSON 0)
])
def test_good_options_pass(kw):
    _cfg(**kw).validate()


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, True), (False, False), (1, True), (0, False),
                                            ("true", True), ("off", False), ("maybe", None), (2, None)])
def test_int8_reads_reduce_range_as_its_table_checks_it(value, expected):
    from graphopt.passes.int8 import Int8Quantize, _auto_reduce_range, _reduce_range

    (opt,) = [o for o in Int8Quantize.OPTIONS if o.name == "int8_reduce_range"]
    assert _reduce_range(value) == expected and (opt.problem(value) is None) == (expected is not None)
    if expected is None:
        with pytest.raises(UsageError, match="int8_reduce_range"):
            _auto_reduce_range(value)
    elif expected != "auto":
        assert _auto_reduce_range(value) is expected


def test_a_constructor_keyword_missing_from_the_table_is_still_accepted():
    class T(TARGETS.get("ort")):
        OPTIONS = (Option("threads", int),)

        def __init__(self, threads=None, fresh_knob=1, **options):
            super().__init__(threads=threads, **options)

    assert set(option_table(T)) >= {"threads", "fresh_knob", "warmup", "repeat", "number", "profile"}
    TARGETS.register("t_opts", T)
    try:
        check_options(TARGETS, ["t_opts"], {"fresh_knob": 3}, "--target-opt")
        with pytest.raises(UsageError, match="threads='x': expected an integer"):
            check_options(TARGETS, ["t_opts"], {"threads": "x"}, "--target-opt")
    finally:
        TARGETS.unregister("t_opts")


def test_every_builtin_declares_its_options():
    for reg in (TARGETS, STRATEGIES):
        for name in ("x86", "cuda", "ort", "rpi4") if reg is TARGETS else ("random", "grid", "evolutionary", "sensitivity"):
            assert option_table(reg.get(name)) is not None, name
    for name in PASSES.names():
        assert option_table(PASSES.get(name)) is not None, name


def test_cli_unknown_option_exits_2_with_one_line(tmp_path):
    r = run_cli("run", "models/efficientnet_lite0.onnx", "--target", "ort", "--target-opt", "repaet=3",
                "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "graphopt: error: --target-opt repaet=3: unknown option of target 'ort'; "
        "valid: number, profile, repeat, threads, warmup"]
    assert not (tmp_path / "o").exists()


def test_list_shows_the_options():
    r = run_cli("list", "strategies", timeout=120)
    assert r.returncode == 0
    assert "population (int, default 16): genotypes alive at once" in r.stdout
    assert "knobs (passes|sites, default passes)" in r.stdout


def test_list_shows_the_int8_options():
    r = run_cli("list", "passes", timeout=120)
    assert r.returncode == 0
    assert "int8_activations (uint8|int8, default uint8): static activations' type" in r.stdout
    assert "int8_reduce_range (auto|true|false, default auto): 7-bit weights" in r.stdout
