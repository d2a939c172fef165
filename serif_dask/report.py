"""``serif-dask report``: tables and plots from request records (``run --records``).

Each records file is one run. The report prints a summary table, and writes utility and
latency over time per application, plus a comparison of the runs when there are several
(one run per policy, say), as one self-contained HTML page (Bokeh, inline resources, so
it opens offline) and as PNG pictures (matplotlib: Bokeh's PNG export needs a browser).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("completed", "dropped", "failed")


@dataclass
class RunRecords:
    """One run's records as columns; ``t`` is seconds since the run's first arrival."""

    label: str
    app: np.ndarray  # str
    tick: np.ndarray
    t: np.ndarray
    latency: np.ndarray  # NaN unless completed
    prediction: np.ndarray  # -1 unless completed
    truth: np.ndarray  # -1 when unknown
    utility: np.ndarray
    outcome: np.ndarray  # str
    reason: list[str]

    def __len__(self) -> int:
        return int(self.app.shape[0])

    @property
    def apps(self) -> list[str]:
        return sorted(set(self.app.tolist()))

    def select(self, app: str) -> RunRecords:
        m = self.app == app
        return RunRecords(
            self.label, self.app[m], self.tick[m], self.t[m], self.latency[m],
            self.prediction[m], self.truth[m], self.utility[m], self.outcome[m],
            [r for r, keep in zip(self.reason, m, strict=True) if keep],
        )


def read_records(path: Path, label: str) -> RunRecords:
    """Read a JSONL records file; a clear error names the line that is not a record."""
    rows: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                _ = row["app"], row["arrival"], row["outcome"], row["utility"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a serif-dask record ({exc})") from None
            rows.append(row)

    def col(key: str, default: Any, dtype: Any) -> np.ndarray:
        return np.asarray([default if r.get(key) is None else r[key] for r in rows], dtype)

    arrival = col("arrival", math.nan, float)
    start = float(np.nanmin(arrival)) if rows else 0.0
    return RunRecords(
        label=label,
        app=col("app", "", object).astype(str),
        tick=col("tick", -1, np.int64),
        t=arrival - start,
        latency=col("latency", math.nan, float),
        prediction=col("prediction", -1, np.int64),
        truth=col("label", -1, np.int64),
        utility=col("utility", 0.0, float),
        outcome=col("outcome", "", object).astype(str),
        reason=[r.get("reason") or "" for r in rows],
    )


def run_labels(paths: Sequence[Path], labels: Sequence[str] = ()) -> list[str]:
    """Given labels, else file stems (``sneakpeek.jsonl`` → ``sneakpeek``), made unique."""
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} records files")
        return list(labels)
    stems = [p.stem for p in paths]
    out = []
    for p, stem in zip(paths, stems, strict=True):
        out.append(stem if stems.count(stem) == 1 else f"{p.parent.name}/{stem}")
    if len(set(out)) < len(out):
        out = [f"{i + 1}:{name}" for i, name in enumerate(out)]
    return out


def summarise(run: RunRecords, sla: dict[str, float] | None = None) -> dict[str, Any]:
    """The summary keys of ``serif-dask run`` that records can tell.

    ``deadline_met`` needs each application's SLA, which records do not hold: it is
    ``None`` unless ``sla`` (from the config) covers every application.
    """
    n = len(run)
    done = run.outcome == "completed"
    latency = run.latency[done]
    known = done & (run.truth >= 0)
    utility = float(run.utility.sum())
    reasons: dict[str, int] = {}
    for outcome, reason in zip(run.outcome, run.reason, strict=True):
        if outcome != "completed":
            key = (reason or outcome).split(":", 1)[0]
            reasons[key] = reasons.get(key, 0) + 1
    met: float | None = None
    if sla is not None and all(a in sla for a in run.apps):
        limit = np.asarray([sla[a] for a in run.app], dtype=float)
        met = float((done & (run.latency <= limit)).sum() / n) if n else 0.0
    return {
        "requests": n,
        **{o: int((run.outcome == o).sum()) for o in OUTCOMES},
        "utility": utility,
        "mean_utility": utility / n if n else 0.0,
        "deadline_met": met,
        "accuracy": float((run.prediction[known] == run.truth[known]).mean())
        if known.any() else None,
        "latency_ms": {
            f"p{q}": float(np.percentile(latency, q) * 1000.0) if latency.size else None
            for q in (50, 95, 99)
        },
        "failures_by_reason": dict(sorted(reasons.items())),
    }


def full_summary(run: RunRecords, sla: dict[str, float] | None = None) -> dict[str, Any]:
    result = summarise(run, sla)
    result["per_app"] = {app: summarise(run.select(app), sla) for app in run.apps}
    return result


@dataclass
class TickSeries:
    """Per tick of one application: when it arrived, its mean utility and latencies."""

    t: np.ndarray
    mean_utility: np.ndarray
    p50_ms: np.ndarray  # NaN where nothing completed
    p95_ms: np.ndarray


def tick_series(run: RunRecords) -> TickSeries:
    """``run`` should hold one application (see :meth:`RunRecords.select`)."""
    ticks, inverse = np.unique(run.tick, return_inverse=True)
    t = np.full(ticks.size, np.inf)
    np.minimum.at(t, inverse, run.t)
    counts = np.bincount(inverse, minlength=ticks.size)
    mean_u = np.bincount(inverse, weights=run.utility, minlength=ticks.size) / counts
    p50 = np.full(ticks.size, np.nan)
    p95 = np.full(ticks.size, np.nan)
    for i in range(ticks.size):
        lat = run.latency[(inverse == i) & np.isfinite(run.latency)]
        if lat.size:
            p50[i], p95[i] = np.percentile(lat, (50, 95)) * 1000.0
    order = np.argsort(t, kind="stable")
    return TickSeries(t[order], mean_u[order], p50[order], p95[order])


# -- output -----------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_table(summaries: dict[str, dict[str, Any]]) -> Any:
    """A rich table: one row per run and application, and one for each run's total."""
    from rich.table import Table

    table = Table(title="serif-dask report",
                  caption="mean: utility per request; met: deadline met; latency in ms")
    for i, name in enumerate(("run", "app", "requests", "completed", "dropped", "failed",
                              "utility", "mean", "met", "accuracy", "p50", "p95", "p99")):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
    for label, summary in summaries.items():
        rows = [(app, s) for app, s in summary["per_app"].items()] + [("all", summary)]
        for i, (app, s) in enumerate(rows):
            lat = s["latency_ms"]
            table.add_row(
                label if i == 0 else "", app, f"{s['requests']:,}", f"{s['completed']:,}",
                f"{s['dropped']:,}", f"{s['failed']:,}", f"{s['utility']:.2f}",
                f"{s['mean_utility']:.3f}", _fmt(s["deadline_met"], ".1%"),
                _fmt(s["accuracy"], ".3f"), _fmt(lat["p50"], ".0f"),
                _fmt(lat["p95"], ".0f"), _fmt(lat["p99"], ".0f"),
                style="bold" if app == "all" else None,
                end_section=app == "all",
            )
    return table


