"""Several app processes behind HAProxy on one PostgreSQL, on this machine (loopback only): the
recipe of README's "Past one machine", ready to try, and what the tests and bench_scaleout run.

    python deploy/local_cluster.py --processes 2 --port 8080        # then open http://127.0.0.1:8080
    python deploy/local_cluster.py --write-config deploy/haproxy.cfg  # the example configuration

It starts PostgreSQL (a fresh cluster in a temporary folder, on a loopback port), N app processes
(`app.py` with the store's URL in RWKV_PLAYGROUND_STORE, each its own model and scheduler, on the ports after --port)
and HAProxy (the configuration below) on --port, and stops them all on Ctrl-C or SIGTERM. Only Debian's
packages: `apt-get install haproxy postgresql`.

HAProxy, what each line is for:
- the UI and Gradio's API (`backend ui`): a cookie names the process that serves a visitor (it says
  nothing of the visitor), because Gradio's event stream must reach the process that holds the
  event; round robin without it fails every call (tested);
- the OpenAI routes (`backend openai`): consistent hashing on the X-Conversation-Id header, so a
  conversation's requests reach the process whose prefix cache holds its states;
- health checks on /health (503 while a process has no model): a process that fails two checks
  in a row is marked down, and `option redispatch` sends its visitors to another one, which reads
  their work from the shared store.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(port: int, app_ports: list[int], stats_socket: str = "/run/haproxy-rwkv.sock",
                   sticky: bool = True) -> str:
    """The HAProxy configuration for app processes on `app_ports` (loopback), served on `port`.
    sticky=False: plain round robin (the tests' negative control: Gradio fails without stickiness)."""
    servers = "\n".join(f"    server app{i + 1} 127.0.0.1:{p} check" + (f" cookie app{i + 1}" if sticky else "")
                        for i, p in enumerate(app_ports))
    openai_servers = "\n".join(f"    server app{i + 1} 127.0.0.1:{p} check" for i, p in enumerate(app_ports))
    cookie = "    cookie RWKVSRV insert indirect nocache httponly\n" if sticky else ""
    return f"""# RWKV Playground: several app processes behind HAProxy (written by deploy/local_cluster.py)
global
    maxconn 2048
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    timeout connect 5s
    # replies stream for minutes (server-sent events)
    timeout client 15m
    timeout server 15m
    timeout tunnel 15m
    # a request for a process that is down goes to another one (at its first retry)
    option redispatch
    retries 1
    default-server inter 1s fall 2 rise 2

frontend playground
    bind 127.0.0.1:{port}
    acl openai path_beg /v1/
    use_backend openai if openai
    default_backend ui

backend ui
    balance roundrobin
{cookie}    option httpchk GET /health
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
{servers}

backend openai
    balance hdr(X-Conversation-Id)
    hash-type consistent
    option httpchk GET /health
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
{openai_servers}
"""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return None


def missing_packages() -> list[str]:
    """The Debian packages this needs that are not installed."""
    missing = []
    if not shutil.which("haproxy"):
        missing.append("haproxy")
    if not (_binary("initdb") and _binary("pg_ctl")):
        missing.append("postgresql")
    return missing


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"{process.args[1] if len(process.args) > 1 else process.args} exited "
                               f"({process.returncode}): {tail}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


class LocalCluster:
    """PostgreSQL, N app processes and HAProxy on loopback ports, in one work folder."""

    def __init__(self, processes: int = 2, port: int | None = None, app_args: list[str] | None = None,
                 app_command: list[str] | None = None, workdir: str | os.PathLike | None = None,
                 sticky: bool = True, env: dict | None = None, app_ports: list[int] | None = None):
        self.n = processes
        self.port = port or free_port()
        self.app_ports = list(app_ports) if app_ports else [free_port() for _ in range(processes)]
        self.app_args = list(app_args or [])
        self.app_command = app_command or [sys.executable, str(ROOT / "app.py")]
        self.work = Path(workdir or tempfile.mkdtemp(prefix="rwkv-cluster-"))
        self.sticky = sticky
        # processes on one machine share its cores: each gets its share of threads (N processes each
        # running as many threads as there are cores thrash: measured 2.5x slower with 2 on 2 cores)
        threads = str(max(1, (os.cpu_count() or 1) // processes))
        self.env = {"OMP_NUM_THREADS": threads, **os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
                    "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
        self.apps: list[subprocess.Popen | None] = [None] * processes
        # its own folder under the system's temporary one: the postgres user must reach it (a
        # test's tmp_path is private to root)
        self.postgres_dir = Path(tempfile.mkdtemp(prefix="rwkv-pg-"))
        self.pg_port = free_port()
        self.haproxy: subprocess.Popen | None = None
        self.stats_socket = str(self.work / "haproxy.sock")
        # the cluster trusts loopback connections, so any password is accepted; the URL carries one
        # all the same, as a real deployment's would (the app must never show or log it)
        self.db_password = secrets.token_urlsafe(12)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def database_url(self) -> str:
        return f"postgresql://rwkv:{self.db_password}@127.0.0.1:{self.pg_port}/rwkv"

    # ---- PostgreSQL --------------------------------------------------------------------------
    def _as_postgres(self, command: list[str]) -> list[str]:
        """PostgreSQL refuses to run as root: as root, run its programs as the postgres user."""
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    def start_postgres(self) -> None:
        sockets = self.postgres_dir / "socket"
        sockets.mkdir(exist_ok=True)
        os.chmod(self.postgres_dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.postgres_dir, "postgres", "postgres")
            shutil.chown(sockets, "postgres", "postgres")
        log = self.work / "postgres.log"
        subprocess.run(self._as_postgres([_binary("initdb"), "-D", str(self.postgres_dir / "data"), "-U", "rwkv",
                                          "--auth=trust", "-E", "UTF8", "--no-instructions"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        subprocess.run(self._as_postgres([_binary("pg_ctl"), "-D", str(self.postgres_dir / "data"), "-w", "-t", "60",
                                          "-l", str(self.postgres_dir / "server.log"), "-o",
                                          f"-p {self.pg_port} -k {sockets} -c listen_addresses=127.0.0.1",
                                          "start"]), check=True, stdout=subprocess.DEVNULL)
        subprocess.run([_binary("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "rwkv",
                        "rwkv"], check=True)
        log.write_text(f"PostgreSQL on 127.0.0.1:{self.pg_port}\n")

    def stop_postgres(self) -> None:
        if (self.postgres_dir / "data" / "postmaster.pid").exists():
            subprocess.run(self._as_postgres([_binary("pg_ctl"), "-D", str(self.postgres_dir / "data"), "-m", "fast",
                                              "-w", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.postgres_dir, ignore_errors=True)

    # ---- app processes -------------------------------------------------------------------------
    def start_app(self, i: int, wait: bool = True) -> subprocess.Popen:
        log = self.work / f"app{i + 1}.log"
        # the database URL (with its password) through the environment: a command line is public (ps)
        proc = subprocess.Popen([*self.app_command, "--port", str(self.app_ports[i]), *self.app_args], cwd=ROOT,
                                env={**self.env, "RWKV_PLAYGROUND_STORE": self.database_url},
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.apps[i] = proc
        if wait:
            wait_http(f"http://127.0.0.1:{self.app_ports[i]}/health", 180, proc, log)
        return proc

    def kill_app(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.apps[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    # ---- HAProxy -------------------------------------------------------------------------------
    def start_haproxy(self) -> None:
        config = self.work / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, self.app_ports, self.stats_socket, self.sticky))
        subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
        log = self.work / "haproxy.log"
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=open(log, "ab"),
                                        stderr=subprocess.STDOUT)
        wait_http(self.url + "health", 60, self.haproxy, log)

    def server_states(self) -> dict[str, str]:
        """{"ui/app1": "UP", ...} from HAProxy's stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.stats_socket)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("svname") not in ("FRONTEND", "BACKEND", None):
                states[f"{row['pxname']}/{row['svname']}"] = row.get("status", "")
        return states

    # ---- all -----------------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        missing = missing_packages()
        if missing:
            raise RuntimeError(f"missing Debian packages: apt-get install {' '.join(missing)}")
        try:
            self.start_postgres()
            for i in range(self.n):  # one after another: N processes loading a model at once on 2 cores
                self.start_app(i)
            self.start_haproxy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=30)
        for i in range(self.n):
            proc = self.apps[i]
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.stop_postgres()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--write-config", metavar="FILE", help="write the example HAProxy configuration (front "
                        "on --port, apps on the next ports) and exit")
    parser.add_argument("app_args", nargs="*", help="options for every app.py (after --), e.g. -- --model M.pth")
    args = parser.parse_args(argv)
    app_ports = [args.port + 1 + i for i in range(args.processes)]  # as deploy/haproxy.cfg and the README say
    if args.write_config:
        Path(args.write_config).write_text(haproxy_config(args.port, app_ports))
        return 0
    cluster = LocalCluster(args.processes, args.port, app_args=args.app_args, app_ports=app_ports)

    def stop_on_signal(signum, _frame):  # SIGTERM / SIGHUP stop everything, as Ctrl-C does
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    print(f"Starting PostgreSQL, {args.processes} app processes and HAProxy in {cluster.work} ...", flush=True)
    try:
        cluster.start()
        print(f"Open {cluster.url} (apps on ports {cluster.app_ports}; the store on PostgreSQL port "
              f"{cluster.pg_port}). Ctrl-C or SIGTERM stops everything.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
