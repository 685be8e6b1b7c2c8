"""ONNX conformance round trip: every standard node test case through graphopt's load path and an
export with no moves, run on onnxruntime against the expected outputs.

    nice -n 10 .venv/bin/python bench/conformance.py [--cache DIR] [--only REGEX] [--json PATH]

The onnx wheel does not ship its node test data, but it ships the scripts that generate it
(`onnx.backend.test.case.node`, 197 modules, 1884 cases for onnx 1.23). They are regenerated
once into `--cache` (default ~/.cache/graphopt/conformance/onnx-<version>) in the standard
layout: `<case>/model.onnx` + `<case>/test_data_set_0/{input,output}_<i>.pb`. A `--cache`
folder that already holds cases in that layout is read as it is.

Each case, in order:
1. onnxruntime runs the original model. A case onnxruntime cannot run (`ort_fails`) or gets
   wrong itself (`ort_wrong`) is skipped and only counted: it says nothing about graphopt.
2. `graphopt.modelio.ir.load_proto` (the load path of every command: checker, input shapes, constant
   folding, shape inference, onnxruntime check). A `ModelError`/`UsageError` is `refused`
   (its one-line reason is kept); any other exception is `load_crash` (a graphopt bug).
3. `import_graph` -> `export_graph`: a materialize with an empty genotype. An exception is
   `export_crash`.
4. onnxruntime runs the exported model: an exception is `run_fails`; outputs that differ from
   the expected ones (rtol 1e-3, atol 1e-7: the tolerances the onnx test cases declare; dtype
   and shape must match exactly) are `wrong`; otherwise `pass`.

Prints a table of counts and every case that is neither `pass` nor skipped, and writes a JSON
(`--json`, default bench/out/conformance.json) with each case's class and first line.
The whole suite takes 20-90 s on the shared 2-vCPU machine (1 onnxruntime thread per session;
regenerating the cases the first time adds ~5 s).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RTOL, ATOL = 1e-3, 1e-7  # what onnx.backend.test.case.node.expect gives every node case
CLASSES = ["pass", "wrong", "run_fails", "export_crash", "load_crash", "refused", "ort_wrong", "ort_fails"]
SKIPPED = {"ort_wrong", "ort_fails"}
BUGS = {"wrong", "run_fails", "export_crash", "load_crash"}


# ------------------------------------------------------------------------------- generate
def collect(modules: list[str] | None = None, names: list[str] | None = None) -> list:
    """The onnx node test cases (onnx.backend.test.case.TestCase objects).

    modules=None imports every node test module (all 1884 cases, ~5 s); otherwise only the named
    modules of onnx.backend.test.case.node (e.g. "shape", "if_"), which is what a fast test needs.
    names keeps only the cases with those names."""
    node_pkg = importlib.import_module("onnx.backend.test.case.node")
    if modules is None:
        cases = node_pkg.collect_testcases()
    else:
        for m in modules:
            importlib.import_module(f"onnx.backend.test.case.node.{m}")
        cases = node_pkg._NodeTestCases  # every case defined by the modules imported so far
    cases = [c for c in cases if c.kind == "node"]
    if names is not None:
        want = set(names)
        cases = [c for c in cases if c.name in want]
        missing = want - {c.name for c in cases}
        if missing:
            raise KeyError(f"no onnx node test case named {sorted(missing)} in modules {modules}")
    return cases


def _value_proto(value, vi, name: str) -> bytes:
    from onnx import TensorProto, numpy_helper

    t = vi.type
    if t.HasField("sequence_type"):
        return numpy_helper.from_list(value, name).SerializeToString()
    if t.HasField("optional_type"):
        return numpy_helper.from_optional(value, name).SerializeToString()
    if t.HasField("map_type"):
        return numpy_helper.from_dict(value, name).SerializeToString()
    if isinstance(value, TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), name).SerializeToString()


def write_case(case, dest: Path) -> Path:
    """One case in the standard layout (as onnx's own `backend-test-tools generate-data` writes
    model cases): dest/<name>/model.onnx, test_data_set_<k>/input_<i>.pb, output_<i>.pb."""
    d = Path(dest) / case.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(case.model.SerializeToString())
    graph = case.model.graph
    for k, (inputs, outputs) in enumerate(case.data_sets):
        ds = d / f"test_data_set_{k}"
        ds.mkdir(exist_ok=True)
        for j, v in enumerate(inputs):
            (ds / f"input_{j}.pb").write_bytes(_value_proto(v, graph.input[j], graph.input[j].name))
        for j, v in enumerate(outputs):
            (ds / f"output_{j}.pb").write_bytes(_value_proto(v, graph.output[j], graph.output[j].name))
    return d


def write_model_cases(dest: Path) -> list[Path]:
    """onnx's model test cases: the "simple" ones (multi-node graphs written in Python) and the
    nine "light" CNNs the wheel ships (bvlc_alexnet ... zfnet512: real architectures, IR 3 /
    opset <= 8, weights made by ConstantOfShape; the input is onnx's dummy data, arange/n, and
    the expected output ships with the model). Each case dir holds its tolerances."""
    import shutil

    import onnx
    import onnx.backend.test.case.model as model_cases

    dest = Path(dest)
    dirs = []
    for case in model_cases.collect_testcases():
        if case.kind == "simple":
            d = write_case(case, dest)
        elif case.url and case.url.startswith("onnx/backend/test/data/light/"):
            src = Path(onnx.__file__).parent.parent / case.url
            model = onnx.load(str(src))
            d = dest / case.name
            ds = d / "test_data_set_0"
            ds.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, d / "model.onnx")
            inits = {i.name for i in model.graph.initializer}
            for j, vi in enumerate(i for i in model.graph.input if i.name not in inits):
                shape = [dd.dim_value if dd.HasField("dim_value") else 1 for dd in vi.type.tensor_type.shape.dim]
                n = int(np.prod(shape))
                x = (np.arange(n).reshape(shape) / n).astype(np.float32)  # Runner.generate_dummy_data
                (ds / f"input_{j}.pb").write_bytes(numpy_helper_from_array(x, vi.name))
            for j in range(len(model.graph.output)):
                shutil.copy(src.with_name(f"{src.stem}_output_{j}.pb"), ds / f"output_{j}.pb")
        else:
            continue
        (d / "tolerance.json").write_text(json.dumps({"rtol": case.rtol, "atol": case.atol}))
        dirs.append(d)
    return dirs


def numpy_helper_from_array(x: np.ndarray, name: str) -> bytes:
    from onnx import numpy_helper

    return numpy_helper.from_array(x, name).SerializeToString()


def generate(dest: Path, modules: list[str] | None = None, names: list[str] | None = None) -> list[Path]:
    """Regenerate cases into dest (the whole suite when modules and names are None)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return [write_case(c, dest) for c in collect(modules, names)]


