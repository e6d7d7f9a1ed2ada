"""The Prometheus text format the components serve."""

from __future__ import annotations

import asyncio
import re
import urllib.request

from pcipt import metrics as m
from pcipt.devcluster.cluster import free_port

LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? -?[0-9.e+Inf]+$'
)


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        assert LINE.match(line), f"not exposition format: {line!r}"
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_counter_gauge_histogram_render() -> None:
    r = m.Registry()
    c = r.counter("t_total", "a counter", ("reason",))
    g = r.gauge("t_gauge", "a gauge", ("node", "state"))
    h = r.histogram("t_seconds", "a histogram", buckets=(0.1, 1.0))
    c.inc("NotPermitted")
    c.inc("NotPermitted", by=2)
    g.set(3, "node-a", "free")
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = r.render()
    assert "# TYPE t_total counter" in text and "# HELP t_gauge a gauge" in text
    got = parse(text)
    assert got['t_total{reason="NotPermitted"}'] == 3
    assert got['t_gauge{node="node-a",state="free"}'] == 3
    assert got['t_seconds_bucket{le="0.1"}'] == 1 and got['t_seconds_bucket{le="1.0"}'] == 2
    assert (
        got['t_seconds_bucket{le="+Inf"}'] == 3
        and got["t_seconds_count"] == 3
        and got["t_seconds_sum"] == 5.55
    )


def test_label_values_are_escaped() -> None:
    r = m.Registry()
    r.gauge("t", "x", ("msg",)).set(1, 'say "hi"\nbye')
    assert 't{msg="say \\"hi\\"\\nbye"} 1' in r.render()


def test_collectors_refresh_gauges_at_scrape_time() -> None:
    r = m.Registry()
    g = r.gauge("t", "x")
    calls = []
    r.collectors.append(lambda: (calls.append(1), g.set(len(calls))))
    r.render()
    assert parse(r.render())["t"] == 2


def test_served_over_http_with_health() -> None:
    async def scenario() -> None:
        r = m.Registry()
        r.counter("t_total", "x").inc()
        port = free_port()
        ready = {"ok": False}
        runner = await m.serve(r, "127.0.0.1", port, health=lambda: ready["ok"])
        try:

            def get(path: str) -> tuple[int, str]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as resp:
                        return resp.status, resp.read().decode()
                except urllib.error.HTTPError as e:
                    return e.code, ""

            assert await asyncio.to_thread(get, "/readyz") == (503, "")
            ready["ok"] = True
            assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
            status, body = await asyncio.to_thread(get, "/metrics")
            assert status == 200 and parse(body)["t_total"] == 1
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_every_metric_name_is_documented() -> None:
    from tests.conftest import REPO_ROOT

    doc = (REPO_ROOT / "docs" / "metrics.md").read_text()
    names = [
        v
        for k, v in vars(m).items()
        if k.isupper() and isinstance(v, str) and v.startswith("pcipt_")
    ]
    assert len(names) >= 18
    for name in names:
        assert f"`{name}`" in doc, f"{name} is not in docs/metrics.md"
