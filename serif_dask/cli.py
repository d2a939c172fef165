"""The ``serif-dask`` command line (also ``dask serif ...``).

Click, because Dask's own CLI is click and the ``dask_cli`` entry point takes a click
command. Exit status: 0 success, 1 runtime failure, 2 bad config or usage, 130/143 when
stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from serif_dask.config import ConfigError, SerifConfig, load_config
from serif_dask.errors import ReconfigureRefused, RunFailed, RunRefused

logger = logging.getLogger("serif_dask")

EXIT_RUNTIME = 1
EXIT_CONFIG = 2




class _SerifGroup(click.Group):
    """Turns known failures into one line and an exit status, also under ``dask serif``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, RunRefused, ReconfigureRefused) as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_CONFIG)
        except RunFailed as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_RUNTIME)


@click.group(
    name="serif", cls=_SerifGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="serif-dask")
def cli() -> None:
    """Real-time inference over many monitored groups, on Dask."""


def _load(paths: tuple[str, ...], simulate: bool = False) -> SerifConfig:
    return load_config([Path(p) for p in paths], simulate=simulate)


@cli.command()
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--simulate", is_flag=True, help="Check as if every model were in profile mode "
              "and every modality synthetic.")
def validate(config: tuple[str, ...], simulate: bool) -> None:
    """Check CONFIG (a directory, or system, application and data files) without running."""
    cfg = _load(config, simulate)
    n_models = sum(len(a.model_profiles) for a in cfg.apps)
    click.echo(
        f"ok: {len(cfg.apps)} applications, {n_models} models, "
        f"{len(cfg.system.compute_nodes)} compute nodes, {len(cfg.data.servers)} servers, "
        f"{cfg.data.num_groups} groups"
    )


def _security(ca_file: str | None, cert: str | None, key: str | None) -> Any:
    """Dask ``Security`` for the --tls-* options (None: Dask's config decides)."""
    if ca_file is None and cert is None and key is None:
        return None
    if ca_file is None or cert is None:
        raise click.UsageError("TLS needs --tls-ca-file and --tls-cert (and --tls-key when "
                               "the key is not in the certificate file)")
    from serif_dask.cluster import tls_security

    return tls_security(ca_file, cert, key)


@cli.command()
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--duration", type=float, default=None,
              help="Seconds to run (default: duration-in-secs; 0 runs until Ctrl-C).")
@click.option("--policy", default=None, help="Scheduling policy (default: scheduler-type).")
@click.option("--data-aware/--no-data-aware", default=None,
              help="Let policies see SneakPeek estimates (default: data-aware).")
@click.option("--seed", type=int, default=None, help="Random seed (default: seed; 0 = clock).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the summary JSON here.")
@click.option("--records", type=click.Path(dir_okay=False), default=None,
              help="Write one JSON line per request here.")
@click.option("--records-max-bytes", metavar="SIZE", default=None,
              help="Rotate the records file when it reaches SIZE (e.g. 100MB): it becomes "
              "FILE.1, the previous FILE.1 becomes FILE.2, and so on.")
@click.option("--records-rotate-every", metavar="DURATION", default=None,
              help="Rotate the records file this long after it was opened (e.g. 1h, 1d).")
@click.option("--records-keep", type=click.IntRange(min=0), default=5, show_default=True,
              help="Rotated records files to keep (older ones are deleted).")
@click.option("--results-stream", metavar="KEY", default=None,
              help="Also XADD every record to this Redis stream (maxlen from the system "
              "config's results-stream, else 10000).")
@click.option("--simulate", is_flag=True,
              help="Run every model in profile mode and every modality on synthetic data.")
@click.option("--scheduler-address", default=None,
              help="Use this running Dask scheduler instead of starting a local cluster.")
@click.option("--scheduler-file", type=click.Path(dir_okay=False), default=None,
              help="Use the scheduler this Dask scheduler file names; when there is no such "
              "file, write the local cluster's address there (for `serif-dask reconfigure "
              "--scheduler-file`; removed at the end).")
