"""OpenMP settings of petald's processes, measured against the local transformers model run as a
user runs it (its own process, default settings), all in one run, on SmolLM2-135M-shaped random
weights (float32, CPU; greedy, 16-token prompt, NEW_TOKENS new tokens; decode tokens/s is the
tokens after the first over the time from the first to the last):

1. A server alone: the local model's decode in its own process under each setting, against
   libgomp's defaults. A server's compute process runs its blocks the same way, so a setting
   that slows this slows a server on its own machine.
2. Processes sharing the machine: a loopback swarm of two servers (0:15, 15:30) and a client,
   every process with the same setting, one swarm per setting; decode against the local model
   (default settings).
3. A user's process (default settings) holding a local model and the distributed model: the
   local model's decode after a NEW_TOKENS-token generate() through the swarm, against before.

Rounds alternate the settings (every worker process stays up between rounds, and a round asks
each once), so whatever else the machine runs slows all alike; medians are compared.
Run: `.venv/bin/python bench/bench_threads.py [--swarm-only]` (parts 2 and 3 only; 10-30 minutes on
2 shared cores).
Workers: `bench_threads.py worker CHECKPOINT [BOOT_ADDR]` reads commands on stdin."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NEW_TOKENS = 48
PROMPT = 16
ROUNDS = 3
OPENMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Setting name -> OpenMP environment; {} is libgomp's defaults.
SETTINGS = {
    "libgomp default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "ACTIVE, GOMP_SPINCOUNT=10000": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"},
}
# libgomp's defaults are left out of part 2: their spinning threads took a one-token step through
# such a swarm from 68 to 448 ms p50 (petald.server.openmp), and a round would take minutes.
SWARM_SETTINGS = ("PASSIVE", "ACTIVE, GOMP_SPINCOUNT=10000")
SMOLLM2_SHAPE = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def clean_env(setting: dict[str, str]) -> dict[str, str]:
    """This process's environment without any OpenMP wait setting (or tracing), plus
    `setting`."""
    env = {k: v for k, v in os.environ.items() if k not in (*OPENMP_KEYS, "PETALD_TRACE")}
    return {**env, "PYTHONUNBUFFERED": "1", **setting}


# ---- worker side --------------------------------------------------------------------------


def decode_rate(model, ids) -> float:
    times: list[float] = []

    class Stamps:  # a streamer: generate() only calls put() and end()
        def put(self, value) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model.generate(
        ids,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        streamer=Stamps(),
    )
    return (len(times) - 2) / (times[-1] - times[1])


def worker(checkpoint: str, boot: str | None) -> None:
    """Commands on stdin, one answer line (JSON) each: `local` and `swarm` (a generate, its
    decode tokens/s), `open` and `close` (the distributed model), `quit`."""
    import torch
    from transformers import AutoModelForCausalLM

    from petald import AutoDistributedModelForCausalLM

    path = Path(checkpoint)
    if path.suffix == ".gguf":
        local = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        local = AutoModelForCausalLM.from_pretrained(checkpoint)
    local.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, min(local.config.vocab_size, 1000), (1, PROMPT))
    decode_rate(local, ids)  # warm-up
    remote = None
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "open":
            remote = AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint, initial_peers=[boot]
            )
            decode_rate(remote, ids)  # warm-up: route probes, the servers' first steps
            answer = {}
        elif command == "close":
            remote.close()
            remote, answer = None, {}
        else:
            answer = {"tps": decode_rate(local if command == "local" else remote, ids)}
        print(json.dumps(answer), flush=True)
    if remote is not None:
        remote.close()


# ---- bench side ---------------------------------------------------------------------------


class Worker:
    def __init__(self, checkpoint: Path, env: dict[str, str], boot: str | None = None) -> None:
        argv = [sys.executable, __file__, "worker", str(checkpoint), *([boot] if boot else [])]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, command: str) -> dict:
        assert self.proc.stdin and self.proc.stdout
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({self.proc.wait()}) on {command!r}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ready(*workers: Worker) -> None:
    for w in workers:
        w.ask("")


def rounds(jobs: dict[str, tuple[Worker, str]]) -> dict[str, float]:
    """Median decode tokens/s of each job over ROUNDS rounds, the order rotated every round."""
    got: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, command = jobs[name]
            got[name].append(w.ask(command)["tps"])
    return {name: statistics.median(xs) for name, xs in got.items()}


def start_swarm(checkpoint: Path, tmp: Path, name: str, env: dict[str, str]):
    from petald.testing import spawn_daemon, start_daemon, stop_all

    key = name.replace(" ", "").replace(",", "-").replace("=", "")
    boot = start_daemon("node", "--new-swarm", identity=tmp / f"{key}-boot.key", env=env)
    servers = []
    try:
        for blocks in ("0:15", "15:30"):
            args = [str(checkpoint), "--blocks", blocks, "--initial-peers", boot.addr]
            args += ["--throughput", "100", "--cache-tokens", "1024"]
            ident = tmp / f"{key}-{blocks.replace(':', '-')}.key"
            servers.append(spawn_daemon("serve", *args, identity=ident, env=env))
    except BaseException:
        stop_all([*servers, boot])
        raise
    return boot, servers


def main() -> None:
    from petald.testing import stop_all
    from petald.testing.models import save_tiny_llama

    print(
        f"SmolLM2-135M-shaped random weights, float32, CPU, {os.cpu_count()} CPUs; greedy, "
        f"{PROMPT}-token prompt, {NEW_TOKENS} new tokens; medians of {ROUNDS} rounds"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = tmp / "smollm2-shaped"
        save_tiny_llama(checkpoint, **SMOLLM2_SHAPE)
        alone_too = "--swarm-only" not in sys.argv
        settings = SETTINGS if alone_too else {"libgomp default": {}}
        locals_ = {name: Worker(checkpoint, clean_env(env)) for name, env in settings.items()}
        daemons, clients = [], {}
        try:
            ready(*locals_.values())
            if alone_too:
                print("1. the local model alone in its process, decode tokens/s:", flush=True)
                alone = rounds({name: (w, "local") for name, w in locals_.items()})
                base = alone["libgomp default"]
                for name, tps in alone.items():
                    print(f"   {name:30s} {tps:5.1f}  ({tps / base:.2f}x default)", flush=True)
            for name, w in locals_.items():
                if name != "libgomp default":
                    w.stop()
            baseline = locals_["libgomp default"]
            swarms = {}
            for name in SWARM_SETTINGS:
                env = clean_env(SETTINGS[name])
                boot, servers = start_swarm(checkpoint, tmp, name, env)
                daemons += [boot, *servers]
                swarms[name] = (boot, servers, env)
            servers = [d for _, group, _ in swarms.values() for d in group]
            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(lambda d: d.wait_ready(600), servers))
            for name, (boot, _, env) in swarms.items():
                clients[name] = Worker(checkpoint, env, boot.addr)
            ready(*clients.values())
            for w in clients.values():
                w.ask("open")
            print("2. two servers and a client on this machine, decode tokens/s:", flush=True)
            jobs = {"local, default": (baseline, "local")}
            jobs |= {name: (w, "swarm") for name, w in clients.items()}
            shared = rounds(jobs)
            base = shared.pop("local, default")
            print(f"   local model, default settings  {base:5.1f}")
            for name, tps in shared.items():
                print(f"   swarm, {name:23s} {tps:5.1f}  ({tps / base:.2f}x local)", flush=True)
            for w in clients.values():
                w.stop()
            clients.clear()
            user_process(checkpoint, swarms)
        finally:
            for w in [*locals_.values(), *clients.values()]:
                w.stop()
            stop_all(daemons)


def user_process(checkpoint: Path, swarms: dict) -> None:
    """Part 3, against the swarm of petald's chosen settings (whatever a plain petald serve
    gets: the fastest of part 2 is not assumed)."""
    name = "ACTIVE, GOMP_SPINCOUNT=10000"
    boot = swarms[name][0]
    user = Worker(checkpoint, clean_env({}), boot.addr)
    try:
        ready(user)
        before, after = [], []
        for _ in range(2):  # the effect lasted until the distributed model was closed
            user.ask("open")
            before += [user.ask("local")["tps"] for _ in range(2)]
            user.ask("swarm")
            after += [user.ask("local")["tps"] for _ in range(2)]
            user.ask("close")
        b, a = statistics.median(before), statistics.median(after)
        print(
            f"3. a user's process: its local model decodes {b:.1f} tokens/s before and {a:.1f} "
            f"after a {NEW_TOKENS}-token swarm generate: {a / b:.2f}x (target: within 5%)",
            flush=True,
        )
    finally:
        user.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        main()