def _colors(n: int) -> list[str]:
    from bokeh.palettes import Category10_10

    return [Category10_10[i % 10] for i in range(n)]


def write_html(runs: list[RunRecords], summaries: dict[str, dict[str, Any]],
               path: Path) -> None:
    """One page: utility and latency over time per application, and the comparison."""
    from bokeh.embed import file_html
    from bokeh.layouts import column, gridplot
    from bokeh.models import ColumnDataSource, Div, FactorRange
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    colors = _colors(len(runs))
    apps = sorted({a for r in runs for a in r.apps})
    figures = []
    for app in apps:
        util = figure(title=f"{app}: mean utility per tick", height=280, width=560)
        lat = figure(title=f"{app}: latency per tick (p50 solid, p95 dashed)", height=280,
                     width=560)
        util.xaxis.axis_label = lat.xaxis.axis_label = "seconds since the run started"
        util.yaxis.axis_label = "utility / request"
        lat.yaxis.axis_label = "ms"
        for run, color in zip(runs, colors, strict=True):
            if app not in run.apps:
                continue
            s = tick_series(run.select(app))
            src = ColumnDataSource({"t": s.t, "u": s.mean_utility, "p50": s.p50_ms,
                                    "p95": s.p95_ms})
            util.line("t", "u", source=src, color=color, legend_label=run.label)
            util.scatter("t", "u", source=src, color=color, size=4, legend_label=run.label)
            lat.line("t", "p50", source=src, color=color, legend_label=run.label)
            lat.line("t", "p95", source=src, color=color, line_dash="dashed",
                     legend_label=run.label)
        for fig in (util, lat):
            fig.legend.click_policy = "hide"
            fig.legend.location = "top_left"
        figures.append([util, lat])
    parts: list[Any] = [Div(text=_html_table(summaries)), gridplot(figures)]
    if len(runs) > 1:
        labels = [r.label for r in runs]
        factors = [(app, label) for app in [*apps, "all"] for label in labels]
        data: dict[str, list[Any]] = {"x": [], "mean_utility": [], "p95": [], "missed": [],
                                      "color": []}
        for app, label in factors:
            s = summaries[label] if app == "all" else summaries[label]["per_app"].get(app)
            if s is None:
                s = {"mean_utility": math.nan, "latency_ms": {"p95": None},
                     "requests": 0, "completed": 0}
            data["x"].append((app, label))
            data["mean_utility"].append(s["mean_utility"])
            data["p95"].append(s["latency_ms"]["p95"] or math.nan)
            data["missed"].append(
                1 - s["completed"] / s["requests"] if s["requests"] else math.nan)
            data["color"].append(colors[labels.index(label)])
        src = ColumnDataSource(data)
        bars = []
        for key, title in (("mean_utility", "Mean utility per request"),
                           ("p95", "p95 latency (ms)"),
                           ("missed", "Share dropped or failed")):
            fig = figure(title=title, x_range=FactorRange(*factors), height=300, width=1120)
            fig.vbar(x="x", top=key, width=0.8, color="color", source=src)
            fig.xaxis.major_label_orientation = 0.8
            bars.append(fig)
        parts += [Div(text="<h2>Comparison of runs</h2>"), *bars]
    path.write_text(file_html(column(*parts), INLINE, title="serif-dask report"),
                    encoding="utf-8")


