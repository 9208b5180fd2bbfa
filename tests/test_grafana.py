"""The shipped Grafana stack: the dashboard JSON, the deploy configs, and every PromQL expression of the
dashboard run against a real Prometheus scraping a real app (both ways metrics reach Prometheus)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from joule_otel.simulator import running

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "joule-otel.json"
pytestmark = pytest.mark.prometheus

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SCRAPE_INTERVAL_S = 1
DURATION_COUNT = "gen_ai_client_operation_duration_seconds_count"
APP_BUDGETS_J = {"support-bot": 300.0, "search": 1e7, "never-called": 5000.0}
"""support-bot crosses 80 % and 100 % in seconds; search would run out within days at its rate; the third never runs."""

APP = textwrap.dedent("""
    import sys, time
    import openai
    import joule_otel

    base_url, port, db, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    joule_otel.instrument(prometheus_port=port, db=db)
    client = openai.OpenAI(base_url=base_url, api_key="jc_grafana", max_retries=0)
    batch = openai.OpenAI(base_url=base_url, api_key="jc_grafana_batch", max_retries=0)
    messages = [{"role": "user", "content": "How much energy does this take?"}]
    deadline = time.time() + seconds
    turn = 0
    while time.time() < deadline:
        region = ("eu-fi", "us-east")[turn % 2]
        with joule_otel.workload(("support-bot", "search")[turn % 2]):
            client.chat.completions.create(model="auto", messages=messages, extra_headers={"X-Region": region})
            for _ in client.chat.completions.create(
                model="auto", messages=messages, stream=True, stream_options={"include_usage": True},
                extra_headers={"X-Region": region},
            ):
                pass
        with joule_otel.workload("nightly-batch"):
            try:
                batch.chat.completions.create(model="llama-3.3-405b-instruct", messages=messages)
            except openai.APIStatusError:
                pass  # past its energy budget: a 402, recorded
        turn += 1
        time.sleep(0.1)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the files -----------------------------------------------------------------------------------------------
def test_dashboard_json_is_what_the_builder_makes_and_round_trips_through_grafanas_sdk():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    check = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "build_dashboard.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    register_default_plugins()
    data = json.loads(DASHBOARD.read_text())
    decoded = Dashboard.from_json(data)  # Grafana's typed model of the dashboard schema
    assert json.loads(JSONEncoder().encode(decoded)) == data
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "service", "workload", "model", "region"}
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert len(panels) >= 15 and all(p["targets"] for p in panels)
    assert any(t.get("exemplar") for p in panels for t in p["targets"])


