"""What ``info`` tells about the guest and about the agent's own footprint."""

import platform
import time

from guestbus_agent.commands import guest_info


def test_info_names_the_guest_and_the_agents_own_use() -> None:
    busy_until = time.process_time() + 0.05
    while time.process_time() < busy_until:  # use some CPU, so the figure must move
        pass
    info = guest_info("5b0c1f2e-0000-4000-8000-000000000001")
    assert info["kernel"] == platform.release()
    with open("/proc/self/status", encoding="ascii") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    # the same process, read a moment apart: within a few MiB of each other
    assert abs(info["agent_rss_bytes"] - rss_kib * 1024) < 8 * 1024 * 1024
    assert info["agent_rss_bytes"] > 1024 * 1024
    assert info["agent_cpu_seconds"] >= 0.05
