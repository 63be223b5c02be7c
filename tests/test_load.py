"""Load and faults: the app started as a Space starts it (``python app.py``, its own process, on a loopback port,
the bundled demo model), called by many ``gradio_client`` sessions at once, then stopped and killed mid-surgery.

- Every session's surgery, generation and verification is answered, or refused at once because the queue is full.
- No session sees another's edit: one that made none gets none, whatever the others did.
- Resident memory after the sessions have expired stays within ``MEMORY_BOUND`` of where it was before them.
- No per-session folder is left once the sessions expire, and none when the app is stopped (SIGTERM) or killed
  (SIGKILL: the next start removes what the killed process left).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SESSIONS = 8
QUEUE_SIZE = 4  # small, so that some of the sessions are refused
MEMORY_BOUND = 200 * 2**20  # bytes of resident memory a burst of sessions may leave behind, once they expire
TTL = 15  # seconds a session's edits are kept: longer than the burst, so that memory is measured with them held
NO_EDIT = "(no surgery on this model in this session yet)"


class App:
    """``python app.py`` in a process of its own, with its temporary files in ``tmp``."""

    def __init__(self, tmp: Path, **env):
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(tmp / f"app-{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "app.py"],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "SURGERY_MODEL": "assets/demo-model",
                "GRADIO_SERVER_PORT": str(self.port),
                "TMPDIR": str(tmp),
                "GRADIO_TEMP_DIR": str(tmp / "gradio"),
                "GRADIO_ANALYTICS_ENABLED": "False",
                "SURGERY_MCP": "0",
                "OMP_NUM_THREADS": "1",
                **env,
            },
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited at start-up:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        pytest.fail(f"the app did not answer within 180 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / f"app-{self.port}.log").read_text()[-3000:]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, analytics_enabled=False, download_files=str(self.tmp / "downloads"))

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.flush()

    def work_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("transformer-surgery-app-*"))

    def session_dirs(self) -> list[Path]:
        return [p for d in self.work_dirs() for p in d.iterdir()]


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


@pytest.fixture(scope="module")
def facts(demo, demo_panels) -> list[dict]:
    """The demo panel's facts that the demo model gets wrong (what a surgery can fix)."""
    from surgery.evaluation.generation import said

    facts = demo_panels["facts"]
    judged = said(demo.model, demo.tokenizer, [f["prompt"] for f in facts], [f["target"] for f in facts])
    wrong = [f for f, (_, j) in zip(facts, judged) if not j.strict]
    assert len(wrong) >= 4
    return wrong


@pytest.fixture
def apps():
    """Registers each started app; any still running when the test ends (a failed assertion) is killed."""
    started: list[App] = []

    def register(app: App) -> App:
        started.append(app)
        return app

    yield register
    for app in started:
        if app.proc.poll() is None:
            app.proc.kill()
            app.proc.wait(30)


def one_session(app: App, fact: dict | None) -> dict:
    """A visitor: a surgery of one fact (None: no surgery), a generation, a verification of the session's edit."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    out: dict = {"operated": False, "refused": []}
    client = app.client()
    try:
        if fact is not None:
            *_, report = client.predict(json.dumps([fact]), "wv", "auto", api_name="/operate")
            out["operated"] = True
            out["report"] = report
        out["original"], out["corrected"] = client.predict(fact["prompt"] if fact else "The", 3, api_name="/generate")
        try:
            *_, check = client.predict("", api_name="/verify")
            out["verified"] = check
        except AppError as e:
            out["verify_error"] = str(e)
    except QueueError as e:
        out["refused"].append(str(e))
    except AppError as e:
        if "queue is full" not in str(e).lower():
            raise
        out["refused"].append(str(e))
    return out


def test_many_sessions_at_once_are_answered_or_refused_isolated_and_cleaned_up(tmp_path, facts, apps):
    app = apps(App(tmp_path, SURGERY_QUEUE_SIZE=str(QUEUE_SIZE), SURGERY_SESSION_TTL=str(TTL)))
    try:
        one_session(app, facts[0])  # warm up: the first surgery and generation allocate what they reuse
        assert wait_for(lambda: not app.session_dirs(), 2 * TTL + 10), "the warm-up session's files outlived its TTL"
        before = app.rss()

        results: list[dict | BaseException] = [None] * SESSIONS

        def run(i: int) -> None:
            try:
                results[i] = one_session(app, facts[i % len(facts)] if i % 2 == 0 else None)
            except BaseException as e:  # reported below, with the session's number
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException) or r is None]
        assert not errors, f"sessions neither answered nor refused: {errors}\n{app.output()}"

        refused = [r for r in results if r["refused"]]
        answered = [r for r in results if not r["refused"]]
        assert answered, "every session was refused"
        for r in refused:
            assert "queue is full" in r["refused"][0].lower()
        for i, r in enumerate(results):
            if r["refused"]:
                continue
            if r["operated"]:  # its own edit, and only its own
                assert r["report"]["evaluation"]["efficacy"]["total"] == 1
                assert r["corrected"] != NO_EDIT and "verified" in r["verified"]
            else:  # made none: sees none, whatever the others did
                assert r["corrected"] == NO_EDIT, f"session {i} sees an edit it did not make"
                assert "nothing to verify yet" in r["verify_error"]

        during = app.rss()  # the sessions' edits still held (their time-to-live has not run out)
        assert wait_for(lambda: not app.session_dirs(), 2 * TTL + 10), f"left behind: {app.session_dirs()}"
        after = app.rss()
        summary = (
            f"{SESSIONS} sessions (queue size {QUEUE_SIZE}): {len(answered)} answered "
            f"({sum(r['operated'] for r in answered)} with a surgery), {len(refused)} refused as queue full; "
            f"resident memory {before / 2**20:.0f} MB before, {during / 2**20:.0f} MB with the sessions' edits held, "
            f"{after / 2**20:.0f} MB after they expired"
        )
        print(summary)
        assert after - before < MEMORY_BOUND, summary
    finally:
        app.stop()
    assert not app.work_dirs(), "the app's folder outlived it"


def test_stopped_or_killed_mid_surgery_leaves_nothing_half_written(tmp_path, facts, apps):
    surgery = json.dumps(facts)

    app = apps(App(tmp_path))
    job = app.client().submit(surgery, "wv", "auto", api_name="/operate")
    assert wait_for(lambda: job.status().code.name in ("PROCESSING", "PROGRESS"), 60)
    app.stop(signal.SIGTERM)
    assert not app.work_dirs(), "SIGTERM left the app's folder"

    app = apps(App(tmp_path))
    (work,) = app.work_dirs()
    (work / "surgery-session-x").mkdir()  # as if a session's files were being written when the power went
    (work / "surgery-session-x" / "patch.safetensors").write_bytes(b"half")
    job = app.client().submit(surgery, "wv", "auto", api_name="/operate")
    assert wait_for(lambda: job.status().code.name in ("PROCESSING", "PROGRESS"), 60)
    app.stop(signal.SIGKILL)
    assert app.work_dirs() == [work]  # nothing can clean up after SIGKILL ...

    app = apps(App(tmp_path))  # ... so the next start does
    assert work not in app.work_dirs() and len(app.work_dirs()) == 1
    app.stop()
    assert not app.work_dirs()