def cache_dir() -> Path:
    import onnx

    return Path.home() / ".cache" / "graphopt" / "conformance" / f"onnx-{onnx.__version__}"


def ensure_suite(dest: Path, regenerate: bool = True, models: bool = False) -> list[Path]:
    """The whole suite under dest, regenerated unless a previous run completed it (or, with
    regenerate=False, taken as it is: a folder in the standard layout made elsewhere).
    models=True: onnx's model cases instead of its node cases."""
    done = dest / ".complete"
    if regenerate and not done.exists():
        t0 = time.perf_counter()
        dest.mkdir(parents=True, exist_ok=True)
        dirs = write_model_cases(dest) if models else generate(dest)
        done.write_text(f"{len(dirs)}\n")
        print(f"regenerated {len(dirs)} cases into {dest} in {time.perf_counter() - t0:.1f} s", flush=True)
    return sorted(p.parent for p in dest.glob("*/model.onnx"))


# ------------------------------------------------------------------------------- read and run
def _read_value(path: Path, vi):
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    t = vi.type
    if t.HasField("sequence_type"):
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if t.HasField("optional_type"):
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    if t.HasField("map_type"):
        p = onnx.MapProto()
        p.ParseFromString(data)
        return numpy_helper.to_dict(p)
    p = onnx.TensorProto()
    p.ParseFromString(data)
    return numpy_helper.to_array(p)


def load_case(case_dir: Path):
    """(model, inputs {name: value}, expected [value per graph output]) of data set 0."""
    import onnx

    model = onnx.load(str(case_dir / "model.onnx"))
    ds = case_dir / "test_data_set_0"
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in inits]
    inputs = {}
    for j, vi in enumerate(real_inputs):
        p = ds / f"input_{j}.pb"
        if p.exists():
            inputs[vi.name] = _read_value(p, vi)
    expected = [_read_value(ds / f"output_{j}.pb", vi) for j, vi in enumerate(model.graph.output)
                if (ds / f"output_{j}.pb").exists()]
    return model, inputs, expected


