"""The soak run: the real server under steady streaming load with adapter churn, for minutes, and
the goals a long-running server must meet.

    .venv/bin/python -m bench.soak [--minutes 10 --users 64 --adapters 16 --max-tokens 16]
    make soak

Load (locust, bench/locustfile.py): `users` streaming chat clients, each request on a random one of
`adapters` rank-8 adapters (uploaded over HTTP at the start) or on the churn adapter; 10% of the
clients close the connection after the first content chunk; one admin client uploads the churn
adapter, replaces one of the first four adapters (original and variant bytes in turn) and deletes
the churn adapter, in a loop. A request for the churn adapter while it is deleted gets 404: that is
expected and counted apart. A thread polls /health every second and the server's RSS every 5 s.
When the time is up the clients get 5 s to finish, then every stream still open is cut at once.

The server runs with its defaults (--max-num-seqs 32, --max-loras 8) and keys: 64 clients keep
about half the requests waiting and more adapters in play than device slots, so the scheduler's
queue and the slot evictions are part of what is soaked. max_tokens is short and the prompts are
one line: on 2 CPU cores the run measures stability, not throughput.

Goals (exit status 1 if one is missed): 0 unexpected errors, 0 /health failures, RSS drift after
warm-up (the first 20% of the run, at least 30 s) under 5%, and once the load stops, /metrics at 0
running, 0 waiting and 0 KV usage (within 30 s: the cut clients' requests must be aborted, queued
ones included). The churn variants are a fixed pool: every adapter version of the run has appeared
after four admin cycles (about 25 s, inside the warm-up), so RSS after warm-up is not the CPU
adapter cache filling up but what the server keeps.

The server gets one OpenMP thread (--server-threads): on 2 cores shared with the load tool (and
here with other users), torch's default threads spin at every barrier while a core is taken, and a
step slows tenfold and more (measured: two 16-token chats took 8 s with 1 thread, 12 s with
OMP_WAIT_POLICY=passive, over 60 s with the defaults, at load average 6)."""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import live_server, report
from bench.adapters import adapter_set, default_shapes
from bench.loadgen import LoadRun, run_locust
from bench.sampler import Sampler, engine_gauges, rss_drift

CHURN = "churn"
# The KV cache and context of the e2e tests' server: 8192 tokens hold 32 short chats many times over.
SERVER_ARGS = ["--kv-cache-tokens", "8192", "--max-model-len", "1024"]
MAX_DRIFT_PCT = 5.0
STOP_TIMEOUT_S = 5  # at the end of the run, seconds the clients have to finish what they are doing
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class SoakSettings:
    minutes: float = 10.0
    users: int = 64
    adapters: int = 16
    rank: int = 8
    max_tokens: int = 16
    disconnect_fraction: float = 0.1
    replace_count: int = 4  # adapters the admin client replaces, in turn
    churn_variants: int = 4  # distinct uploads of the churn adapter, in turn
    admin_pause: float = 1.5  # seconds between two admin operations
    settle_s: float = 30.0  # after the load: how long the gauges have to reach 0
    server_threads: int | None = 1  # OMP_NUM_THREADS of the server (None: torch's default)

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def warmup_s(self) -> float:
        return max(30.0, 0.2 * self.seconds)

    @property
    def disconnect_users(self) -> int:
        return max(1, round(self.disconnect_fraction * self.users))


def adapter_names(count: int) -> list[str]:
    return [f"p{i:02d}" for i in range(count)]


def variants(settings: SoakSettings, root: Path) -> list[Path]:
    """The stable adapters' dirs; under `root`, the admin client's: churn/<i>, original/<name> and
    replacement/<name> (links to random adapters cached by bench.adapters)."""
    extra = settings.replace_count + settings.churn_variants
    dirs = adapter_set(default_shapes(), settings.adapters + extra, settings.rank)
    stable, replacements, churn = (
        dirs[: settings.adapters],
        dirs[settings.adapters : settings.adapters + settings.replace_count],
        dirs[settings.adapters + settings.replace_count :],
    )
    names = adapter_names(settings.adapters)
    for kind in ("churn", "original", "replacement"):
        (root / kind).mkdir(parents=True)
    for i, d in enumerate(churn):
        (root / "churn" / str(i)).symlink_to(d)
    for name, original, replacement in zip(names, stable, replacements, strict=False):
        (root / "original" / name).symlink_to(original)
        (root / "replacement" / name).symlink_to(replacement)
    return stable


