"""Latency over real samples: every candidate is timed on the same K feeds of the select split.

A move whose cost depends on the input values (trim_padding: a sentence of 10 tokens runs 10
tokens, not 128) makes one feed a biased stopwatch: sample 0 may be short or long. So the
driver times each candidate, the original included, over the same K samples spread evenly over
the select split (`timing_feeds`), and the report says so (`describe`).

`measure_feeds(target, artifact, feeds)`:
  - a target with `measure_feeds` (onnxruntime) cycles through the feeds inside its own timing
    loop: each timed repeat runs every feed, the sample is the mean per run, the latency the
    median over repeats;
  - a target that compiles static shapes (`static_shapes`, TVM) takes the same time on any feed
    of the same shapes: one measure() on the first feed (the report says so);
  - any other target: when the run has a move whose time depends on the input values
    (`value_dependent`: a pass with `dynamic_shapes`), one measure() per feed, latency = the
    mean of the per-feed medians (K times the measuring time); else one measure() on the first.
Paired timing (the driver's `_pair`; `--no-paired-timing` turns it off): this host's speed drifts
by 30-50% over seconds (other tenants), longer than one measurement (0.1-0.5 s) and shorter than a
search. So right after each candidate the original is timed again, and the candidate's latency is
put in the original's terms: candidate x (the original's search latency / the original now). The
ranking is then by a ratio measured in one window. Only with one device on this host measured at a
time (--jobs 1; not over RPC, where the next session may reach another device of the key), and
not for cost models (method "estimated"). On EfficientNet-Lite0 / x86 the search
had read x1.55 for an exact move the alternating rounds confirmed at x1.02 (2026-11-29).
Passes whose rewritten graphs have value-dependent shapes (`dynamic_shapes`, trim_padding) are
not applicable to static-shape targets: `static_shape_conflicts` names them for the driver.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

TIMING_SAMPLES = 16


def timing_indices(num_samples: int, k: int = TIMING_SAMPLES) -> list[int]:
    """Up to k sample indices spread evenly over [0, num_samples), first and last included."""
    if num_samples <= 0:
        return [0]
    k = max(1, min(k, num_samples))
    if k == 1:
        return [0]
    return sorted({round(i * (num_samples - 1) / (k - 1)) for i in range(k)})


def timing_feeds(data: Any, k: int = TIMING_SAMPLES) -> list[dict]:
    """The feeds every candidate is timed on: k samples spread over `data` (the select split)."""
    return [data.sample(i) for i in timing_indices(int(data.num_samples), k)]


def how(target: Any, n: int, split: str = "select", value_dependent: bool = True) -> str:
    """How a latency over `n` feeds was obtained on `target`, in words."""
    if n <= 1:
        return f"latency: on 1 {split} sample"
    if hasattr(target, "measure_feeds"):
        return f"latency: mean over {n} {split} samples (cycled in the timing loop), median of the timed repeats"
    if getattr(target, "static_shapes", False):
        return (f"latency: on 1 {split} sample of {n} (target {getattr(target, 'name', '?')} compiles static shapes: "
                "the time does not depend on the values)")
    if not value_dependent:
        return f"latency: on 1 {split} sample (no move of this run makes the time depend on the input values)"
    return f"latency: mean over {n} {split} samples of the per-sample medians (one measurement per sample)"


def measure_feeds(target: Any, artifact: Any, feeds: Sequence[Mapping[str, Any]], value_dependent: bool = True):
    """One Measurement of `artifact` over `feeds` (see the module docstring)."""
    from .plugin import LatencyStats, Measurement

    feeds = list(feeds)
    if hasattr(target, "measure_feeds") and len(feeds) > 1:
        m = target.measure_feeds(artifact, feeds)
    elif len(feeds) == 1 or getattr(target, "static_shapes", False) or not value_dependent:
        m = target.measure(artifact, feeds[0])
        if not isinstance(m, Measurement):  # a plugin's slip, named (it surfaced as an AttributeError here)
            raise TypeError(f"{type(target).__name__}.measure() returned {type(m).__name__}, not a Measurement")
    else:
        ms = [target.measure(artifact, f) for f in feeds]
        meds = [x.latency.median_ms for x in ms]
        first = ms[0]
        lat = LatencyStats(median_ms=statistics.fmean(meds), mean_ms=statistics.fmean(x.latency.mean_ms for x in ms),
                           min_ms=min(x.latency.min_ms for x in ms), max_ms=max(x.latency.max_ms for x in ms),
                           stdev_ms=statistics.stdev(meds) if len(meds) > 1 else 0.0,
                           repeats=first.latency.repeats, runs_per_repeat=first.latency.runs_per_repeat)
        m = Measurement(latency=lat, method=first.method, tuned=first.tuned, threads=first.threads,
                        device=first.device, extra=dict(first.extra, per_sample_ms=meds))
    m.extra = dict(m.extra, latency_over=how(target, len(feeds), value_dependent=value_dependent))
    return m


def static_shape_conflicts(passes: Mapping[str, Any], target_cls: Any) -> dict[str, str]:
    """{pass name: why it is not applicable} for passes with value-dependent shapes on a target
    that compiles static shapes."""
    if not getattr(target_cls, "static_shapes", False):
        return {}
    tname = getattr(target_cls, "name", "?")
    return {name: (f"pass {name} is not applicable to target {tname}: its graphs have shapes that depend on the "
                   f"input values, and {tname} compiles static shapes (TVM); use --target ort")
            for name, p in passes.items() if getattr(p, "dynamic_shapes", False)}