def test_prometheus_config_passes_promtool():
    if PROMTOOL is None and not os.environ.get("CI"):
        pytest.skip("promtool (Debian package prometheus) is not installed; .ci/run installs it")
    assert PROMTOOL is not None
    config = str(DEPLOY / "prometheus.yml")
    result = subprocess.run([PROMTOOL, "check", "config", config], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_pipelines_and_compose_stack_are_consistent():
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    pipelines = collector["service"]["pipelines"]
    assert set(pipelines) == {"metrics", "traces", "logs"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline in pipelines.values():
        for kind, names in used.items():
            for name in pipeline.get(kind, []):
                assert name in collector[kind], f"{name} is used but not defined under {kind}"
                names.add(name)
    for kind, names in used.items():
        assert set(collector[kind]) == names, f"{kind} defined but unused: {set(collector[kind]) - names}"
    assert collector["exporters"]["prometheus"]["enable_open_metrics"] is True  # exemplars

    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"otel-collector", "prometheus", "tempo", "grafana", "joule-collect", "joule-proxy"}
    proxy = services["joule-proxy"]
    assert (DEPLOY / "proxy.Dockerfile").exists() and proxy["build"]["dockerfile"] == "deploy/proxy.Dockerfile"
    assert "JOULE_OTEL_PROXY_TOKEN" in proxy["environment"] and proxy["environment"]["JOULE_OTEL_CALL_EVENTS"] == "true"
    # the fan-in path: traces and call events go on to collect, which listens where the Collector sends
    exporters = {name for pipeline in ("traces", "logs") for name in pipelines[pipeline]["exporters"]}
    assert "otlphttp/joule-collect" in exporters
    collect = services["joule-collect"]
    assert collect["build"]["dockerfile"] == "deploy/collect.Dockerfile"
    assert (DEPLOY / "collect.Dockerfile").exists()
    cmd = (DEPLOY / "collect.Dockerfile").read_text()
    assert '"--port", "4318"' in cmd and collector["exporters"]["otlphttp/joule-collect"]["endpoint"].endswith(":4318")
    assert "JOULE_OTEL_COLLECT_TOKEN" in collect["environment"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not in deploy/"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert targets["otel-collector"]["honor_labels"] is True
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert targets["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{exporter_port}"]
    tempo_endpoint = collector["exporters"]["otlp/tempo"]["endpoint"]
    assert tempo_endpoint.split(":")[0] == "tempo"
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in datasources["datasources"]}
    assert by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"] == "tempo"


# -- a real Prometheus ---------------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(.+)$")


def as_collector(text: str, service: str, instance: str) -> str:
    """An app's exposition as the Collector's Prometheus exporter shows it: ``job`` = service.name,
    ``instance`` = service.instance.id, and ``target_info`` without ``service_name``."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            out.append(line)
            continue
        name, labels, rest = match.groups()
        pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or "")
        if name == "target_info":
            pairs = [(k, v) for k, v in pairs if k != "service_name"]
        pairs = [("job", service), ("instance", instance), *pairs]
        out.append(name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "} " + rest)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def prometheus_with_both_paths(tmp_path_factory):
    """An app serving ``prometheus_port`` (scraped directly, service "scraped-svc"), the same app's
    metrics relabelled as the Collector would (service "collector-svc"), and a Prometheus scraping both
    with the shipped deploy/prometheus.yml's jobs."""
    if PROMETHEUS is None and not os.environ.get("CI"):
        pytest.skip("prometheus (Debian package) is not installed; .ci/run installs it")
    assert PROMETHEUS is not None
    tmp = tmp_path_factory.mktemp("prometheus")
    app_port, relay_port, prom_port = free_port(), free_port(), free_port()
    with running(seed=3, energy_budgets={"jc_grafana_batch": 1500.0}) as sim:
        script = tmp / "app.py"
        script.write_text(APP)
        budgets = tmp / "budgets.json"
        budgets.write_text(json.dumps(APP_BUDGETS_J))
        rules = subprocess.run(
            [sys.executable, "-m", "joule_otel._cli", "budgets", "rules", str(budgets), "-o", str(tmp / "rules.yml")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert rules.returncode == 0, rules.stderr
        env = dict(
            os.environ,
            OTEL_SERVICE_NAME="scraped-svc",
            OTEL_METRIC_EXPORT_INTERVAL="1000",
            JOULE_OTEL_BUDGETS=str(budgets),
        )
        app = subprocess.Popen(
            [sys.executable, str(script), sim.base_url, str(app_port), str(tmp / "app.duckdb"), "240"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )

        class Relay(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/metrics", timeout=5) as response:
                    body = as_collector(response.read().decode(), "collector-svc", "instance-1").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        relay = ThreadingHTTPServer(("127.0.0.1", relay_port), Relay)
        threading.Thread(target=relay.serve_forever, daemon=True).start()
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
        config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S}s"
        config["rule_files"] = [str(tmp / "rules.yml")]
        for job in config["scrape_configs"]:
            port = relay_port if job["job_name"] == "otel-collector" else app_port
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--enable-feature=exemplar-storage",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        api = f"http://127.0.0.1:{prom_port}"
        started = time.time()
        try:
            _wait(lambda: _get(f"{api}/-/ready", raw=True), 30, "Prometheus to start")
            # enough samples that every rate window holds several, and the 402s have begun
            _wait(
                lambda: (
                    _instant(api, "count(target_info)") == 2
                    and _instant(api, "min(count_over_time(joule_client_energy_joules_total[1m]))") >= 8
                    and _instant(api, f"sum({DURATION_COUNT}{{error_type='insufficient_balance'}})") > 0
                ),
                90,
                "both scrape paths to hold data",
            )
            yield api, started
        finally:
            prom.terminate()
            app.terminate()
            prom.wait(timeout=30)
            app.wait(timeout=30)
            relay.shutdown()


def _get(url: str, raw: bool = False):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except OSError:
        return None
    return body if raw else json.loads(body)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if condition():
                return
        except (TypeError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _query(api: str, expr: str, *, range_s: float | None = None, at: float | None = None) -> list[dict]:
    params = {"query": expr}
    if range_s is None:
        path = "query"
        if at is not None:
            params["time"] = str(at)
    else:
        path = "query_range"
        now = _prometheus_now(api)
        params.update(start=str(now - range_s), end=str(now), step=f"{SCRAPE_INTERVAL_S}s")
    body = _get(f"{api}/api/v1/{path}?{urllib.parse.urlencode(params)}")
    assert body is not None and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _prometheus_now(api: str) -> float:
    """Prometheus's own clock: queries are anchored to the server's time, never the test's (which CI moves)."""
    body = _get(f"{api}/api/v1/query?query=time()")
    assert body is not None and body["data"]["resultType"] == "scalar", body
    return float(body["data"]["result"][1])


def _instant(api: str, expr: str, at: float | None = None) -> float:
    result = _query(api, expr, at=at)
    return float(result[0]["value"][1]) if result else 0.0


def _has_numbers(result: list[dict]) -> bool:
    values = [v for series in result for _, v in series.get("values", [series.get("value", [0, "NaN"])])]
    return any(math.isfinite(float(v)) for v in values)


def _escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a regex matcher (prometheusSpecialRegexEscape)."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def _variable_values(api: str, variable: dict) -> list[str]:
    """What Grafana lists for a query variable: label_values(...) or query_result(...) + its regex."""
    query = variable["query"]["query"]
    label_values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
    if label_values:
        metric, label = label_values.groups()
        body = _get(f"{api}/api/v1/label/{label}/values?{urllib.parse.urlencode({'match[]': metric})}")
        return sorted(body["data"])
    inner = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    assert inner, query
    texts = []
    for series in _query(api, inner.group(1)):
        labels = ", ".join(f'{k}="{v}"' for k, v in series["metric"].items())
        texts.append("{" + labels + "} " + " ".join(map(str, series["value"])))
    pattern = re.compile(variable["regex"].strip("/"))
    return sorted({m.group(1) for text in texts if (m := pattern.search(text))})


def _expand(expr: str, values: dict[str, str], range_s: int) -> str:
    rate_interval = max(2 * SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S)  # max($__interval + scrape, 4 × scrape)
    expr = expr.replace("$__rate_interval", f"{rate_interval}s").replace("$__range", f"{range_s}s")
    expr = expr.replace("$__interval", f"{SCRAPE_INTERVAL_S}s")
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    assert "$" not in expr.replace("$1", ""), expr
    return expr


def test_template_variables_list_what_the_app_sent(prometheus_with_both_paths):
    api, _ = prometheus_with_both_paths
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert _variable_values(api, variables["service"]) == ["collector-svc", "scraped-svc"]
    assert set(_variable_values(api, variables["workload"])) == {"support-bot", "search", "nightly-batch"}
    assert {"eu-fi", "us-east"} <= set(_variable_values(api, variables["region"]))  # + where unpinned calls ran
    assert _variable_values(api, variables["model"])


@pytest.mark.parametrize("service", ["All", "scraped-svc", "collector-svc"])
def test_every_dashboard_expression_returns_data(prometheus_with_both_paths, service):
    """Every PromQL expression of every panel, with Grafana's built-ins expanded as Grafana would, returns
    data — on the scrape path, on the Collector path, and with "All"."""
    api, started = prometheus_with_both_paths
    dashboard = json.loads(DASHBOARD.read_text())
    all_value = ".*"
    values = {"workload": all_value, "model": all_value, "region": all_value}
    values["service"] = all_value if service == "All" else _escape(service)
    range_s = max(30, int(time.time() - started))
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = _expand(target["expr"], values, range_s)
            result = _query(api, expr, range_s=None if target.get("instant") else 20)
            assert _has_numbers(result), f"{panel['title']!r} returned no data for service={service}: {expr}"
            checked += 1
    assert checked >= 18


def test_the_service_variable_separates_the_two_paths(prometheus_with_both_paths):
    api, started = prometheus_with_both_paths
    dashboard = json.loads(DASHBOARD.read_text())
    energy = next(p for p in dashboard["panels"] if p["title"] == "Energy")["targets"][0]["expr"]
    range_s = max(30, int(time.time() - started))
    totals = {}
    at = _prometheus_now(api) - 1  # one evaluation time for every variant
    for service in (".*", "scraped-svc", "collector-svc", "nobody"):
        expr = _expand(energy, {"service": service, "workload": ".*", "model": ".*", "region": ".*"}, range_s)
        totals[service] = _instant(api, expr, at)
    assert totals["scraped-svc"] > 0 and totals["collector-svc"] > 0 and totals["nobody"] == 0
    # each choice selects exactly its path's series: the scrape job's for the service named in target_info, the
    # Collector's (job = service.name) for the other; compared at one evaluation time, so exactly
    for service, job in (("scraped-svc", "joule-apps"), ("collector-svc", "collector-svc")):
        direct = _instant(api, f'sum(increase(joule_client_energy_joules_total{{job="{job}"}}[{range_s}s]))', at)
        assert totals[service] == pytest.approx(direct, rel=1e-9), service
    assert totals[".*"] == pytest.approx(totals["scraped-svc"] + totals["collector-svc"], rel=1e-9)


def test_concrete_choices_are_escaped_and_narrow_every_panel(prometheus_with_both_paths):
    """One service, workload, region and model picked, expanded the way Grafana escapes a picked value:
    every panel still returns data, except the 402 panels (that workload was never refused)."""
    api, started = prometheus_with_both_paths
    models = _query(
        api,
        'group by (gen_ai_response_model) (joule_client_energy_joules_total{joule_workload="support-bot", '
        'joule_region="eu-fi", gen_ai_token_type=""})',
    )
    model = models[0]["metric"]["gen_ai_response_model"]
    values = {
        "service": _escape("scraped-svc"),
        "workload": _escape("support-bot"),
        "region": _escape("eu-fi"),
        "model": _escape(model),
    }
    assert "." not in model or "\\\\." in values["model"]
    range_s = max(30, int(time.time() - started))
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = _expand(target["expr"], values, range_s)
            result = _query(api, expr, range_s=None if target.get("instant") else 20)
            if "insufficient_balance" in expr:
                assert not _has_numbers(result) or panel["title"] == "Calls by outcome"
            else:
                assert _has_numbers(result), f"{panel['title']!r} returned no data: {expr}"


def _firing(api: str) -> list[dict]:
    body = _get(f"{api}/api/v1/alerts")
    assert body is not None and body["status"] == "success"
    return [a for a in body["data"]["alerts"] if a["state"] == "firing"]


def test_budget_rules_fire_on_a_real_app(prometheus_with_both_paths):
    """The rules `joule-otel budgets rules` wrote, evaluated by a real Prometheus over a real app's gauges."""
    api, _ = prometheus_with_both_paths

    def fired() -> set[tuple[str, str, str]]:
        return {
            (a["labels"]["alertname"], a["labels"].get("joule_workload", ""), a["labels"].get("severity", ""))
            for a in _firing(api)
        }

    wanted = {
        ("JouleEnergyBudgetThreshold", "support-bot", "warning"),
        ("JouleEnergyBudgetThreshold", "support-bot", "critical"),
        ("JouleEnergyBudgetExhaustionProjected", "search", "critical"),
        ("JouleInsufficientBalance", "nightly-batch", "critical"),
    }
    _wait(lambda: wanted <= fired(), 60, f"alerts {wanted}")
    alerts = fired()
    assert not any(w == "never-called" for _, w, _ in alerts)
    assert ("JouleEnergyBudgetThreshold", "search", "warning") not in alerts
    assert ("JouleEnergyBudgetExhaustionProjected", "support-bot", "critical") not in alerts, "already spent"
    spent = _instant(api, 'joule:budget_spent:joules{joule_workload="support-bot"}')
    limit = _instant(api, 'max(joule_budget_limit_joules{joule_workload="support-bot"})')
    assert limit == 300.0 and spent >= limit
    assert _instant(api, 'max(joule_budget_spent_joules{joule_workload="never-called"})') == 0.0
