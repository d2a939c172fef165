"""The ``/individual-serif`` page on the Dask dashboard, and ``/metrics``.

:func:`register` runs when the scheduler plugin is constructed, which is after the
scheduler has started its dashboard (``--preload serif_dask.scheduler`` and
``client.run_on_scheduler`` both run then). So rather than adding to
``distributed.dashboard.scheduler.applications`` (read once, when the dashboard starts),
it mounts one more Bokeh server application on the scheduler's HTTP application, the way
Dask mounts its own, and adds a link to the dashboard's "More..." menu.

The page only reads the plugin's in-memory state, once a second per open page, on the
scheduler's event loop: no Redis, no disk, and no control actions.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bokeh.document import Document
    from distributed.scheduler import Scheduler

    from serif_dask.scheduler import SerifSchedulerPlugin

logger = logging.getLogger("serif_dask.dashboard")

PATH = "/individual-serif"
TITLE = "Serif"
UPDATE_MS = 1000
PLUGIN_NAME = "serif"


def register(scheduler: Scheduler, plugin: SerifSchedulerPlugin) -> bool:
    """Expose ``plugin`` on ``/metrics`` and add the page; True if the page is served.

    Idempotent: a second plugin on the same scheduler reuses the page, which always
    reads whichever plugin is installed under ``"serif"``.
    """
    from serif_dask import memory, metrics

    try:
        memory.install(scheduler)
    except Exception:
        logger.exception("serif: could not sample the processes' memory")
    try:
        metrics.register(plugin)
    except Exception:
        logger.exception("serif: could not expose metrics on /metrics")
    return add_page(scheduler)


def add_page(scheduler: Scheduler) -> bool:
    """Mount the page next to Dask's own pages, if this scheduler has a dashboard."""
    http_app = getattr(scheduler, "http_application", None)
    if http_app is None:
        return False
    try:
        from bokeh.server.server import BokehTornado
        from distributed.dashboard.core import BokehApplication
    except ImportError:  # no (suitable) bokeh: Dask runs without a dashboard as well
        return False
    bokeh_apps = [a for a in http_app.applications if isinstance(a, BokehTornado)]
    if not bokeh_apps:  # started with dashboard=False
        return False
    if any(PATH in a.app_paths for a in bokeh_apps):
        return True
    variables = _template_variables(scheduler)
    app = BokehApplication(
        {PATH: serif_doc}, scheduler, prefix=bokeh_apps[0].prefix,
        template_variables=variables,
    )
    http_app.add_application(app)  # stopped with Dask's own by Scheduler.close
    app.initialize(scheduler.loop)
    app.start()
    return True


def _template_variables(scheduler: Scheduler) -> dict[str, Any]:
    """Dask's navigation (shared by every page), with a link to ours under "More..."."""
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:
        return {}
    variables = template_variables(scheduler)  # memoised: the dict Dask's pages render
    plots = variables.get("plots")
    if isinstance(plots, list) and not any(p.get("url") == PATH[1:] for p in plots):
        plots.append({"url": PATH[1:], "name": TITLE})
        plots.sort(key=lambda p: p.get("name", ""))
    return variables


def serif_doc(scheduler: Scheduler, extra: dict[str, Any], doc: Document) -> None:
    """Bokeh document factory, one per browser session."""
    page = SerifPage(scheduler)
    page.update()
    doc.add_periodic_callback(page.update, UPDATE_MS)
    doc.title = "Dask: Serif"
    doc.add_root(page.root)
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except Exception:  # Dask's look is nice to have; the page works without it
        logger.debug("serif: Dask's dashboard template is unavailable", exc_info=True)


