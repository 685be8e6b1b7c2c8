"""Bad input: one clear line on stderr, a non-zero exit, no traceback, input untouched, no outputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_bn_model, file_sha, run_cli

OUTPUT_FILES = ("best.onnx", "report.json")


def _assert_clean_failure(res, code: int, *needles: str, model: Path | None = None, sha: str | None = None,
                          out: Path | None = None) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("graphopt: error:"), err
    for n in needles:
        assert n in last, (n, last)
    if model is not None:
        assert file_sha(model) == sha, "the input model was modified"
    if out is not None:
        for f in OUTPUT_FILES:
            assert not (out / f).exists(), f"{f} written on failure"


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a protobuf\n" * 20)
    sha = file_sha(bad)
    res = run_cli("run", bad, "--target", "ort", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "not a readable ONNX model", model=bad, sha=sha, out=tmp_path / "o")


def test_truncated(tmp_path):
    good = conv_bn_model().SerializeToString()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(good[: len(good) // 2])
    sha = file_sha(bad)
    res = run_cli("run", bad, "--target", "ort", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, str(bad), model=bad, sha=sha, out=tmp_path / "o")
    assert "truncated" in res.stderr or "onnx.checker" in res.stderr


def test_missing_file(tmp_path):
    res = run_cli("run", tmp_path / "nope.onnx", "--target", "ort")
    _assert_clean_failure(res, 2, "model file not found")


def test_op_onnxruntime_cannot_run(tmp_path):
    g = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    sha = file_sha(p)
    res = run_cli("run", p, "--target", "ort", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "onnxruntime cannot run", "FancyOp", model=p, sha=sha, out=tmp_path / "o")


def test_dynamic_dim_without_shape(tmp_path):
    # a symbolic batch dimension defaults to 1 (test_thirdparty); any other needs --shape
    m = conv_bn_model(dynamic_batch=True)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    p = tmp_path / "dyn.onnx"
    onnx.save(m, p)
    sha = file_sha(p)
    res = run_cli("run", p, "--target", "ort", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "dynamic input dimensions", "x[2] (H): --shape x=1x3xHx16", model=p, sha=sha,
                          out=tmp_path / "o")
    # ... and with --shape it runs, leaving the file as it was
    ok = run_cli("run", p, "--target", "ort", "--shape", "x=2x3x16x16", "--budget", "2", "--out", tmp_path / "o2")
    assert ok.returncode == 0, ok.stderr
    assert file_sha(p) == sha


def test_shape_conflicting_with_static_dim(convbn_path, tmp_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--shape", "x=1x3x32x32", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "fixed at 16", out=tmp_path / "o")


@pytest.mark.parametrize("arrays,needle", [
    ({"wrong_name": np.zeros((2, 1, 3, 16, 16), np.float32)}, "do not match the model's inputs ['x']"),
    ({"x": np.zeros((2, 1, 3, 8, 8), np.float32)}, "expected [samples, 1, 3, 16, 16]"),
    ({"x": np.zeros((1, 3, 16, 16), np.float32)}, "no sample axis"),
    ({"x": np.zeros((8, 3, 16, 16), np.float32)}, "for 8 samples of batch 1 add the sample axis: "
                                                  "numpy.savez(path, x=array[:, None])"),
])
def test_data_mismatch(convbn_path, tmp_path, arrays, needle):
    data = tmp_path / "calib.npz"
    np.savez(data, **arrays)
    res = run_cli("run", convbn_path, "--target", "ort", "--data", data, "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, needle, out=tmp_path / "o")


def test_data_not_npz(convbn_path, tmp_path):
    data = tmp_path / "calib.npz"
    data.write_text("nope")
    res = run_cli("run", convbn_path, "--target", "ort", "--data", data, "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "not a readable .npz", out=tmp_path / "o")


@pytest.mark.parametrize("flag,value,needle", [
    ("--passes", "conv_bn,warp_drive", "unknown pass 'warp_drive'; valid pass names: "),
    ("--target", "abacus", "unknown target 'abacus'; valid target names: "),
    ("--strategy", "psychic", "unknown strategy 'psychic'; valid strategy names: "),
])
def test_unknown_names_list_valid_ones(convbn_path, tmp_path, flag, value, needle):
    args = ["run", convbn_path, "--target", "ort", "--out", tmp_path / "o"]
    if flag == "--target":
        args[3] = value
    else:
        args += [flag, value]
    res = run_cli(*args)
    _assert_clean_failure(res, 2, needle, out=tmp_path / "o")
    valid = {"--passes": "conv_bn", "--target": "ort", "--strategy": "random"}[flag]
    assert valid in res.stderr


@pytest.mark.parametrize("budget", ["0", "0s", "-3", "ten"])
def test_bad_budget(convbn_path, tmp_path, budget):
    res = run_cli("run", convbn_path, "--target", "ort", f"--budget={budget}", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "--budget", out=tmp_path / "o")


def test_out_not_writable(convbn_path, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = run_cli("run", convbn_path, "--target", "ort", "--out", blocker / "sub")
    _assert_clean_failure(res, 2, "--out", "cannot create")


def test_bad_min_fidelity(convbn_path, tmp_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--min-fidelity", "1.5", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "--min-fidelity", out=tmp_path / "o")


def test_unknown_flag_exits_2(convbn_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--warp", "9")
    assert res.returncode == 2
    assert "unrecognized arguments: --warp" in res.stderr
    assert "Traceback" not in res.stderr


def _documented_exit_codes(help_text: str) -> dict[int, str]:
    """The 'exit codes:' section of a --help page: {code: its first line of meaning}."""
    assert "\nexit codes:\n" in help_text, help_text[-1500:]
    section = help_text.split("\nexit codes:\n", 1)[1]
    codes: dict[int, str] = {}
    for line in section.splitlines():
        m = re.match(r"^  (\d+) +(\S.*)$", line)
        if m:
            codes[int(m.group(1))] = m.group(2)
        elif line and not line.startswith("     "):  # not a continuation line: the section ended
            break
    return codes


def test_help_documents_exit_codes():
    from graphopt import errors
    from graphopt.runstore.rundir import EXIT_TERMINATED

    for args in (("run", "--help"), ("--help",)):
        res = run_cli(*args)
        assert res.returncode == 0
        if args[0] == "run":
            assert "--budget" in res.stdout and "--min-fidelity" in res.stdout
        codes = _documented_exit_codes(res.stdout)
        # every code the CLI returns, each with what it means, and the numbers are the ones errors.py uses
        assert sorted(codes) == [0, 1, 2, 3, 4, 130, 143], codes
        assert codes[errors.EXIT_OK].startswith("success")
        assert codes[errors.EXIT_INTERNAL].startswith("internal error")
        assert codes[errors.UsageError.exit_code].startswith("bad input or usage")
        assert codes[errors.EXIT_INFEASIBLE].startswith("no candidate met the constraints")
        assert codes[errors.TargetUnreachable.exit_code].startswith("target unreachable")
        assert codes[errors.EXIT_INTERRUPTED].startswith("interrupted (Ctrl-C)")
        assert codes[EXIT_TERMINATED].startswith("terminated (SIGTERM")


def test_json_errors_are_json_on_stdout(convbn_path, tmp_path):
    """A build system reading `--json` gets one JSON object on every exit, errors included."""
    import json

    for args, code, needle in (
        (("run", tmp_path / "nope.onnx", "--target", "ort", "--json"), 2, "model file not found"),
        (("run", convbn_path, "--target", "ort", "--jobs", "x", "--json"), 2, "argument --jobs"),  # argparse's own
        (("runs", tmp_path / "nodir", "--json"), 2, "nodir"),
    ):
        res = run_cli(*args)
        assert res.returncode == code, res.stderr
        obj = json.loads(res.stdout)
        assert obj["status"] == "usage error" and obj["exit_code"] == code and needle in obj["error"], obj
        assert needle in res.stderr  # and the same line on stderr
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--max-latency-ms", "0.0001",
                  "--out", tmp_path / "o", "--json")  # exit 3: the report, with why
    assert res.returncode == 3, res.stderr
    why = json.loads(res.stdout)["why"]
    assert why.startswith("no candidate met every constraint: 2 of 2 over --max-latency-ms 0.0001 (the fastest: ")
    assert why in res.stderr


def test_infeasible_summary_says_why(convbn_path, tmp_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--max-size-mb", "0.000001",
                  "--out", tmp_path / "o")
    assert res.returncode == 3, res.stderr
    assert "why: no candidate met every constraint: 2 of 2 over --max-size-mb 1e-06 (the smallest: " in res.stdout


def test_held_out_data_must_not_be_the_select_data(convbn_path, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((6, 1, 3, 16, 16)).astype(np.float32))
    copy = tmp_path / "copy.npz"
    copy.write_bytes(data.read_bytes())
    for other in (data, copy):
        res = run_cli("run", convbn_path, "--target", "ort", "--data", data, "--eval-data", other,
                      "--out", tmp_path / "o")
        _assert_clean_failure(res, 2, f"--eval-data {other} is the same data as --data {data}", out=tmp_path / "o")
    res = run_cli("run", convbn_path, "--target", "ort", "--data", data, "--eval-data", tmp_path / "nope.npz",
                  "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, f"--eval-data {tmp_path / 'nope.npz'}: file not found")


@pytest.mark.parametrize("flag", ["--out", "--data", "--eval-data"])
def test_an_empty_path_is_refused(convbn_path, tmp_path, flag):
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", flag, "")
    _assert_clean_failure(res, 2, f"{flag}: an empty path (an unset shell variable?)")
    assert not (Path(__file__).parent.parent / "best.onnx").exists()  # nothing written into the current folder


def test_max_drop_that_leaves_no_gate(convbn_path, tmp_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--max-drop", "1", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "--max-drop 1.0: the gate's metric channel runs from 0 to 1", out=tmp_path / "o")


def test_a_loader_that_fails_is_the_user_s_error(convbn_path, tmp_path):
    mod = tmp_path / "loaders.py"
    mod.write_text("import numpy as np\n\n"
                   "class Broken:\n"
                   "    def __len__(self):\n        return 8\n\n"
                   "    def __getitem__(self, i):\n"
                   "        if i >= 2:\n            raise RuntimeError('disk went away')\n"
                   "        return {'x': np.zeros((1, 3, 16, 16), np.float32)}\n\n"
                   "def broken():\n    return Broken()\n\n"
                   "def gen():\n"
                   "    yield {'x': np.zeros((1, 3, 16, 16), np.float32)}\n"
                   "    raise OSError('stream closed')\n")
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--data", f"{mod}:broken",
                  "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, f"loader:{mod}:broken: the loader failed at item ", "(RuntimeError: disk went away)",
                          out=tmp_path / "o")
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--data", f"{mod}:gen",
                  "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "the loader failed after 1 samples (OSError: stream closed)", out=tmp_path / "o")


def test_checker_message_whole(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    bad = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(g), bad)
    res = run_cli("run", bad, "--target", "ort", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "fails onnx.checker", "is not output of any previous nodes", "fix the exporter")


def test_out_in_the_way_is_found_before_the_search(convbn_path, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    res = run_cli("run", convbn_path, "--target", "ort", "--out", afile)
    _assert_clean_failure(res, 2, f"--out {afile}: exists and is a file, not a directory")
    (tmp_path / "o" / "best.onnx").mkdir(parents=True)
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", tmp_path / "o")
    _assert_clean_failure(res, 2, "best.onnx there is a directory, where the run writes a file")
    assert not (tmp_path / "o" / "runs.sqlite").exists()  # refused before anything ran


def test_runs_on_a_missing_folder_says_so(tmp_path):
    res = run_cli("runs", tmp_path / "nodir")
    _assert_clean_failure(res, 2, f"{tmp_path / 'nodir'}: no such directory; pass the --out directory of a run")
    res = run_cli("runs", tmp_path)
    _assert_clean_failure(res, 2, "holds no run store (runs.sqlite)")


def test_a_target_whose_measure_returns_no_measurement(convbn_path, tmp_path):
    """A plugin's slip is named in each candidate's error, and exit 3 points at those errors."""
    from graphopt.api import optimize
    from graphopt.plugin import Artifact, Target
    from graphopt.registry import TARGETS

    class Sloppy(Target):
        name = "sloppy"

        def compile(self, model, workdir):
            return Artifact(target=self.name, handle=None)

        def measure(self, artifact, inputs):
            return 1.5

    TARGETS.register("sloppy", Sloppy)
    try:
        res = optimize(convbn_path, "sloppy", passes="conv_bn", budget=1, out=tmp_path / "o")
    finally:
        TARGETS.unregister("sloppy")
    assert res.exit_code == 3 and all(r.status == "failed" for r in res.records)
    assert res.records[0].error == "measure: TypeError: Sloppy.measure() returned float, not a Measurement"
    assert res.report["why"] == ("no candidate met every constraint: 2 of 2 failed to build or run (the original: "
                                 "measure: TypeError: Sloppy.measure() returned float, not a Measurement); each "
                                 "candidate's error is in report.html and `graphopt runs OUT_DIR`")