def tolerance(case_dir: Path) -> tuple[float, float]:
    p = Path(case_dir) / "tolerance.json"
    if p.exists():
        t = json.loads(p.read_text())
        return float(t["rtol"]), float(t["atol"])
    return RTOL, ATOL


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # a failure is kept as a value; its log line would only repeat it
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(model, inputs: dict) -> list:
    sess = _session(model)
    feed = {i.name: inputs[i.name] for i in sess.get_inputs() if i.name in inputs}
    names = [o.name for o in model.graph.output]
    return sess.run(names, feed)


def mismatch(expected: list, got: list, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """None when every output matches (dtype, shape, values within rtol/atol; NaN == NaN)."""
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for j, (e, g) in enumerate(zip(expected, got)):
        why = _mismatch_value(e, g, rtol, atol)
        if why:
            return f"output {j}: {why}"
    return None


def _mismatch_value(e, g, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    if e is None or g is None:
        return None if e is None and g is None else f"got {type(g).__name__}, expected {type(e).__name__}"
    if isinstance(e, list):
        if not isinstance(g, list) or len(g) != len(e):
            return f"got {type(g).__name__} of {len(g) if isinstance(g, list) else '?'}, expected list of {len(e)}"
        for k, (a, b) in enumerate(zip(e, g)):
            why = _mismatch_value(a, b, rtol, atol)
            if why:
                return f"item {k}: {why}"
        return None
    if isinstance(e, dict):
        return None if e == g else "map differs"
    e, g = np.asarray(e), np.asarray(g)
    if e.dtype != g.dtype and not (e.dtype.kind in "OUS" and g.dtype.kind in "OUS"):
        return f"dtype {g.dtype}, expected {e.dtype}"
    if e.shape != g.shape:
        return f"shape {g.shape}, expected {e.shape}"
    if e.dtype.kind in "OUS" or e.dtype.kind == "b":
        return None if np.array_equal(e.astype(object) if e.dtype.kind in "OUS" else e,
                                      g.astype(object) if g.dtype.kind in "OUS" else g) else "values differ"
    try:
        ef, gf = e.astype(np.float64), g.astype(np.float64)
    except (TypeError, ValueError):
        return None if e.tobytes() == g.tobytes() else "values differ (bytes)"
    ok = np.isclose(gf, ef, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    bad = int((~ok).sum())
    diff = np.abs(np.nan_to_num(gf - ef, nan=np.inf))
    return f"{bad}/{ok.size} values differ (max |diff| {float(diff.max()):.3g})"


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else text
    return f"{type(e).__name__}: {line}"[:300]


def round_trip(case_dir: Path) -> tuple[str, str]:
    """(class, first line) of one case: see the module docstring."""
    from graphopt.errors import GraphoptError
    from graphopt.modelio.ir import export_graph, import_graph, load_proto

    model, inputs, expected = load_case(case_dir)
    rtol, atol = tolerance(case_dir)
    try:
        ref = run_ort(model, inputs)
    except Exception as e:  # noqa: BLE001 - every failure is a value here
        return "ort_fails", first_line(e)
    why = mismatch(expected, ref, rtol, atol)
    if why:
        return "ort_wrong", why
    try:
        loaded = load_proto(model)
    except GraphoptError as e:
        line = str(e).splitlines()[0][:300]
        # onnxruntime ran the original just now: if it cannot run what load_proto made of it
        # (folded, shapes fixed), the load path broke the model
        return ("run_fails" if line.startswith("onnxruntime cannot run") else "refused"), line
    except Exception as e:  # noqa: BLE001
        return "load_crash", first_line(e) + " @ " + _where(e)
    try:
        out = export_graph(import_graph(loaded.proto))
    except Exception as e:  # noqa: BLE001
        return "export_crash", first_line(e) + " @ " + _where(e)
    try:
        got = run_ort(out, inputs)
    except Exception as e:  # noqa: BLE001
        return "run_fails", first_line(e)
    why = mismatch(expected, got, rtol, atol)
    if why:
        return "wrong", why
    if not _identical(ref, got):  # within tolerance, yet the round trip changed some bits
        return "pass", "not bitwise identical to onnxruntime's outputs on the original"
    return "pass", ""


def _identical(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    if a is None or b is None or isinstance(a, dict):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "OUS":
        return a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"


# ------------------------------------------------------------------------------- report
def environment() -> dict:
    import onnx
    import onnx_graphsurgeon
    import onnxruntime

    cpu = platform.processor() or "?"
    try:
        for ln in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if ln.startswith("Model name"):
                cpu = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "nproc": os.cpu_count(), "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
            "graphopt_commit": commit}


def summarize(results: dict[str, dict]) -> str:
    counts = {c: 0 for c in CLASSES}
    for r in results.values():
        counts[r["class"]] += 1
    n = len(results)
    ran = n - sum(counts[c] for c in SKIPPED)
    lines = ["| class | cases | meaning |", "|---|---|---|"]
    meaning = {"pass": "exported model matches the expected outputs",
               "wrong": "exported model runs but gives a wrong result (graphopt bug)",
               "run_fails": "exported (or loaded) model fails in onnxruntime (graphopt bug)",
               "export_crash": "import_graph/export_graph raised (graphopt bug)",
               "load_crash": "load_proto raised a non-GraphoptError (graphopt bug)",
               "refused": "load_proto refused the model with a one-line reason",
               "ort_wrong": "skipped: onnxruntime's own result differs from the expected one",
               "ort_fails": "skipped: onnxruntime cannot run the original"}
    for c in CLASSES:
        lines.append(f"| {c} | {counts[c]} | {meaning[c]} |")
    exact = sum(1 for r in results.values() if r["class"] == "pass" and not r["first_line"])
    lines.append(f"\n{n} cases; onnxruntime runs {ran} correctly; of those graphopt round-trips "
                 f"{counts['pass']} ({100.0 * counts['pass'] / max(ran, 1):.1f}%; {exact} bitwise identical to "
                 f"onnxruntime on the original), refuses {counts['refused']}, fails {sum(counts[c] for c in BUGS)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="case folder (default: ~/.cache/graphopt/conformance/onnx-<ver>)")
    ap.add_argument("--only", default=None, help="regex: run only the cases whose name matches")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "conformance.json")
    ap.add_argument("--list-refused", action="store_true", help="also print every refused case's reason")
    ap.add_argument("--models", action="store_true",
                    help="onnx's model cases instead of its node cases: 22 simple multi-node graphs and 9 light "
                         "CNNs (IR 3; folding their ConstantOfShape weights takes minutes and GBs: vgg19's fc6 is 392 MiB)")
    args = ap.parse_args(argv)
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.ERROR  # its per-case warnings drown the table
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # failures are values in the table, not log lines

    dest = args.cache or (cache_dir().with_name(cache_dir().name + "-models") if args.models else cache_dir())
    # a folder given with --cache that already holds cases (e.g. onnx's own test data) is read as it is
    dirs = ensure_suite(dest, regenerate=not (args.cache and any(dest.glob("*/model.onnx"))), models=args.models)
    if args.only:
        rx = re.compile(args.only)
        dirs = [d for d in dirs if rx.search(d.name)]
    env = environment()
    print(f"{len(dirs)} cases from {dest}; {env['cpu']}, onnx {env['onnx']}, onnxruntime {env['onnxruntime']}",
          flush=True)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for k, d in enumerate(dirs):
        t1 = time.perf_counter()
        try:
            cls, line = round_trip(d)
        except Exception as e:  # noqa: BLE001 - reading the case itself failed
            cls, line = "ort_fails", "reading the case: " + first_line(e)
        results[d.name] = {"class": cls, "first_line": line, "seconds": round(time.perf_counter() - t1, 3)}
        if cls in BUGS:
            print(f"  {cls:12s} {d.name}: {line}", flush=True)
        if (k + 1) % 100 == 0:
            print(f"[{k + 1}/{len(dirs)}] {time.perf_counter() - t0:.0f} s", flush=True)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    table = summarize(results)
    print("\n" + table)
    inexact = sorted(n for n, r in results.items() if r["class"] == "pass" and r["first_line"])
    if inexact:
        print(f"\npass, within tolerance but not bitwise identical ({len(inexact)}): {', '.join(inexact)}")
    for c in ["wrong", "run_fails", "export_crash", "load_crash"] + (["refused"] if args.list_refused else []):
        rows = sorted((n, r["first_line"]) for n, r in results.items() if r["class"] == c)
        if rows:
            print(f"\n{c} ({len(rows)}):")
            for n, line in rows:
                print(f"  {n}: {line}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    counts = {c: sum(1 for r in results.values() if r["class"] == c) for c in CLASSES}
    tmp.write_text(json.dumps({"environment": env, "counts": counts, "cases": results}, indent=1, sort_keys=True))
    os.replace(tmp, args.json)
    print(f"\nwrote {args.json} ({env['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