def _html_table(summaries: dict[str, dict[str, Any]]) -> str:
    from html import escape

    head = ("run", "application", "requests", "completed", "dropped", "failed", "utility",
            "mean utility", "deadline met", "accuracy", "p50 ms", "p95 ms", "p99 ms")
    rows = []
    for label, summary in summaries.items():
        for app, s in [*summary["per_app"].items(), ("all", summary)]:
            lat = s["latency_ms"]
            cells = (label, app, s["requests"], s["completed"], s["dropped"], s["failed"],
                     f"{s['utility']:.2f}", f"{s['mean_utility']:.3f}",
                     _fmt(s["deadline_met"], ".1%"), _fmt(s["accuracy"], ".3f"),
                     _fmt(lat["p50"], ".0f"), _fmt(lat["p95"], ".0f"),
                     _fmt(lat["p99"], ".0f"))
            rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells)
                        + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return (f"<h1>serif-dask report</h1><table border=1 cellpadding=4 "
            f"style='border-collapse:collapse'><tr>{header}</tr>{''.join(rows)}</table>")


def write_pngs(runs: list[RunRecords], summaries: dict[str, dict[str, Any]],
               out: Path) -> list[Path]:
    """The same plots as PNG pictures."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colors = _colors(len(runs))
    apps = sorted({a for r in runs for a in r.apps})
    written = []
    for name, ylabel in (("utility", "mean utility per request"), ("latency", "latency (ms)")):
        fig, axes = plt.subplots(max(1, len(apps)), 1, figsize=(9, 3 * max(1, len(apps))),
                                 squeeze=False, constrained_layout=True)
        for ax, app in zip(axes[:, 0], apps, strict=True):
            for run, color in zip(runs, colors, strict=True):
                if app not in run.apps:
                    continue
                s = tick_series(run.select(app))
                if name == "utility":
                    ax.plot(s.t, s.mean_utility, marker=".", color=color, label=run.label)
                else:
                    ax.plot(s.t, s.p50_ms, color=color, label=f"{run.label} p50")
                    ax.plot(s.t, s.p95_ms, color=color, linestyle="--",
                            label=f"{run.label} p95")
            ax.set_title(f"{app}: {name} per tick")
            ax.set_xlabel("seconds since the run started")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if len(runs) > 1:
        labels = [r.label for r in runs]
        groups = [*apps, "all"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
        width = 0.8 / len(labels)
        for ax, (title, get) in zip(axes, (
            ("mean utility per request", lambda s: s["mean_utility"]),
            ("p95 latency (ms)", lambda s: s["latency_ms"]["p95"] or math.nan),
            ("share dropped or failed",
             lambda s: 1 - s["completed"] / s["requests"] if s["requests"] else math.nan),
        ), strict=True):
            for j, (label, color) in enumerate(zip(labels, colors, strict=True)):
                values = []
                for app in groups:
                    s = summaries[label] if app == "all" else summaries[label]["per_app"].get(app)
                    values.append(get(s) if s else math.nan)
                xs = np.arange(len(groups)) + (j - (len(labels) - 1) / 2) * width
                ax.bar(xs, values, width=width, color=color, label=label)
            ax.set_xticks(np.arange(len(groups)), groups)
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize="small")
        path = out / "comparison.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def make_report(
    paths: Iterable[Path], out: Path, *, labels: Sequence[str] = (),
    sla: dict[str, float] | None = None, console: Any = None,
) -> dict[str, Any]:
    """Read records, print the table, write ``report.html``, PNGs and ``summary.json``."""
    paths = [Path(p) for p in paths]
    names = run_labels(paths, labels)
    runs = [read_records(p, name) for p, name in zip(paths, names, strict=True)]
    summaries = {run.label: full_summary(run, sla) for run in runs}
    out.mkdir(parents=True, exist_ok=True)
    if console is not None:
        console.print(summary_table(summaries))
    html = out / "report.html"
    write_html(runs, summaries, html)
    pngs = write_pngs(runs, summaries, out)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return {"summaries": summaries, "files": [html, *pngs, out / "summary.json"]}
