"""``swarm demo`` end to end, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil

from conftest import ROOT


def test_demo_summary(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "peers.cli", "demo", "--peers", "2", "--steps", "2", "--metrics-port", "0",
         "--summary-json", str(summary_path), "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=400, cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Summary" in result.stdout and "Seed ready" in result.stdout
    assert "Monitor serving Prometheus metrics at http://127.0.0.1:" in result.stdout
    summary = json.loads(summary_path.read_text())
    for key in ("steps", "min_peers_averaged", "loss_first", "loss_last", "wire_bytes_per_param"):
        assert key in summary
    assert summary["steps"] >= 2
    assert summary["min_peers_averaged"] >= 2
    assert summary["loss_last"] < summary["loss_first"]
    assert 1.0 <= summary["wire_bytes_per_param"] < 1.1
    assert summary["bytes_saved"] > 0
    checkpoint = summary["checkpoint"]  # the demo's monitor saves one halfway (every max(1, 2 // 2) steps)
    assert checkpoint and 1 <= checkpoint["step"] <= 2 and 0 < checkpoint["eval_loss"] < 6, checkpoint
    assert (tmp_path / "run" / "checkpoints" / "latest" / "model.safetensors").is_file()


def test_demo_ctrl_c_stops_every_process(tmp_path):
    demo = subprocess.Popen(
        [sys.executable, "-m", "peers.cli", "demo", "--peers", "2", "--steps", "50", "--metrics-port", "0", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not training(tmp_path):  # their averagers and p2pd are up by then
            assert demo.poll() is None, demo.stdout.read()[-3000:]
            time.sleep(0.5)
        for child in psutil.Process(demo.pid).children(recursive=True):
            seen[child.pid] = child
        assert any("p2pd" in p.name() for p in seen.values()), [p.name() for p in seen.values()]
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=90)
        assert demo.returncode != 0 or "Summary" not in output
        _, alive = psutil.wait_procs(list(seen.values()), timeout=15)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
        for child in seen.values():
            if child.is_running():
                child.kill()


def training(workdir) -> bool:
    """Both demo trainers have begun training."""
    logs = sorted(workdir.glob("trainer-*.log"))
    return len(logs) == 2 and all("Starting at global step" in log.read_text(errors="replace") for log in logs)


def test_demo_peers_share_the_cores(tmp_path, monkeypatch):
    from peers.demo import Peers

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Peers(tmp_path, computing=3).env["OMP_NUM_THREADS"] == "2"  # a trainer's torch threads: 8 cores / 3
    assert Peers(tmp_path, computing=12).env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's choice stands
    assert Peers(tmp_path, computing=3).env["OMP_NUM_THREADS"] == "5"
