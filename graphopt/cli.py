"""The `graphopt` command. Heavy imports (onnx, tvm, torch) happen inside the commands."""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from typing import Any, Sequence

from ._version import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, GraphoptError, UsageError

EXIT_CODES = """\
exit codes:
  0    success: best.onnx and report.json written (best.onnx is the original if nothing beat it)
  1    internal error (a bug: rerun with --debug and report the traceback)
  2    bad input or usage: unreadable/invalid model, op onnxruntime cannot run, dynamic input
       without --shape, --data that does not match the inputs, unknown name, bad flag,
       unwritable --out
  3    no candidate met the constraints, not even the original (e.g. it fails to compile
       for the target); report.json says why
  4    target unreachable (RPC tracker/server, GPU)
  130  interrupted (Ctrl-C): the run store and a report of what was done are kept
  143  terminated (SIGTERM: timeout, docker stop, systemd, CI): the same as Ctrl-C
"""

RUN_EXAMPLES = """\
examples:
  graphopt run models/efficientnet_lite0.onnx --target ort --passes conv_bn --budget 10 \\
      --data models/efficientnet_lite0_calib.npz --out out/effnet
  graphopt run model.onnx --target x86 --budget 5m --shape input=1x3x224x224 --json > result.json

Writes to --out: best.onnx, report.json and runs.sqlite (one row per candidate). Running again
with the same --out resumes: candidates already in runs.sqlite are not measured again.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    json_errors = False  # --json was given: errors also go to stdout as JSON (_error)

    def error(self, message: str) -> None:  # one line, exit 2, no usage dump on stderr noise
        self.print_usage(sys.stderr)
        sys.exit(_error(EXIT_USAGE, message, _Parser.json_errors))


_ERROR_STATUS = {EXIT_USAGE: "usage error", EXIT_INTERNAL: "internal error", EXIT_INTERRUPTED: "interrupted"}


def _error(code: int, message: str, as_json: bool, prefix: str | None = "error") -> int:
    """An error that ends a command: one line on stderr; with --json also one object on stdout, so a
    build system reading stdout always gets JSON: {"status", "exit_code", "error"}."""
    sys.stderr.write(f"graphopt: {prefix}: {message}\n" if prefix else f"graphopt: {message}\n")
    if as_json:
        json.dump({"status": _ERROR_STATUS.get(code, "unreachable" if code == 4 else "error"), "exit_code": code,
                   "error": message}, sys.stdout)
        sys.stdout.write("\n")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", formatter_class=_Formatter,
                description="Compiler-aware ONNX graph optimizer: searches rewrites of a model (passes) for the "
                            "fastest graph on a target that stays faithful to the original's outputs.",
                epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="search for the fastest faithful graph on a target",
                         formatter_class=_Formatter, epilog=RUN_EXAMPLES + "\n" + EXIT_CODES,
                         description="Import MODEL, build the search space from the enabled passes, search within "
                                     "the budget, and write the best candidate that meets --min-fidelity.")
    run.add_argument("model", help="path of the input .onnx model (never modified)")
    run.add_argument("--target", required=True, metavar="NAME",
                     help="where candidates are compiled and timed (`graphopt list targets`): ort, x86, ...")
    run.add_argument("--passes", default="conv_bn", metavar="P1,P2",
                     help="comma-separated passes that make the search space (default: conv_bn; `graphopt list passes`)")
    run.add_argument("--strategy", default="random", metavar="NAME",
                     help="search strategy (default: random; `graphopt list strategies`)")
    run.add_argument("--budget", default="20", metavar="N|TIME",
                     help="candidates to try besides the original (20) or wall time (90s, 5m, 1h); default 20")
    run.add_argument("--data", metavar="SPEC",
                     help="real inputs: an .npz keyed by input name (each [samples, *input_shape]; optional "
                          "'labels'), a folder of .npz/.npy shards, or a Python loader module:function (or "
                          "file.py:function) returning a dataset or yielding feed dicts / (feeds, label). Split "
                          "into fit (calibration, repair, distillation), select (the gate) and held-out (reported "
                          "only). Without it inputs are synthesized, and moves that fit to data are refused")
    run.add_argument("--eval-data", metavar="SPEC",
                     help="held-out data (same forms as --data), e.g. a labelled test set: the number the report "
                          "shows, used for no choice; then --data is split into fit and select only")
    run.add_argument("--allow-synthetic", action="store_true",
                     help="let moves that fit to data (static int8 calibration, least-squares repair, "
                          "distillation, data-driven channel choice) run on synthetic inputs when there is no "
                          "--data; the report then says the result is NOT to be trusted")
    run.add_argument("--metric", default="channel", metavar="NAME",
                     help="the gate's metric (`graphopt list metrics`): channel (default: worst output channel, "
                          "each on its own scale), cosine, top1, rel_l2, imagenet_top1, sts_spearman, or "
                          "module:function(original, candidate, labels, extras)")
    run.add_argument("--task-metric", metavar="NAME",
                     help="the metric reported on the held-out split (default: the gate's --metric)")
    run.add_argument("--min-fidelity", type=float, default=None, metavar="F",
                     help="a candidate is feasible only if its metric >= F on the select split (default 0.99 for "
                          "a similarity metric unless --max-drop is given)")
    run.add_argument("--max-drop", type=float, default=None, metavar="D",
                     help="a candidate is feasible only if its metric >= the original's - D on the select split "
                          "(points of a task metric, e.g. 0.5; default for a task metric: 1.0)")
    run.add_argument("--select-samples", type=int, metavar="N", help="cap of the select split (default 256)")
    run.add_argument("--eval-samples", type=int, metavar="N", help="cap of the held-out split (default 5000)")
    run.add_argument("--calib-samples", type=int, metavar="N",
                     help="fit samples held in memory for calibration and least-squares repair (default 64)")
    run.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2...",
                     help="fix an input's shape, required for dynamic dimensions (repeatable)")
    run.add_argument("--max-size-mb", type=float, metavar="MB",
                     help="a candidate is feasible only if its ONNX size is at most MB")
    run.add_argument("--max-latency-ms", type=float, metavar="MS",
                     help="a candidate is feasible only if its median latency is at most MS")
    run.add_argument("--search-exact", action="store_true",
                     help="search each exact move (conv_bn, fused attention) site by site; default: one on/off gene "
                          "per pass, since exact moves at different sites compute the same function")
    run.add_argument("--seed", type=int, default=0, help="seed for the strategy and synthetic data (default: 0)")
    run.add_argument("--out", default="graphopt-out", metavar="DIR",
                     help="output directory (default: graphopt-out); reused = resumed")
    run.add_argument("--no-repair", action="store_true",
                     help="do not refit weights after approximate moves (default: least-squares repair on the calibration inputs)")
    run.add_argument("--confirm-rounds", type=int, default=3, metavar="N",
                     help="at the end, re-measure the best (and up to 2 runners-up) alternately with the original for "
                          "N rounds; the one faster in every round by the most is measured in N fresh rounds and kept if "
                          "faster in most; the report's speedup is the fresh rounds' (default 3; 0: off)")
    run.add_argument("--no-paired-timing", action="store_true",
                     help="do not time the original again right after each candidate (default: it does, and ranks "
                          "each candidate by its ratio to the original in the same window of the host's load; "
                          "one local device at a time: not over RPC, not for a cost model)")
    run.add_argument("--no-ort-reference", action="store_true",
                     help="x86 timed here: do not time onnxruntime on the kept graph and the original at the end "
                          "(default: it does, so the report says whether the compiled build beat onnxruntime)")
    run.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                     help="after the moves (and repair), train each candidate's changed weights for STEPS Adam steps "
                          "so its outputs match the original's on the calibration data (distillation; needs torch; "
                          "seconds per candidate on small models, minutes on large ones); default 0: off")
    run.add_argument("--recover-top", type=int, default=0, metavar="K",
                     help="after the search, distil the K most promising candidates toward the original on the fit "
                          "half of --data (intermediate features + outputs; needs torch), keep the weights best on "
                          "the select half, and measure them as new candidates; default 0: off")
    run.add_argument("--recover-time", metavar="TIME",
                     help="time for --recover-top, inside --budget (90s, 5m; default: half of a time budget, "
                          "else 2 min per candidate)")
    run.add_argument("--recover-train", default="changed", choices=["changed", "all", "tail"],
                     help="what --recover-top trains: the weights the moves changed (default), every weight, or the "
                          "last third of the weights on cached activations (tail: graphopt.recovery.recover_tail)")
    run.add_argument("--recover-loss", default="mse", choices=["mse", "kl"],
                     help="--recover-top's output loss: normalised MSE (default) or KL of the softmax (classifiers; "
                          "what the `resolution` pass needs, docs/effnet_moves.md)")
    run.add_argument("--threads", type=int, metavar="N", help="threads the target's runtime uses (default: all cores)")
    run.add_argument("--tune-trials", type=int, metavar="N",
                     help="TVM targets: MetaSchedule trials per workload the tuning database lacks "
                          "(default 8, or $GRAPHOPT_TUNE_TRIALS; 0 = untuned default schedules)")
    run.add_argument("--tuning-db", metavar="DIR",
                     help="TVM targets: root of the persistent tuning databases, one sub-folder per target "
                          "(default $GRAPHOPT_TUNING_DB or ~/.cache/graphopt/tuning)")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="measure up to N candidates at once on the devices behind an RPC tracker (several "
                          "devices under one key), compiling the next candidates meanwhile; default 1. "
                          "Results are told to the strategy as they land, so seeded runs repeat only with 1")
    run.add_argument("--compile-workers", type=int, default=1, metavar="M",
                     help="compile up to M candidates at once in M worker processes while the devices measure "
                          "(each worker imports the compiler, ~0.5 GB; tuning targets share one tuning database "
                          "under a file lock); default 1: compile in this process. M > 1 needs devices behind an "
                          "RPC tracker, as --jobs > 1 does, and turns on the pipelined loop even with --jobs 1")
    run.add_argument("--cluster", metavar="ADDRESS",
                     help="compile (and tune) candidates as Ray tasks on a cluster's workers, each declaring the "
                          "resource tvm_compiler (ray start ... --resources '{\"tvm_compiler\": 1}'); ADDRESS: auto, "
                          "HOST:PORT or ray://HOST:PORT; devices measure through the tracker as with --jobs. "
                          "Needs pip install 'graphopt[cluster]'")
    run.add_argument("--estimate", action="store_true",
                     help="latencies from the target's cost model instead of a device (alias of --target-opt "
                          "estimate=1; targets that can estimate: rpi4); reported as 'estimated'")
    run.add_argument("--target-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="target-specific option (repeatable), e.g. --target-opt repeat=10 "
                          "(each target's options: `graphopt list targets`)")
    run.add_argument("--pass-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="pass option (repeatable), e.g. --pass-opt width_importance=l2 (`graphopt list passes`)")
    run.add_argument("--strategy-opt", action="append", default=[], metavar="KEY=VALUE",
                     help="strategy option (repeatable), e.g. --strategy-opt mode=int8 (sensitivity) or "
                          "--strategy-opt then=evolutionary")
    run.add_argument("--json", action="store_true", help="print report.json to stdout (logs stay on stderr)")
    run.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    run.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")

    lst = sub.add_parser("list", help="list registered passes, targets or strategies",
                         description="List the registered plugins of one kind, built-in and from entry points.")
    lst.add_argument("kind", choices=["passes", "targets", "strategies", "metrics"])

    ins = sub.add_parser("inspect", help="inputs, op histogram, params/FLOPs, and the sites each pass would act on",
                         formatter_class=_Formatter,
                         description="Describe MODEL: inputs and shapes, op histogram, parameters and FLOPs per "
                                     "node and in total, and for each pass the sites it would act on.")
    ins.add_argument("model", help="the .onnx model to describe (read only)")
    ins.add_argument("--passes", default=None, metavar="P1,P2", help="passes to ask for sites (default: all)")
    ins.add_argument("--shape", action="append", default=[], metavar="NAME=D1xD2...",
                     help="fix a symbolic input dimension, as for run")
    ins.add_argument("--top", type=_positive_int, default=15, help="most expensive nodes to show (default: 15)")
    ins.add_argument("--json", action="store_true", help="print the description as JSON")
    ins.add_argument("--debug", action="store_true", help="tracebacks on errors")

    runs = sub.add_parser("runs", help="list the candidates of a run (from its runs.sqlite)",
                          description="List the candidates in OUT_DIR/runs.sqlite; * marks the Pareto front "
                                      "(latency, fidelity, size).")
    runs.add_argument("out_dir", help="a run's --out folder")
    runs.add_argument("--sort", default="latency", choices=["id", "latency", "fidelity", "size"],
                      help="order of the rows (default: latency)")
    runs.add_argument("--json", action="store_true", help="print the candidates as JSON")

    exp = sub.add_parser("export", help="write one candidate of a run as an ONNX model",
                         description="Rebuild candidate ID of the run in OUT_DIR (its moves on the original model) "
                                     "and write it to -o, e.g. another point on the Pareto front.")
    exp.add_argument("out_dir", help="a run's --out folder")
    exp.add_argument("--candidate", type=int, required=True, metavar="ID", help="its id (`graphopt runs OUT_DIR`)")
    exp.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                     help="where to write it (never the run's own files or the input model)")

    rep = sub.add_parser("report", help="re-render report.html of a run from report.json and runs.sqlite",
                         description="Write OUT_DIR/report.html again from OUT_DIR/report.json and runs.sqlite "
                                     "(e.g. after a graphopt upgrade); nothing is measured.")
    rep.add_argument("out_dir", help="a run's --out folder")
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive whole number")
    return v


def _setup_logging(quiet: bool = False, debug: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphopt: %(message)s"))
    root = logging.getLogger("graphopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _parse_kv(items: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    from .modelio.ir import parse_shape

    return dict(parse_shape(s) for s in items)


def _pass_names(text: str) -> list[str]:
    """'conv_bn, depthwise' -> ['conv_bn', 'depthwise']; '' -> [] (the original only); ',,' is an error."""
    if not text.strip():
        return []
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise UsageError(f"--passes {text!r}: an empty pass name; give comma-separated names, e.g. "
                         "--passes conv_bn,depthwise (`graphopt list passes`)")
    return names


def cmd_run(args: argparse.Namespace) -> int:
    from .driver import Budget, RunConfig, run_search
    from .errors import EXIT_INTERRUPTED
    from .runstore.rundir import EXIT_TERMINATED, TerminateAsInterrupt, cap_threads

    target_options = _parse_kv(args.target_opt, "--target-opt")
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads {args.threads}: must be a positive number")
        target_options["threads"] = args.threads
    if args.estimate:
        target_options["estimate"] = _estimate_option(args.target, target_options.get("estimate", 1))
    for flag, key, value in (("--tune-trials", "trials", args.tune_trials), ("--tuning-db", "tuning_db", args.tuning_db)):
        if value is not None:
            from .registry import TARGETS

            if not getattr(TARGETS.get(args.target), "tunable", False):
                raise UsageError(f"{flag}: target {args.target!r} does not tune; it applies to the TVM targets "
                                 "(x86, rpi4, cuda)")
            target_options[key] = value
    cap_threads(args.target, target_options)  # at the CPUs this machine has, for a target measured here
    cfg = RunConfig(model=args.model, target=args.target, passes=_pass_names(args.passes),
                    strategy=args.strategy, budget=Budget.parse(args.budget), data=args.data, metric=args.metric,
                    min_fidelity=args.min_fidelity, shapes=_shapes(args.shape), seed=args.seed, out=args.out,
                    target_options=target_options, max_size_mb=args.max_size_mb,
                    max_latency_ms=args.max_latency_ms, progress=not (args.json or args.quiet),
                    pass_options={"repair": not args.no_repair,
                                  **({"recover_loss": args.recover_loss} if args.recover_loss != "mse" else {}),
                                  **_parse_kv(args.pass_opt, "--pass-opt")},
                    finetune_steps=args.finetune,
                    jobs=args.jobs, compile_workers=args.compile_workers, search_exact=args.search_exact,
                    strategy_options=_parse_kv(args.strategy_opt, "--strategy-opt"), recover_top=args.recover_top,
                    recover_seconds=_recover_seconds(args.recover_time), recover_train=args.recover_train,
                    cluster=args.cluster, ort_reference=not args.no_ort_reference,
                    confirm_rounds=args.confirm_rounds, paired_timing=not args.no_paired_timing,
                    eval_data=args.eval_data,
                    allow_synthetic=args.allow_synthetic, max_drop=args.max_drop, task_metric=args.task_metric,
                    select_samples=args.select_samples, eval_samples=args.eval_samples,
                    calib_samples=args.calib_samples)
    with TerminateAsInterrupt() as term:  # SIGTERM: stop, keep the store, write the report (like Ctrl-C)
        try:
            result = run_search(cfg)
        except KeyboardInterrupt:
            if not term.received:
                raise
            sys.stderr.write("graphopt: terminated (SIGTERM)\n")
            return EXIT_TERMINATED
    rep = result.report
    if args.json:
        json.dump(rep, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        if rep.get("why"):  # exit 3: the reason on stderr too
            sys.stderr.write(f"graphopt: {rep['why']}\n")
    else:
        print(summary(rep))
    return EXIT_TERMINATED if term.received and result.exit_code == EXIT_INTERRUPTED else result.exit_code


def _recover_seconds(text: str | None) -> float | None:
    from .recovery.recover import parse_seconds

    return parse_seconds(text)


def _estimate_option(target: str, value: Any) -> Any:
    """--estimate: the target must take an `estimate` option (a cost model), e.g. rpi4."""
    import inspect as _inspect

    from .registry import TARGETS, parse_names

    parse_names(TARGETS, [target])
    cls = TARGETS.get(target)
    if "estimate" not in _inspect.signature(cls).parameters:
        able = [n for n in TARGETS.names()
                if "estimate" in _inspect.signature(TARGETS.get(n)).parameters]
        raise UsageError(f"--estimate: target {target!r} has no cost model, it only measures; targets that can "
                         f"estimate: {', '.join(able) or 'none'} (drop --estimate to measure on {target})")
    if str(value).strip().lower() in ("0", "false", "no", "off"):
        raise UsageError("--estimate contradicts --target-opt estimate=0; drop one of them")
    return 1


def summary(rep: dict[str, Any]) -> str:
    """The lines `graphopt run` prints for report.json (graphopt.reporting.summary)."""
    from .reporting.summary import summary as lines

    return lines(rep)


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import REGISTRIES

    rows = REGISTRIES[args.kind].describe()
    width = max((len(n) for n, _ in rows), default=0)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
        for line in REGISTRIES[args.kind].describe_options(name):  # its declared OPTIONS
            print(f"{'':<{width}}    {line}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnxruntime

    from .reporting.inspection import format_inspection, inspect_model

    if not args.debug:
        onnxruntime.set_default_logger_severity(3)

    info = inspect_model(args.model, passes=args.passes, shapes=_shapes(args.shape), top=args.top)
    if args.json:
        json.dump({k: v for k, v in info.items() if not k.startswith("_")}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(format_inspection(info))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .reporting.pareto import front_ids
    from .reporting.report import FRONT_RESOLUTION
    from .runstore.runs import format_runs, list_runs

    recs = list_runs(args.out_dir, args.sort)
    front = front_ids(recs, resolution=FRONT_RESOLUTION)
    if args.json:
        json.dump([dict(r.to_dict(), pareto=r.id in front) for r in recs], sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(format_runs(recs, front))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .runstore.runs import export_candidate

    path = export_candidate(args.out_dir, args.candidate, args.output)
    print(f"candidate {args.candidate} written to {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runstore.runs import rerender

    print(rerender(args.out_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _Parser.json_errors = "--json" in (sys.argv[1:] if argv is None else [str(a) for a in argv])
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    as_json = bool(getattr(args, "json", False))
    _setup_logging(quiet=getattr(args, "quiet", False), debug=debug)
    try:
        return {"run": cmd_run, "list": cmd_list, "inspect": cmd_inspect, "runs": cmd_runs, "export": cmd_export,
                "report": cmd_report}[args.command](args)
    except GraphoptError as e:
        if debug:
            logging.getLogger("graphopt").exception("error")
        return _error(e.exit_code, str(e), as_json)
    except KeyboardInterrupt:
        return _error(EXIT_INTERRUPTED, "interrupted", as_json, prefix=None)
    except sqlite3.DatabaseError as e:  # a run store found broken after it was opened (truncated mid-file)
        from .runstore.rundir import is_corrupt

        if not is_corrupt(e):
            if debug:
                raise
            return _error(EXIT_INTERNAL, f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", as_json,
                          prefix="internal error")
        if debug:
            logging.getLogger("graphopt").exception("error")
        return _error(EXIT_USAGE, f"the run store is not readable ({e}); move runs.sqlite away (the run starts "
                      "over) or choose another --out", as_json)
    except BrokenPipeError:  # `graphopt run ... --json | head`
        return 0
    except Exception as e:  # a bug: one line unless --debug
        if debug:
            raise
        return _error(EXIT_INTERNAL, f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", as_json,
                      prefix="internal error")


if __name__ == "__main__":
    sys.exit(main())