def positive_share(pi: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """π of "not the usual class": 1 − π[most likely class a priori] (π[1] for K = 2)."""
    pi = np.asarray(pi, dtype=float)
    if pi.ndim != 2 or pi.shape[1] == 0:
        return np.zeros(0)
    usual = int(np.argmax(prior)) if prior is not None and len(prior) else 0
    return 1.0 - pi[:, usual]


def percentiles_ms(samples: Any) -> tuple[float, float, float]:
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        return (math.nan, math.nan, math.nan)
    p50, p95, p99 = np.percentile(values, (50, 95, 99)) * 1000.0
    return float(p50), float(p95), float(p99)


class SerifPage:
    """The plots of one open page, refreshed from the plugin by :meth:`update`."""

    def __init__(self, scheduler: Scheduler):
        from bokeh.layouts import column, row
        from bokeh.models import (
            ColorBar,
            ColumnDataSource,
            DataTable,
            Div,
            FactorRange,
            HoverTool,
            LinearColorMapper,
            NumberFormatter,
            TableColumn,
        )
        from bokeh.palettes import Category10_10, Viridis256
        from bokeh.plotting import figure

        self.scheduler = scheduler
        self.palette = Category10_10
        self._failed_once = False
        self.header = Div(text="", sizing_mode="stretch_width")

        common: dict[str, Any] = {"height": 260, "sizing_mode": "stretch_width",
                                  "tools": "pan,wheel_zoom,box_zoom,reset,save"}
        self.utility_fig = figure(title="Mean utility per tick", x_axis_type="datetime",
                                  **common)
        self.met_fig = figure(title="Deadline met per tick", x_axis_type="datetime",
                              y_range=(0, 1.05), **common)
        self.utility_fig.yaxis.axis_label = "utility / request"
        self.met_fig.yaxis.axis_label = "share within SLA"
        self.timeline_sources: dict[str, ColumnDataSource] = {}

        self.latency_source = ColumnDataSource(
            {"x": [], "ms": [], "color": []}, name="serif-latency"
        )
        self.latency_fig = figure(
            title="Latency percentiles, recent completed requests (ms)",
            x_range=FactorRange(), **common,
        )
        self.latency_fig.vbar(x="x", top="ms", width=0.8, color="color",
                              source=self.latency_source)
        self.latency_fig.add_tools(HoverTool(tooltips=[("", "@x"), ("ms", "@ms{0.0}")]))
        self.latency_fig.xaxis.major_label_orientation = 0.6

        self.decision_source = ColumnDataSource({"i": [], "ms": []}, name="serif-decision")
        self.decision_fig = figure(title="Policy decision time per plan (ms)", **common)
        self.decision_fig.line(x="i", y="ms", source=self.decision_source)
        self.decision_fig.scatter(x="i", y="ms", source=self.decision_source, size=3)
        self.decision_fig.xaxis.axis_label = "recent plans"

        self.pi_source = ColumnDataSource({"group": [], "app": [], "p": []}, name="serif-pi")
        mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=1.0)
        self.pi_fig = figure(
            title="SneakPeek estimates: chance each group is not in its usual class",
            y_range=FactorRange(), height=220, sizing_mode="stretch_width",
            tools="hover,save", tooltips=[("group", "@group"), ("app", "@app"),
                                          ("π", "@p{0.000}")],
        )
        self.pi_fig.rect(x="group", y="app", width=1, height=1, source=self.pi_source,
                         fill_color={"field": "p", "transform": mapper}, line_color=None)
        self.pi_fig.add_layout(ColorBar(color_mapper=mapper, width=8), "right")
        self.pi_fig.xaxis.axis_label = "group"
        self.pi_fig.grid.visible = False

        self.apps_source = ColumnDataSource(
            {k: [] for k in ("app", "requests", "completed", "dropped", "failed",
                             "utility", "mean_utility", "deadline_met", "p50", "p95",
                             "p99")},
            name="serif-apps",
        )
        num = NumberFormatter(format="0,0")
        dec = NumberFormatter(format="0.000")
        self.apps_table = DataTable(
            source=self.apps_source, height=140, sizing_mode="stretch_width",
            index_position=None,
            columns=[
                TableColumn(field="app", title="application"),
                TableColumn(field="requests", title="requests", formatter=num),
                TableColumn(field="completed", title="completed", formatter=num),
                TableColumn(field="dropped", title="dropped", formatter=num),
                TableColumn(field="failed", title="failed", formatter=num),
                TableColumn(field="utility", title="utility", formatter=dec),
                TableColumn(field="mean_utility", title="mean utility", formatter=dec),
                TableColumn(field="deadline_met", title="deadline met",
                            formatter=NumberFormatter(format="0.0%")),
                TableColumn(field="p50", title="p50 ms", formatter=num),
                TableColumn(field="p95", title="p95 ms", formatter=num),
                TableColumn(field="p99", title="p99 ms", formatter=num),
            ],
        )

        self.workers_source = ColumnDataSource(
            {"name": [], "role": [], "warm": [], "n_warm": [], "backlog": [],
             "pending": []},
            name="serif-workers",
        )
        self.workers_table = DataTable(
            source=self.workers_source, height=180, sizing_mode="stretch_width",
            index_position=None,
            columns=[
                TableColumn(field="name", title="worker"),
                TableColumn(field="role", title="role"),
                TableColumn(field="warm", title="warm models (least recent first)"),
                TableColumn(field="backlog", title="backlog s", formatter=dec),
                TableColumn(field="pending", title="queued batches", formatter=num),
            ],
        )
        self.backlog_source = ColumnDataSource(
            {"name": [], "backlog": [], "n_warm": []}, name="serif-backlog"
        )
        self.backlog_fig = figure(title="Compute workers: booked backlog (s)",
                                  y_range=FactorRange(), **common)
        self.backlog_fig.hbar(y="name", right="backlog", height=0.7,
                              source=self.backlog_source)
        self.backlog_fig.add_tools(HoverTool(tooltips=[
            ("worker", "@name"), ("backlog s", "@backlog{0.000}"),
            ("warm models", "@n_warm")]))

        self.reasons_source = ColumnDataSource({"label": [], "count": []},
                                               name="serif-reasons")
        self.reasons_fig = figure(title="Dropped and failed requests by reason",
                                  y_range=FactorRange(), **common)
        self.reasons_fig.hbar(y="label", right="count", height=0.7, color="#d62728",
                              source=self.reasons_source)
        self.reasons_fig.add_tools(HoverTool(tooltips=[("", "@label"), ("n", "@count")]))

        self.memory_fig = figure(title="Resident memory per process (MB)",
                                 x_axis_type="datetime", **common)
        self.memory_fig.yaxis.axis_label = "MB"
        self.memory_sources: dict[str, ColumnDataSource] = {}
        self.memory_source = ColumnDataSource(
            {"name": [], "role": [], "mb": []}, name="serif-memory")
        self.memory_table = DataTable(
            source=self.memory_source, height=180, sizing_mode="stretch_width",
            index_position=None,
            columns=[
                TableColumn(field="name", title="process"),
                TableColumn(field="role", title="role"),
                TableColumn(field="mb", title="resident MB",
                            formatter=NumberFormatter(format="0,0.0")),
            ],
        )

        self.root = column(
            self.header,
            self.apps_table,
            row(self.utility_fig, self.met_fig, sizing_mode="stretch_width"),
            row(self.latency_fig, self.decision_fig, sizing_mode="stretch_width"),
            self.pi_fig,
            row(self.workers_table, self.backlog_fig, sizing_mode="stretch_width"),
            self.reasons_fig,
            row(self.memory_table, self.memory_fig, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

    # -- refresh ----------------------------------------------------------------------
    def plugin(self) -> SerifSchedulerPlugin | None:
        return self.scheduler.plugins.get(PLUGIN_NAME)  # type: ignore[return-value]

    def update(self) -> None:
        """Periodic callback: never raise (Bokeh would log it every second)."""
        try:
            plugin = self.plugin()
            if plugin is None:
                self.header.text = "<b>serif</b>: the scheduler plugin is not installed"
                return
            self._update(plugin)
        except Exception:
            if not self._failed_once:
                self._failed_once = True
                logger.exception("serif: dashboard update failed")

    def _update(self, plugin: SerifSchedulerPlugin) -> None:
        from serif_dask.metrics import telemetry

        tel = telemetry(plugin)
        apps = sorted(plugin.metrics)
        prior = {}
        if plugin.config is not None:
            prior = {a.name: np.asarray(a.prior, dtype=float) for a in plugin.config.apps}

        # totals and latency percentiles
        rows: dict[str, list[Any]] = {k: [] for k in self.apps_source.data}
        lat_x, lat_ms, lat_color = [], [], []
        for i, app in enumerate(apps):
            m = plugin.metrics[app]
            p = percentiles_ms(m.latencies)
            n = m.requests
            for key, value in (
                ("app", app), ("requests", n), ("completed", m.completed),
                ("dropped", m.dropped), ("failed", m.failed), ("utility", m.utility),
                ("mean_utility", m.utility / n if n else 0.0),
                ("deadline_met", m.deadline_met / n if n else 0.0),
                ("p50", p[0]), ("p95", p[1]), ("p99", p[2]),
            ):
                rows[key].append(value)
            for name, value in zip(("p50", "p95", "p99"), p, strict=True):
                if not math.isnan(value):
                    lat_x.append((app, name))
                    lat_ms.append(value)
                    lat_color.append(self.palette[i % len(self.palette)])
        self.apps_source.data = rows
        factors = [(app, q) for app in apps for q in ("p50", "p95", "p99")]
        if list(self.latency_fig.x_range.factors) != factors:
            self.latency_fig.x_range.factors = factors
        self.latency_source.data = {"x": lat_x, "ms": lat_ms, "color": lat_color}

        # utility and deadline met over time, one line per application
        for i, app in enumerate(apps):
            source = self.timeline_sources.get(app)
            if source is None:
                source = self._add_timeline(app, self.palette[i % len(self.palette)])
            points = list(tel.timeline.get(app, ()))
            source.data = {
                "t": [p.t * 1000.0 for p in points],
                "utility": [p.utility / p.requests for p in points],
                "met": [p.deadline_met / p.requests for p in points],
            }
        for app, source in self.timeline_sources.items():
            if app not in plugin.metrics and len(source.data["t"]):
                source.data = {"t": [], "utility": [], "met": []}

        # class estimates: groups × apps
        g_col: list[int] = []
        a_col: list[str] = []
        p_col: list[float] = []
        for app in apps:
            beliefs = plugin.latest_pi.get(app)
            if beliefs is None:
                continue
            pi = beliefs.pi()
            share = positive_share(pi, prior.get(app))
            g_col.extend(range(share.size))
            a_col.extend([app] * share.size)
            p_col.extend(share.tolist())
        pi_apps = sorted(set(a_col))
        if list(self.pi_fig.y_range.factors) != pi_apps:
            self.pi_fig.y_range.factors = pi_apps
        self.pi_source.data = {"group": g_col, "app": a_col, "p": p_col}

        # workers
        workers = plugin.state()["workers"]
        self.workers_source.data = {
            "name": [w["name"] for w in workers],
            "role": [w["role"] for w in workers],
            "warm": [", ".join(w["warm"]) for w in workers],
            "n_warm": [len(w["warm"]) for w in workers],
            "backlog": [w["backlog"] for w in workers],
            "pending": [w["pending"] for w in workers],
        }
        compute = [w for w in workers if w["role"] == "compute"]
        names = [w["name"] for w in compute]
        if list(self.backlog_fig.y_range.factors) != names:
            self.backlog_fig.y_range.factors = names
        self.backlog_source.data = {
            "name": names,
            "backlog": [w["backlog"] for w in compute],
            "n_warm": [len(w["warm"]) for w in compute],
        }

        # decision time
        decisions = list(plugin.decision_ms)[-512:]
        self.decision_source.data = {"i": list(range(len(decisions))), "ms": decisions}

        # not completed, by reason
        labels, counts = [], []
        for app in apps:
            for reason, count in sorted(plugin.metrics[app].reasons.items()):
                labels.append(f"{app}: {reason}")
                counts.append(count)
        if list(self.reasons_fig.y_range.factors) != labels:
            self.reasons_fig.y_range.factors = labels
        self.reasons_source.data = {"label": labels, "count": counts}

        self._update_memory()
        self.header.text = self._header(plugin, decisions)

    def _update_memory(self) -> None:
        """Each serif process's resident memory now, and its sampled history."""
        from serif_dask.memory import history

        hist = history(self.scheduler)
        now = hist.current(self.scheduler)
        self.memory_source.data = {
            "name": [p.name for p in now],
            "role": [p.role for p in now],
            "mb": [p.rss / 2**20 for p in now],
        }
        for i, (name, samples) in enumerate(sorted(hist.samples.items())):
            source = self.memory_sources.get(name)
            if source is None:
                source = self._add_memory_line(name, self.palette[i % len(self.palette)])
            source.data = {"t": [t * 1000.0 for t, _ in samples],
                           "mb": [rss / 2**20 for _, rss in samples]}
        for name, source in self.memory_sources.items():
            if name not in hist.samples and len(source.data["t"]):
                source.data = {"t": [], "mb": []}

    def _add_memory_line(self, name: str, color: str) -> Any:
        from bokeh.models import ColumnDataSource

        source = ColumnDataSource({"t": [], "mb": []}, name=f"serif-memory-{name}")
        self.memory_fig.line(x="t", y="mb", source=source, color=color, legend_label=name)
        self.memory_fig.legend.location = "top_left"
        self.memory_fig.legend.click_policy = "hide"
        self.memory_sources[name] = source
        return source

    def _add_timeline(self, app: str, color: str) -> Any:
        from bokeh.models import ColumnDataSource

        source = ColumnDataSource({"t": [], "utility": [], "met": []},
                                  name=f"serif-timeline-{app}")
        for fig, y in ((self.utility_fig, "utility"), (self.met_fig, "met")):
            fig.line(x="t", y=y, source=source, color=color, legend_label=app)
            fig.scatter(x="t", y=y, source=source, color=color, size=4, legend_label=app)
            fig.legend.location = "bottom_left"
            fig.legend.click_policy = "hide"
        self.timeline_sources[app] = source
        return source

    @staticmethod
    def _version_text(plugin: SerifSchedulerPlugin) -> str:
        """The run's config version and when it changed (live reconfiguration)."""
        import time

        applied = plugin.applied_version
        text = f", config version {applied}"
        at = plugin.applied_at.get(applied)
        if applied > 1 and at is not None:
            text += f" (since {time.strftime('%H:%M:%S', time.localtime(at))})"
        if plugin.version > applied:
            text += f", version {plugin.version} pending"
        return text

    @staticmethod
    def _header(plugin: SerifSchedulerPlugin, decisions: list[float]) -> str:
        from html import escape

        if plugin.run_id is None:
            return "<b>serif</b>: waiting for a run"
        total = sum(m.requests for m in plugin.metrics.values())
        utility = sum(m.utility for m in plugin.metrics.values())
        decision = (
            f"decision p50 {np.percentile(decisions, 50):.1f} ms, max {max(decisions):.1f} ms"
            if decisions else "no plans yet"
        )
        lost = f", lost workers {len(plugin.lost_workers)}" if plugin.lost_workers else ""
        return (
            f"<b>serif</b> run <code>{escape(str(plugin.run_id))}</code>"
            f"{escape(SerifPage._version_text(plugin))}: policy "
            f"<b>{escape(plugin.policy_name)}</b>, data-aware {plugin.data_aware}; "
            f"{total:,} requests, utility {utility:,.2f}; {decision}; "
            f"{len(plugin.pending)} batches in flight{lost}"
        )