@click.option("--dashboard-address", default=None,
              help="Dashboard address of the local cluster (default: a free port).")
@click.option("--replace", is_flag=True,
              help="End the run the scheduler serves (its driver exits 1) and start this one.")
@click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA certificate of the Dask cluster's TLS (as for dask scheduler/worker).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This client's TLS certificate (also the local cluster's, when started).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key of --tls-cert, if not in the same file.")
@click.option("--cold-start", is_flag=True,
              help="Do not load models before the first tick: they load on first use, as "
              "on a restarted worker (to measure what a cold start costs).")
@click.option("--adaptive", metavar="MIN:MAX", default=None,
              help="Scale compute workers between MIN and MAX with Dask's adaptive "
              "machinery, on the planner's demand (the local cluster starts MIN; new ones "
              "are named <node>-2, <node>-3 ...). Not with --scheduler-address.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
def run(
    config: tuple[str, ...], duration: float | None, policy: str | None,
    data_aware: bool | None, seed: int | None, json_path: str | None, records: str | None,
    records_max_bytes: str | None, records_rotate_every: str | None, records_keep: int,
    results_stream: str | None,
    simulate: bool, scheduler_address: str | None, scheduler_file: str | None,
    dashboard_address: str | None,
    replace: bool, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None,
    cold_start: bool, adaptive: str | None, quiet: bool,
) -> None:
    """Serve CONFIG: tick every application, schedule, score, and print a summary.

    Without --tls-* options, Dask's own ``distributed.comm.tls.*`` config applies.
    """
    cfg = _load(config, simulate)
    security = _security(tls_ca_file, tls_cert, tls_key)
    if scheduler_address and scheduler_file:
        raise click.UsageError("give --scheduler-address or --scheduler-file, not both")
    if policy is not None:
        from serif_dask.policies import get_policy

        try:
            get_policy(policy)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--policy") from None
    rotation = _rotation(records, records_max_bytes, records_rotate_every, records_keep)
    bounds = None
    if adaptive is not None:
        from serif_dask.adaptive import parse_range

        try:
            bounds = parse_range(adaptive)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--adaptive") from None
    from serif_dask.runner import run_deployment

    summary, status = asyncio.run(
        run_deployment(
            cfg,
            duration=duration,
            policy=policy,
            data_aware=data_aware,
            seed=seed,
            records=Path(records) if records else None,
            records_rotation=rotation,
            results_stream=results_stream,
            scheduler_address=scheduler_address,
            dashboard_address=dashboard_address,
            progress=not quiet and sys.stdout.isatty(),
            replace=replace,
            warm_models=not cold_start,
            security=security,
            scheduler_file=Path(scheduler_file) if scheduler_file else None,
            adaptive=bounds,
        )
    )
    if summary is not None:
        if json_path:
            Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
        click.echo(format_summary(summary))
    if status:
        sys.exit(status)


def _rotation(
    records: str | None, max_bytes: str | None, every: str | None, keep: int
) -> Any:
    """The records file's rotation from the command line (None: never rotated)."""
    from dask.utils import parse_bytes, parse_timedelta

    from serif_dask.records import Rotation

    if max_bytes is None and every is None:
        return None
    if records is None:
        raise click.UsageError("--records-max-bytes and --records-rotate-every need --records")
    try:
        size = parse_bytes(max_bytes) if max_bytes is not None else None
    except (ValueError, TypeError):
        raise click.BadParameter(f"{max_bytes!r} is not a size such as 100MB",
                                 param_hint="--records-max-bytes") from None
    try:
        seconds = parse_timedelta(every, default="s") if every is not None else None
    except (ValueError, TypeError, KeyError):
        raise click.BadParameter(f"{every!r} is not a duration such as 1h",
                                 param_hint="--records-rotate-every") from None
    try:
        return Rotation(max_bytes=size, every_s=seconds, keep=keep)
    except ValueError as exc:
        hint = "--records-max-bytes" if "bytes" in str(exc) else "--records-rotate-every"
        raise click.BadParameter(str(exc), param_hint=hint) from None


@cli.command()
@click.argument("config", nargs=-1, type=click.Path())
@click.option("--scheduler-address", default=None, help="The live run's Dask scheduler.")
@click.option("--scheduler-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A Dask scheduler file naming it (as `serif-dask run --scheduler-file` "
              "or `dask scheduler --scheduler-file` writes).")
@click.option("--policy", default=None, help="The new scheduling policy.")
@click.option("--data-aware/--no-data-aware", default=None,
              help="Let policies see SneakPeek estimates, or not.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the run's driver applied the new version.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds --wait waits.")
@click.option("--simulate", is_flag=True,
              help="Load CONFIG as `run --simulate` does (every model in profile mode).")
@click.option("--tls-ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA certificate of the Dask cluster's TLS.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This client's TLS certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Private key of --tls-cert, if not in the same file.")
def reconfigure(
    config: tuple[str, ...], scheduler_address: str | None, scheduler_file: str | None,
    policy: str | None, data_aware: bool | None, wait: bool, timeout: float, simulate: bool,
    tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None,
) -> None:
    """Change the live run without stopping it: its policy, data-awareness, or CONFIG
    (SLAs, sample-durations, model profiles, num-groups).

    It applies from the run's next tick as a new config version, which every record
    carries. A change that cannot apply is refused in one line (exit 2) and the run goes
    on unchanged.
    """
    if (scheduler_address is None) == (scheduler_file is None):
        raise click.UsageError("give the live run's --scheduler-address or --scheduler-file")
    if not config and policy is None and data_aware is None:
        raise click.UsageError("nothing to change: give CONFIG, --policy or --data-aware")
    if scheduler_file is not None:
        from serif_dask.runner import read_scheduler_file

        scheduler_address = read_scheduler_file(Path(scheduler_file))
    assert scheduler_address is not None
    security = _security(tls_ca_file, tls_cert, tls_key)
    result = asyncio.run(_reconfigure(
        scheduler_address, security, config or None, policy, data_aware, wait, timeout,
        simulate))
    if not result.changes:
        click.echo(f"no change: the run stays at config version {result.version}")
        return
    if result.applied:
        import time

        at = time.strftime("%H:%M:%S", time.localtime(result.applied_at)) \
            if result.applied_at else "now"
        state = f"applied at {at}"
    else:
        state = "accepted; the driver applies it at its next tick"
    click.echo(f"config version {result.version} {state}: {'; '.join(result.changes)}")


async def _reconfigure(address: str, security: Any, config: tuple[str, ...] | None,
                       policy: str | None, data_aware: bool | None, wait: bool,
                       timeout: float, simulate: bool) -> Any:
    from distributed import Client

    from serif_dask.cluster import uses_tls
    from serif_dask.reconfigure import reconfigure_async

    if address.startswith("tls://") and not uses_tls(security):
        raise RunFailed(f"cannot reach scheduler {address}: it speaks TLS; pass "
                        "--tls-ca-file and --tls-cert")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    pending = Client(address, asynchronous=True, timeout="20s", security=security)
    try:
        client = await pending
    except (OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await pending.close()
        raise RunFailed(f"cannot reach scheduler {address}: {exc or type(exc).__name__}"
                        ) from None
    try:
        return await reconfigure_async(client, list(config) if config else None,
                                       policy=policy, data_aware=data_aware, wait=wait,
                                       timeout=timeout, simulate=simulate)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), timeout=10)


@cli.group()
def weights() -> None:
    """Model weights in Redis."""


@weights.command("push")
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--force", is_flag=True, help="Push even when Redis holds the same bytes.")
def weights_push(config: tuple[str, ...], force: bool) -> None:
    """Put every real model's weights of CONFIG into the configured Redis."""
    from serif_dask.redis_server import RedisUnavailable, ensure_redis
    from serif_dask.store import WeightStore

    cfg = _load(config)
    if not cfg.system.redis_nodes:
        raise click.UsageError(
            "weights push needs redis-nodes in the system config (without them, "
            "`serif-dask run` starts an embedded Redis and pushes the weights itself)"
        )
    try:
        handle = ensure_redis(cfg.system)
    except RedisUnavailable as exc:
        raise RunFailed(str(exc)) from None
    try:
        store = WeightStore(handle.connect())
        for app in cfg.apps:
            for profile in app.model_profiles:
                if profile.use_profile or not profile.weights:
                    continue
                key = profile.redis_key or profile.name
                if force:
                    meta, pushed = store.push(key, Path(profile.weights)), True
                else:
                    meta, pushed = store.push_if_changed(key, Path(profile.weights))
                state = "pushed" if pushed else "up to date"
                click.echo(
                    f"{app.name}/{profile.name}: {key} {state} (version {meta.version}, "
                    f"{meta.size} bytes, sha256 {meta.sha256[:12]})"
                )
        if handle.embedded:
            click.echo("note: Redis was started here and stops with this command", err=True)
    finally:
        handle.stop()


@cli.command()
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Samples per second per group and live modality (default: 2 / the "
              "shortest sample-duration, so no tick misses a fresh sample).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to feed (default: until Ctrl-C).")
@click.option("--from", "source", default="synthetic", show_default=True,
              help="Where samples come from: synthetic (the modality's generator), a data "
              "set reader (digits) or package.module:Class.")
@click.option("--burst", metavar="FACTOR,ON,EVERY", default=None,
              help="Multiply the rate by FACTOR for ON seconds of every EVERY.")
@click.option("--ramp", metavar="HZ", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Rise linearly from --rate to HZ over --duration.")
@click.option("--calibration", type=click.IntRange(min=0), default=0, show_default=True,
              help="First fill each application's calibration stream with N labelled "
              "samples (SneakPeek fits on them when a run starts).")
@click.option("--maxlen", type=click.IntRange(min=1), default=None,
              help="Entries each stream keeps, approximately (default 100).")
@click.option("--seed", type=int, default=None, help="Generator seed (default: the config's).")
def feed(config: tuple[str, ...], rate: float | None, duration: float | None, source: str,
         burst: str | None, ramp: float | None, calibration: int, maxlen: int | None,
         seed: int | None) -> None:
    """Push live inputs of CONFIG into its Redis streams (Ctrl-C stops)."""
    from serif_dask.feed import DEFAULT_MAXLEN, Feeder, Schedule, live_modalities, parse_burst
    from serif_dask.readers import ReaderError
    from serif_dask.redis_server import RedisUnavailable, ensure_redis

    cfg = _load(config)
    if not live_modalities(cfg):
        raise click.UsageError('no modality of CONFIG has "impl": "redis-stream": nothing to feed')
    try:
        shape = Schedule(
            rate=1.0, duration=duration,
            burst=parse_burst(burst) if burst else None, ramp_to=ramp,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        handle = ensure_redis(cfg.system)  # validation made sure redis-nodes are configured
    except RedisUnavailable as exc:
        raise RunFailed(str(exc)) from None
    stop = threading.Event()
    got: list[int] = []

    def on_signal(sig: int, frame: Any) -> None:
        got.append(sig)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client = handle.connect()
        try:
            feeder = Feeder(cfg, client, source=source, seed=seed,
                            maxlen=maxlen or DEFAULT_MAXLEN)
        except (ReaderError, ValueError) as exc:
            raise click.UsageError(f"--from {source}: {exc}") from None
        if calibration and not stop.is_set():
            n = feeder.calibrate(calibration)
            click.echo(f"calibration: {n} labelled samples", err=True)
        shape = dataclasses.replace(shape, rate=rate or 2.0 / feeder.sample_duration)
        click.echo(f"feeding {feeder.streams} streams at {shape.rate:g}/s each"
                   + (f" for {duration:g} s" if duration else " (Ctrl-C stops)"), err=True)
        stats = feeder.run(shape, stop) if not stop.is_set() else None
    except RedisUnavailable as exc:
        raise RunFailed(str(exc)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handle.stop()
    if stats is not None:
        click.echo(f"fed {stats.entries} entries in {stats.beats} beats over "
                   f"{stats.seconds:.1f} s ({stats.late_beats} beats skipped late, "
                   f"{stats.failed_beats} lost)", err=True)
    if got:
        sys.exit(143 if signal.SIGTERM in got else 130)


@cli.command()
@click.argument("records", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="serif-report",
              show_default=True, help="Directory for report.html, PNGs and summary.json.")
@click.option("--label", "labels", multiple=True,
              help="Name of each run, in the order of RECORDS (default: file names).")
@click.option("--config", "config_paths", multiple=True, type=click.Path(),
              help="The runs' config, for deadline met (records do not hold SLAs).")
def report(
    records: tuple[str, ...], out_dir: str, labels: tuple[str, ...],
    config_paths: tuple[str, ...],
) -> None:
    """Summarise and plot RECORDS (JSONL from run --records); several runs are compared."""
    from rich.console import Console

    from serif_dask.report import make_report

    sla = None
    if config_paths:
        sla = {app.name: app.sla_latency for app in _load(config_paths).apps}
    try:
        result = make_report([Path(r) for r in records], Path(out_dir), labels=labels,
                             sla=sla, console=Console(width=None if sys.stdout.isatty() else 160))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="RECORDS") from None
    click.echo("wrote " + ", ".join(str(p) for p in result["files"]))


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for people; the JSON file has everything."""
    lat = summary["latency_ms"]
    p50 = "-" if lat["p50"] is None else f"{lat['p50']:.0f}"
    p99 = "-" if lat["p99"] is None else f"{lat['p99']:.0f}"
    acc = "-" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    lines = [
        f"serif-dask: policy {summary['policy']}, data-aware {summary['data_aware']}, "
        f"{summary['ticks']} ticks, seed {summary.get('seed')}",
        f"  requests {summary['requests']}: completed {summary['completed']}, "
        f"dropped {summary['dropped']}, failed {summary['failed']}",
        f"  utility {summary['utility']:.2f} (mean {summary['mean_utility']:.3f}), "
        f"deadline met {summary['deadline_met']:.1%}, accuracy {acc}, "
        f"latency p50 {p50} ms p99 {p99} ms",
    ]
    for app, s in summary["per_app"].items():
        lines.append(
            f"  {app}: {s['requests']} requests, mean utility {s['mean_utility']:.3f}, "
            f"deadline met {s['deadline_met']:.1%}"
        )
    if summary.get("failures_by_reason"):
        reasons = ", ".join(f"{k} {v}" for k, v in summary["failures_by_reason"].items())
        lines.append(f"  not completed: {reasons}")
    workers = summary.get("compute_workers") or {}
    if workers.get("min") != workers.get("max"):  # scaled (adaptive, or workers lost)
        lines.append(f"  compute workers {workers['min']}..{workers['max']}, mean "
                     f"{workers['mean']:.2f}, {summary.get('worker_seconds', 0):.0f} "
                     "worker-seconds")
    if len(summary.get("per_version", {})) > 1:  # reconfigured live
        parts = ", ".join(f"v{v} {s['requests']} requests, mean utility {s['mean_utility']:.3f}"
                          for v, s in summary["per_version"].items())
        lines.append(f"  config versions: {parts}")
    return "\n".join(lines)


@cli.command()
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write application.json and profile.json (raw measurements) here; "
              "default: print application.json.")
@click.option("--batch-sizes", default=",".join(map(str, (1, 2, 4, 8, 16, 32, 64))),
              show_default=True, help="Batch sizes to time, comma-separated.")
@click.option("--reference-batch", type=click.IntRange(min=1), default=None,
              help="Batch size whose amortised per-request time becomes the profile's "
              "latency (default: groups / compute nodes, rounded up).")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Labelled samples for each confusion matrix (default: the reader's "
              "calibration set, at most 2000).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads while measuring; match the compute workers.")
def profile(config: tuple[str, ...], out: str | None, batch_sizes: str,
            reference_batch: int | None, samples: int | None, device: str | None,
            threads: int) -> None:
    """Measure every real model of CONFIG and write its latencies and confusion matrix."""
    from serif_dask.profiler import (
        ProfileError,
        dumps,
        profile_config,
        updated_application,
        write_profile,
    )

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter("expected integers like 1,2,4,8",
                                 param_hint="--batch-sizes") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be positive", param_hint="--batch-sizes")
    cfg = _load(config)
    try:
        reports = profile_config(cfg, batch_sizes=sizes, reference_batch=reference_batch,
                                 samples=samples, device=device, threads=threads)
    except ProfileError as exc:
        raise RunFailed(str(exc)) from None
    if not reports:
        click.echo("no model with use-profile false: nothing to profile", err=True)
        return
    for r in reports:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
        click.echo(
            f"{r.app}/{r.model}: accuracy {acc} ({r.n_samples} samples), "
            f"infer {r.infer_s * 1e3:.3f} ms/request at batch {r.reference_batch} "
            f"(t(b) = {r.intercept_s * 1e3:.3f} + {r.slope_s * 1e3:.4f}·b ms), "
            f"switch {r.switch_s * 1e3:.2f} ms, {r.nbytes} bytes on {r.device}",
            err=True,
        )
    if out:
        click.echo(f"wrote {write_profile(cfg, reports, Path(out))}", err=True)
    else:
        click.echo(dumps(updated_application(cfg, reports)), nl=False)


def _node_cost(value: str) -> tuple[str, float]:
    name, sep, cost = value.partition("=")
    try:
        number = float(cost)
    except ValueError:
        number = float("nan")
    if not sep or not name or not number >= 0 or number == float("inf"):
        raise click.BadParameter(f"expected NAME=COST with COST a number >= 0, got {value!r}",
                                 param_hint="--node-cost")
    return name, number


@cli.command()
@click.argument("config", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Write the planned config (system, application, data JSON) here.")
@click.option("--max-workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="At most this many compute workers in all.")
@click.option("--node-cost", "node_cost", multiple=True, metavar="TYPE=COST",
              help="Cost of one node of a type (default: the node's cost, else 1); repeat.")
@click.option("--target-deadline-met", type=click.FloatRange(0, 1), default=None,
              help="Instead of the most utility: the cheapest plan meeting this share of "
              "deadlines.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of load to replay (default: duration-in-secs, else 60).")
@click.option("--max-busy", type=click.FloatRange(0, 1, min_open=True), default=0.85,
              show_default=True, help="Choose only plans that book no worker for more than "
              "this share of the run (headroom for what profiles leave out).")
@click.option("--simulate", is_flag=True,
              help="Plan as `run --simulate` runs: every model in profile mode.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the plan (workers, prediction, alternatives) as JSON here.")
def plan(config: tuple[str, ...], out_dir: str, max_workers: int, node_cost: tuple[str, ...],
         target_deadline_met: float | None, duration: float | None, max_busy: float,
         simulate: bool, json_path: str | None) -> None:
    """Size the cluster for CONFIG's load: workers per compute-node type, by replaying the
    run offline with the run's own policy; writes a runnable config to --out."""
    from serif_dask.capacity import PlanError, plan_capacity, write_plan

    costs = dict(_node_cost(v) for v in node_cost)
    cfg = _load(config, simulate)
    try:
        result = plan_capacity(cfg, max_workers=max_workers, costs=costs,
                               target_deadline_met=target_deadline_met, duration=duration,
                               out_dir=Path(out_dir), simulate_models=simulate,
                               max_busy=max_busy)
    except PlanError as exc:
        if str(exc).startswith("--node-cost"):
            raise click.BadParameter(str(exc).split(": ", 1)[1],
                                     param_hint="--node-cost") from None
        raise RunFailed(str(exc)) from None
    written = write_plan(result, Path(out_dir))
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print_plan(result)
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def print_plan(result: Any) -> None:
    """The plan's table: each judged cluster, the chosen one first, then its warm models."""
    from rich.console import Console
    from rich.table import Table

    from serif_dask.capacity import describe_workers

    console = Console(width=None if sys.stdout.isatty() else 120)
    best = result.best
    title = (f"serif-dask plan: {result.policy}, data-aware {result.data_aware}, "
             f"{result.duration_s:g} s replayed, seed {result.seed}")
    table = Table(title=title)
    for name, justify in (("", "left"), ("workers", "left"), ("cost", "right"),
                          ("mean utility", "right"), ("deadline met", "right"),
                          ("answered", "right"), ("dropped", "right"),
                          ("busiest", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    shown = result.alternatives[:12]
    for p in shown:
        table.add_row(
            "chosen" if p is best else "", describe_workers(p.workers), f"{p.cost:g}",
            f"{p.mean_utility:.3f}", f"{p.deadline_met:.1%}",
            f"{p.answered / max(p.requests, 1):.1%}", f"{p.dropped / max(p.requests, 1):.1%}",
            f"{p.busiest:.0%}",
        )
    console.print(table)
    if len(result.alternatives) > len(shown):
        console.print(f"({len(result.alternatives) - len(shown)} more in --json)")
    for worker, models in best.warm.items():
        kept = ", ".join(f"{m} {share:.0%}" for m, share in
                         sorted(models.items(), key=lambda kv: -kv[1]))
        console.print(f"  {worker}: busy {best.busy.get(worker, 0.0):.0%}, warm: {kept}")
    if best.left_out:
        console.print(f"  left out (no planned node runs them): {', '.join(best.left_out)}")


@cli.command("train-digits")
@click.option("--out", type=click.Path(file_okay=False), default="configs/digits/weights",
              show_default=True, help="Folder for the .safetensors weights.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_digits(out: str, seed: int) -> None:
    """Train the digits example's three models (seconds on a CPU) and save their weights."""
    from serif_dask.models.train_digits import train_all

    for r in train_all(Path(out), seed=seed):
        click.echo(f"{r.name}: {r.params} parameters, test accuracy {r.test_accuracy:.3f}, "
                   f"trained in {r.seconds:.1f} s -> {r.path}")


@cli.command("train-motions")
@click.option("--out", type=click.Path(file_okay=False), default="configs/real-ward/weights",
              show_default=True, help="Folder for the .safetensors weights.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_motions(out: str, seed: int) -> None:
    """Train the real-data ward's two models (about a minute on a CPU) and save their weights."""
    from serif_dask.models.train_motions import train_all

    for r in train_all(Path(out), seed=seed):
        click.echo(f"{r.name}: {r.params} parameters, test accuracy {r.test_accuracy:.3f}, "
                   f"trained in {r.seconds:.1f} s -> {r.path}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and the right exit status for every failure."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = cli.main(args=argv, prog_name="serif-dask", standalone_mode=False)
    except (ConfigError, RunRefused, ReconfigureRefused) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RunFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # a bug or an unforeseen environment problem: still one line
        logger.debug("unexpected error", exc_info=True)
        click.echo(f"error: {type(exc).__name__}: {exc}".splitlines()[0], err=True)
        sys.exit(EXIT_RUNTIME)
    if isinstance(status, int) and status:  # a command's ctx.exit(status)
        sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
