"""`speechgpt-rt worker`: take rooms from LiveKit's own agent dispatch (docs/livekit.md, Agent dispatch).

    speechgpt-rt worker [--url URL] [--agent-name NAME] [--max-sessions N] [--model-dir DIR | --server ws://HOST:PORT]
                        [--metrics OUT.jsonl]

The worker opens a WebSocket to the server's agent endpoint (`/agent`, a token with the `agent` grant) and speaks
the `livekit.agent` protobuf messages from `livekit-protocol`:
    -> RegisterWorkerRequest (room jobs, our agent name, the permissions the agent participant gets)
    <- RegisterWorkerResponse (worker id)
    <- AvailabilityRequest (a job)      -> AvailabilityResponse (accept with our participant identity, or refuse)
    <- JobAssignment (job, token)       -> UpdateJobStatus RUNNING, later SUCCESS / FAILED
    <- JobTermination                   (the room's dispatch was deleted, or the room closed)
    -> UpdateWorkerStatus (available/full, load = sessions / --max-sessions, job count) on every change and
       every few seconds
    -> WorkerPing / <- WorkerPong       (a connection with no answer for PONG_TIMEOUT_S is treated as lost)
Every assigned room is served by a `RoomAgent` (agent/livekit/room_agent.py) over the one model the process loads;
jobs beyond --max-sessions are refused (the server then offers them to another worker: several worker processes,
on one or many machines, are how a deployment scales out). The worker registers before the model is loaded (a bad
secret or an unreachable server fails in seconds); a job taken while the model loads joins its room at once and
shows `lk.agent.state` = initializing until the model is ready.

When the connection drops (the server restarted) the worker registers again with backoff, for up to
--reconnect-timeout seconds. SIGTERM drains: the worker reports itself full (draining), refuses new jobs, lets each
session finish its current turn, leaves the rooms, reports the jobs done and exits 0. A second signal stops at once.
A job's room is left when nobody has been there to serve for --idle-timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PING_INTERVAL_S = 5.0
PONG_TIMEOUT_S = 15.0
STATUS_INTERVAL_S = 2.5
ASSIGNMENT_TIMEOUT_S = 15.0  # a slot promised in an AvailabilityResponse is given back if no assignment follows
DEFAULT_AGENT_NAME = "speechgpt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agent.livekit.room_cli import add_common_arguments

    parser.add_argument("--agent-name", default=DEFAULT_AGENT_NAME,
                        help=f"the name dispatches ask for (default {DEFAULT_AGENT_NAME!r})")
    parser.add_argument("--api-key", default=None, help="default: $LIVEKIT_API_KEY")
    parser.add_argument("--api-secret", default=None, help="default: $LIVEKIT_API_SECRET")
    parser.add_argument("--idle-timeout", type=float, default=20.0,
                        help="leave a job's room after this many seconds without anyone to serve")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM, the longest wait for the current turns to finish")
    parser.add_argument("--worker-name", default=None, help="shown in the agent's attributes (default host:pid)")
    add_common_arguments(parser)


@dataclass
class Job:
    id: str
    room: str
    agent: object | None = None  # RoomAgent
    task: asyncio.Task | None = None
    reserved_at: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, args, loader, sinks):
        from agent.livekit.conventions import Credentials, ws_url

        self.args = args
        self.url = ws_url(args.url).rstrip("/")
        self.creds = Credentials(self.url, args.api_key, args.api_secret)
        self.loader = loader
        self.sinks = sinks
        self.model = None
        self.name = args.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.max_sessions = args.max_sessions
        self.jobs: dict[str, Job] = {}  # accepted (reserved or running)
        self.worker_id: str | None = None
        self.registrations = 0
        self.draining = False
        self._ws = None
        self._http = None
        self._send_lock = asyncio.Lock()
        self._last_pong = time.monotonic()
        self._status_seq = 0
        self._stop = asyncio.Event()

    # ---- connection -------------------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the agent WebSocket and register; raises ConnectionError with one line on failure."""
        import aiohttp
        from livekit.protocol import agent as pa
        from livekit.protocol import models

        from agent.livekit.conventions import worker_token

        if self._http is None:
            self._http = aiohttp.ClientSession()
        timeout = self.args.connect_timeout
        endpoint = f"{self.url}/agent"
        try:
            ws = await asyncio.wait_for(self._http.ws_connect(
                endpoint, headers={"Authorization": f"Bearer {worker_token(self.creds)}"}, heartbeat=None,
                autoping=True, max_msg_size=0), timeout)
        except asyncio.TimeoutError:
            raise ConnectionError(f"no answer from {endpoint} within {timeout:.0f} s") from None
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise ConnectionError(f"{endpoint} refused the worker's credentials ({exc.status}); check "
                                      "LIVEKIT_API_KEY / LIVEKIT_API_SECRET") from None
            raise ConnectionError(f"{endpoint}: WebSocket handshake failed ({exc.status} {exc.message})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionError(f"cannot reach {endpoint}: {exc}") from None
        request = pa.WorkerMessage(register=pa.RegisterWorkerRequest(
            type=pa.JT_ROOM, agent_name=self.args.agent_name, version="speechgpt-rt 0.1.0",
            ping_interval=int(PING_INTERVAL_S),
            allowed_permissions=models.ParticipantPermission(
                can_subscribe=True, can_publish=True, can_publish_data=True, can_update_metadata=True,
                can_publish_sources=[models.TrackSource.MICROPHONE], agent=True)))
        try:
            await ws.send_bytes(request.SerializeToString())
            msg = await asyncio.wait_for(ws.receive(), timeout)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
            await ws.close()
            raise ConnectionError(f"{endpoint}: no registration answer ({type(exc).__name__}: {exc})") from None
        if msg.type != aiohttp.WSMsgType.BINARY:
            await ws.close()
            raise ConnectionError(f"{endpoint}: registration refused (got {msg.type.name}: {msg.data!r})")
        reply = pa.ServerMessage()
        reply.ParseFromString(msg.data)
        if not reply.HasField("register"):
            await ws.close()
            raise ConnectionError(f"{endpoint}: expected a RegisterWorkerResponse, got {reply.WhichOneof('message')}")
        self._ws = ws
        self.worker_id = reply.register.worker_id
        self.registrations += 1
        self._last_pong = time.monotonic()
        print(f"[worker] registered as {self.worker_id} (agent name {self.args.agent_name!r}, server "
              f"{reply.register.server_info.version or '?'}, registration {self.registrations})", flush=True)
        await self.send_status()

    async def _send(self, message) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        async with self._send_lock:
            try:
                await ws.send_bytes(message.SerializeToString())
            except Exception as exc:  # noqa: BLE001 - the receive loop notices and reconnects
                log.debug("send failed: %s", exc)

    # ---- status -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.jobs)

    def full(self) -> bool:
        return self.draining or (self.max_sessions is not None and self.running >= self.max_sessions)

    def load(self) -> float:
        if self.draining:
            return 1.0
        if self.max_sessions:
            return min(1.0, self.running / self.max_sessions)
        return 0.0

    async def send_status(self) -> None:
        from livekit.protocol import agent as pa

        self._status_seq += 1
        status = pa.WS_FULL if self.full() else pa.WS_AVAILABLE
        await self._send(pa.WorkerMessage(update_worker=pa.UpdateWorkerStatus(
            status=status, load=self.load(), job_count=self.running, draining=self.draining, seq=self._status_seq)))

    async def update_job(self, job_id: str, status, error: str = "") -> None:
        from livekit.protocol import agent as pa

        await self._send(pa.WorkerMessage(update_job=pa.UpdateJobStatus(job_id=job_id, status=status, error=error)))

    # ---- messages ---------------------------------------------------------------------------------------------
    async def handle(self, msg) -> None:
        kind = msg.WhichOneof("message")
        if kind == "availability":
            await self.on_availability(msg.availability)
        elif kind == "assignment":
            await self.on_assignment(msg.assignment)
        elif kind == "termination":
            job = self.jobs.get(msg.termination.job_id)
            if job is not None and job.agent is not None:
                log.info("job %s (room %s) terminated by the server", job.id, job.room)
                await job.agent.stop()
        elif kind == "pong":
            self._last_pong = time.monotonic()
        elif kind == "go_away":
            log.info("server asked the worker to go away: %s", msg.go_away.reason)
            raise ConnectionResetError("server sent GoAway")

    async def on_availability(self, request) -> None:
        from livekit.protocol import agent as pa

        from agent.livekit.conventions import ATTR_WORKER

        job = request.job
        if self.full() or job.id in self.jobs:
            why = "draining" if self.draining else "at --max-sessions"
            log.info("refusing job %s (room %s): %s", job.id, job.room.name, why)
            await self._send(pa.WorkerMessage(availability=pa.AvailabilityResponse(job_id=job.id, available=False)))
            return
        self.jobs[job.id] = Job(job.id, job.room.name)  # reserved until the assignment comes
        await self._send(pa.WorkerMessage(availability=pa.AvailabilityResponse(
            job_id=job.id, available=True, participant_identity=f"agent-{job.id}",
            participant_name=self.args.agent_name, participant_attributes={ATTR_WORKER: self.name})))
        await self.send_status()
        asyncio.get_running_loop().call_later(ASSIGNMENT_TIMEOUT_S, self._expire_reservation, job.id)

    def _expire_reservation(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.task is None:
            log.warning("job %s: no assignment came after accepting it; slot released", job_id)
            del self.jobs[job_id]
            asyncio.get_running_loop().create_task(self.send_status())

    async def on_assignment(self, assignment) -> None:
        job_msg = assignment.job
        job = self.jobs.get(job_msg.id)
        if job is None and self.draining:
            from livekit.protocol import agent as pa

            await self.update_job(job_msg.id, pa.JS_FAILED, "the worker is draining")
            return
        if job is None:  # assigned after the reservation expired: take it if there is room
            job = self.jobs[job_msg.id] = Job(job_msg.id, job_msg.room.name)
        job.task = asyncio.get_running_loop().create_task(self.run_job(job, assignment.url or self.url,
                                                                       assignment.token))

    async def run_job(self, job: Job, url: str, token: str) -> None:
        from livekit.protocol import agent as pa

        from agent.livekit.room_agent import JoinError, RoomAgent, RoomAgentConfig

        args = self.args
        cfg = RoomAgentConfig(url=url, room=job.room, token=token, queue_ms=args.queue_ms,
                              connect_timeout_s=args.connect_timeout, reconnect_timeout_s=0.0,
                              leave_when_alone_s=args.idle_timeout, drain_timeout_s=args.drain_timeout,
                              seed=args.seed)

        async def model():  # a job taken while the model loads waits in the room as `initializing`
            return await self.loader.wait()

        agent = job.agent = RoomAgent(model, cfg, on_turn=self.sinks.on_turn, name=f"job {job.id} ({job.room})")
        agent.on_sessions = getattr(self.sinks, "on_sessions", None)
        status, error = pa.JS_SUCCESS, ""
        try:
            await agent.connect()
            print(f"[worker] job {job.id}: joined room {job.room!r}", flush=True)
            await self.update_job(job.id, pa.JS_RUNNING)
            problem = await agent.run()
            if problem:
                status, error = pa.JS_FAILED, problem
        except JoinError as exc:
            status, error = pa.JS_FAILED, str(exc)
        except Exception as exc:  # noqa: BLE001 - one failed job must not end the worker
            log.exception("job %s failed", job.id)
            status, error = pa.JS_FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            self.jobs.pop(job.id, None)
            await self.update_job(job.id, status, error)
            print(f"[worker] job {job.id}: done ({pa.JobStatus.Name(status)}{': ' + error if error else ''})",
                  flush=True)
            await self.send_status()

    # ---- main loop --------------------------------------------------------------------------------------------
    async def serve(self) -> str | None:
        """Until drained / stopped (None) or the server is lost for longer than --reconnect-timeout."""
        import aiohttp
        from livekit.protocol import agent as pa

        loader_task = asyncio.ensure_future(self._await_model())
        ticker = asyncio.ensure_future(self._tick())
        try:
            while not self._stop.is_set():
                ws = self._ws
                receive = asyncio.ensure_future(ws.receive())
                stopper = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait({receive, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    receive.cancel()
                    break
                stopper.cancel()
                msg = receive.result()
                lost = msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    server_msg = pa.ServerMessage()
                    try:
                        server_msg.ParseFromString(msg.data)
                        await self.handle(server_msg)
                    except ConnectionResetError:
                        lost = True
                    except Exception as exc:  # noqa: BLE001 - a bad message is reported, not fatal
                        log.warning("could not handle a server message: %s: %s", type(exc).__name__, exc)
                if lost or (ws is self._ws and self._ws is not None and self._ws.closed):
                    problem = await self._reconnect("the connection to the server closed")
                    if problem:
                        return problem
            return None
        finally:
            ticker.cancel()
            loader_task.cancel()

    async def _await_model(self) -> None:
        self.model = await self.loader.wait()
        await self.send_status()

    async def _tick(self) -> None:
        from livekit.protocol import agent as pa

        last_ping = last_status = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - last_ping >= PING_INTERVAL_S:
                last_ping = now
                await self._send(pa.WorkerMessage(ping=pa.WorkerPing(timestamp=int(time.time() * 1000))))
            if now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                await self.send_status()
            if now - self._last_pong > PONG_TIMEOUT_S and self._ws is not None and not self._ws.closed:
                log.warning("no pong from the server for %.0f s: reconnecting", PONG_TIMEOUT_S)
                await self._ws.close()

    async def _reconnect(self, why: str) -> str | None:
        print(f"[worker] {why}; registering again (for up to {self.args.reconnect_timeout:.0f} s)", flush=True)
        if self._ws is not None:
            await self._ws.close()
        self._ws = None
        deadline = time.monotonic() + self.args.reconnect_timeout
        delay = 0.5
        last = ""
        while not self._stop.is_set():
            try:
                await self.connect()
                return None
            except ConnectionError as exc:
                last = str(exc)
            if time.monotonic() + delay > deadline:
                return f"lost the server and could not register again within {self.args.reconnect_timeout:.0f} s: {last}"
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
        return None

    async def drain(self) -> None:
        """No new jobs; current turns finish; rooms left; jobs reported done."""
        self.draining = True
        print(f"[worker] draining: {self.running} job(s); taking no new jobs", flush=True)
        await self.send_status()
        jobs = [j for j in self.jobs.values() if j.agent is not None]
        await asyncio.gather(*(j.agent.stop(drain=True) for j in jobs), return_exceptions=True)
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.args.drain_timeout + 10)
        self._stop.set()

    async def stop_now(self) -> None:
        self.draining = True
        for job in list(self.jobs.values()):
            if job.agent is not None:
                await job.agent.stop()
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self._stop.set()

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()


def run(args) -> int:
    from agent.livekit.room_cli import check_common, connect_server, fail, setup_logging

    setup_logging(args.log_level)
    problem = check_common(args)
    if problem is None:
        args.api_key = args.api_key or os.environ.get("LIVEKIT_API_KEY")
        args.api_secret = args.api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (args.api_key and args.api_secret):
            problem = "no credentials: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET (or --api-key / --api-secret)"
        elif not args.agent_name:
            problem = "--agent-name must not be empty (explicit dispatch names the agent)"
        elif args.idle_timeout <= 0 or args.drain_timeout < 0:
            problem = "--idle-timeout must be > 0 and --drain-timeout >= 0"
    if problem:
        return fail("worker", problem, 2)
    problem = connect_server(args)
    if problem:
        return fail("worker", problem)
    return asyncio.run(_main(args))


async def _main(args) -> int:
    import signal

    from agent.livekit.room_cli import MetricsSinks, ModelLoader, fail

    loader = ModelLoader(args, "worker")  # started once registered: bad credentials exit at once
    sinks = MetricsSinks(args, "worker")
    worker = Worker(args, loader, sinks)
    try:
        try:
            await worker.connect()
        except ConnectionError as exc:
            return fail("worker", str(exc))
        loader.start()
        loop = asyncio.get_running_loop()
        signals = {"n": 0}

        def on_signal() -> None:
            signals["n"] += 1
            if signals["n"] == 1:
                loop.create_task(worker.drain())
            else:
                print("[worker] second signal: stopping now", flush=True)
                loop.create_task(worker.stop_now())

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        load_watch = asyncio.ensure_future(loader.wait())
        serve = asyncio.ensure_future(worker.serve())
        done, _ = await asyncio.wait({serve, load_watch}, return_when=asyncio.FIRST_COMPLETED)
        if load_watch in done and load_watch.exception() is not None:
            await worker.stop_now()
            serve.cancel()
            return fail("worker", f"could not load the model: {load_watch.exception()}")
        problem = await serve
        if problem:
            await worker.stop_now()
            return fail("worker", problem)
        print("[worker] stopped", flush=True)
        return 0
    finally:
        await worker.aclose()
        sinks.close()