def upload(url: str, key: str, name: str, directory: Path) -> None:
    files = {f: (f, (directory / f).read_bytes()) for f in FILES}
    r = httpx.post(
        f"{url}/v1/adapters",
        data={"name": name},
        files=files,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload of {name} answered {r.status_code}: {r.text[:300]}")


def settle(url: str, timeout: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until running, waiting and KV usage are all 0, or `timeout` passes; the last
    gauges read and the seconds it took."""
    start = time.monotonic()
    while True:
        gauges = engine_gauges(httpx.get(f"{url}/metrics", timeout=10).text)
        elapsed = time.monotonic() - start
        if not any(gauges.values()) or elapsed >= timeout:
            return gauges, elapsed
        time.sleep(0.5)


def missed_goals(result: dict[str, Any]) -> list[str]:
    """Each goal the run missed, in words; empty when it met them all (and did something)."""
    missed = []
    if result["unexpected_errors"]:
        missed.append(f"{result['unexpected_errors']} unexpected errors (goal 0)")
    if result["health"]["failures"]:
        missed.append(f"{result['health']['failures']} /health failures (goal 0)")
    if result["rss"]["drift_pct"] >= MAX_DRIFT_PCT:
        missed.append(f"RSS drift {result['rss']['drift_pct']:.2f}% (goal < {MAX_DRIFT_PCT}%)")
    nonzero = {k: v for k, v in result["final_metrics"].items() if v}
    if nonzero:
        missed.append(f"/metrics after the load: {nonzero} (goal all 0)")
    counts = result["requests"]
    for key in ("completed", "disconnects", "uploads", "replaces", "deletes"):
        if not counts[key]:
            missed.append(f"no {key}: the load did not run as planned")
    if result["server_exit"] != 0:
        missed.append(f"the server exited with {result['server_exit']} on SIGTERM (goal 0)")
    return missed


def summarize(load: LoadRun, load_s: float) -> dict[str, Any]:
    ok = [s for s in load.samples if s["error"] is None]
    tokens = sum(s["tokens"] for s in ok)
    latency = {}
    for name, label in (("chat", "request"), ("TTFT", "ttft"), ("ITL", "itl")):
        entry = load.entries.get(name)
        if entry is not None:
            latency.update({f"{label}_{p}_ms": v for p, v in entry.percentiles_ms.items()})
    chat = load.entries.get("chat")
    return {
        "requests": {
            "completed": chat.requests - chat.failures if chat else 0,
            "disconnects": load.requests("chat disconnect"),
            "expected_404": load.requests("chat 404 (deleted adapter)"),
            "uploads": load.requests("admin upload"),
            "replaces": load.requests("admin replace"),
            "deletes": load.requests("admin delete"),
        },
        "unexpected_errors": load.failure_count,
        "error_messages": [f"{f['Occurrences']}x {f['Name']}: {f['Error'][:300]}" for f in load.failures][
            :10
        ],
        "tokens": tokens,
        "tokens_per_s": tokens / load_s if load_s else 0.0,
        "latency": latency,
        "locust_exit": load.exit_code,
    }


def run(settings: SoakSettings, workdir: Path) -> dict[str, Any]:
    """One soak run in `workdir` (its store, logs and locust's CSV files): the figures of
    `missed_goals` and the rest of the report."""
    stable = variants(settings, workdir / "variants")
    names = adapter_names(settings.adapters)
    api_key, admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = {"LORAPLEX_API_KEYS": api_key, "LORAPLEX_ADMIN_KEYS": admin_key}
    server = live_server.start(
        ["--adapters-dir", str(workdir / "store"), *SERVER_ARGS],
        workdir,
        env=keys,
        threads=settings.server_threads,
    )
    sampler = Sampler(server)
    exit_code: int | None = None
    try:
        for name, d in zip(names, stable, strict=True):
            upload(server.url, admin_key, name, d)
        sampler.start()
        load = run_locust(
            server.url,
            ["ChatUser", "DisconnectUser", "AdminUser"],
            settings.users + 1,  # and the admin
            workdir / "locust",
            {
                "adapter_names": ",".join(names),
                "churn_name": CHURN,
                "variants_dir": str(workdir / "variants"),
                "replace_count": settings.replace_count,
                "admin_pause": settings.admin_pause,
                "max_tokens": settings.max_tokens,
                "disconnect_users": settings.disconnect_users,
            },
            env={"LOCUST_API_KEY": api_key, "LOCUST_ADMIN_KEY": admin_key},
            run_seconds=settings.seconds,
            # then the streams still open are cut: 60-odd disconnects at once, which the final
            # gauges must also show cleaned up (waiting for them would double a loaded run's time)
            stop_timeout=STOP_TIMEOUT_S,
        )
        load_s = sampler.elapsed()
        final, settle_s = settle(server.url, settings.settle_s)
        sampler.stop()
        exit_code = server.stop()
    finally:
        sampler.stop()
        if exit_code is None:
            print(server.log_tail())
            server.stop()
    return {
        "settings": asdict(settings),
        "server_flags": SERVER_ARGS,
        "clients": {
            "chat": settings.users - settings.disconnect_users,
            "disconnect": settings.disconnect_users,
            "admin": 1,
        },
        "load_s": load_s,
        **summarize(load, load_s),
        "health": {
            "checks": sampler.health_checks,
            "failures": len(sampler.health_failures),
            "messages": sampler.health_failures[:10],
            "max_ms": sampler.health_max_s * 1000,
        },
        "rss": rss_drift(sampler.rss, settings.warmup_s, load_s),
        "rss_samples": [(round(t, 1), b) for t, b in sampler.rss],
        "gauges_peak": {k: max(g[k] for _, g in sampler.gauges) for k in final} if sampler.gauges else {},
        "final_metrics": final,
        "settle_s": settle_s,
        "server_exit": exit_code,
        "locust_log": load.log if load.failure_count or load.exit_code not in (0, 1) else "",
    }


def print_report(result: dict[str, Any], missed: list[str]) -> None:
    s, req, rss = result["settings"], result["requests"], result["rss"]
    rows: list[list[Any]] = [
        ["requests completed", req["completed"], "-"],
        ["disconnects (mid-stream)", req["disconnects"], "-"],
        ["expected 404 (deleted adapter)", req["expected_404"], "-"],
        ["uploads / replaces / deletes", f"{req['uploads']} / {req['replaces']} / {req['deletes']}", "-"],
        ["unexpected errors", result["unexpected_errors"], "0"],
        ["/health failures", f"{result['health']['failures']} of {result['health']['checks']}", "0"],
        ["/health slowest ms", f"{result['health']['max_ms']:.0f}", "-"],
        ["RSS after warm-up MiB", f"{rss['warm_mib']:.1f}", "-"],
        ["RSS at the end MiB", f"{rss['end_mib']:.1f}", "-"],
        ["RSS peak MiB", f"{rss['peak_mib']:.1f}", "-"],
        ["RSS drift %", f"{rss['drift_pct']:.2f}", f"< {MAX_DRIFT_PCT}"],
        *[[f"final {k}", v, "0"] for k, v in result["final_metrics"].items()],
        ["peak running / waiting", "{running:.0f} / {waiting:.0f}".format(**result["gauges_peak"]), "-"],
        ["tokens/s", f"{result['tokens_per_s']:.1f}", "-"],
        *[[k.replace("_", " "), f"{v:.0f}", "-"] for k, v in result["latency"].items()],
        ["server exit on SIGTERM", result["server_exit"], "0"],
    ]
    report.table(
        f"Soak: {s['minutes']:g} min, {s['users']} streaming clients ({result['clients']['disconnect']} "
        f"disconnect after the first chunk) + 1 admin, {s['adapters']} adapters rank {s['rank']}, "
        f"max_tokens {s['max_tokens']}; warm-up {rss['warmup_s']:.0f}s",
        ["metric", "value", "goal"],
        rows,
    )
    for message in result["error_messages"] + result["health"]["messages"]:
        print(f"  {message}")
    print("goals: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))


def main() -> None:
    ap = argparse.ArgumentParser()
    defaults = SoakSettings()
    ap.add_argument("--minutes", type=float, default=defaults.minutes)
    ap.add_argument("--users", type=int, default=defaults.users)
    ap.add_argument("--adapters", type=int, default=defaults.adapters)
    ap.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    ap.add_argument(
        "--server-threads", type=int, default=defaults.server_threads, help="0: torch's default (all cores)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="run in this new dir and keep its logs")
    args = ap.parse_args()
    settings = SoakSettings(
        minutes=args.minutes,
        users=args.users,
        adapters=args.adapters,
        max_tokens=args.max_tokens,
        server_threads=args.server_threads or None,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        result = run(settings, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as t:
            result = run(settings, Path(t))
    missed = missed_goals(result)
    print_report(result, missed)
    report.save("soak", {**result, "missed_goals": missed})
    raise SystemExit(1 if missed else 0)


if __name__ == "__main__":
    main()
