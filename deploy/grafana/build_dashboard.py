"""Build the shipped Grafana dashboard (``joule-otel.json``) with Grafana's own Foundation SDK.

    pip install grafana-foundation-sdk
    python deploy/grafana/build_dashboard.py          # rewrites deploy/grafana/joule-otel.json
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the committed JSON is stale

Every panel queries the Prometheus names the OpenTelemetry → Prometheus translation gives joule_otel's
metrics (``joule.client.energy`` → ``joule_client_energy_joules_total``). The ``service`` variable works
on both ways metrics reach Prometheus: scraping ``instrument(prometheus_port=…)`` puts ``service.name``
on ``target_info`` as ``service_name`` (``job`` is the scrape job), while the OTLP → Collector path
makes it the ``job`` label (and ``target_info`` has no ``service_name``). Every query therefore joins
on ``target_info`` and keeps the series whose target matches ``$service`` either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "joule-otel.json"

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")

ENERGY = "joule_client_energy_joules_total"
CARBON = "joule_client_carbon_mg_total"
REQUEST_ENERGY = "joule_client_request_energy_joules"
DURATION = "gen_ai_client_operation_duration_seconds"
TOKENS = "gen_ai_client_token_usage"
TTFC = "gen_ai_client_operation_time_to_first_chunk_seconds"
BUDGET_SPENT = "joule_budget_spent_joules"
BUDGET_LIMIT = "joule_budget_limit_joules"

FILTER = 'joule_workload=~"$workload", gen_ai_response_model=~"$model", joule_region=~"$region"'
"""The template variables every series selector carries (an "All" choice expands to ``.*``)."""

SERVICE = (
    ' * on (job, instance) group_left () (target_info{service_name=~"$service"}'
    ' or target_info{job=~"$service", service_name=""})'
)
"""Keeps series whose target's service matches: ``service_name`` when scraped, ``job`` via the Collector."""

SERVICE_VALUES = (
    "query_result(group by (service) (label_replace(label_replace(target_info, "
    '"service", "$1", "job", "(.+)"), "service", "$1", "service_name", "(.+)")))'
)
"""Service names for the variable: ``service_name`` where present, else ``job``."""


def rate(metric: str, extra: str = "", window: str = "$__rate_interval") -> str:
    """``rate`` of one metric, filtered by the template variables and the service."""
    selector = FILTER + (f", {extra}" if extra else "")
    return f"rate({metric}{{{selector}}}[{window}]){SERVICE}"


def increase(metric: str, extra: str = "", window: str = "$__range") -> str:
    """``increase`` over the dashboard's range, filtered the same way."""
    selector = FILTER + (f", {extra}" if extra else "")
    return f"increase({metric}{{{selector}}}[{window}]){SERVICE}"


def budget(metric: str) -> str:
    """A ``joule.budget.*`` gauge per budget (the largest any process reports: they read one ledger)."""
    return f'max by (joule_workload, joule_budget_service) ({metric}{{joule_workload=~"$workload"}}{SERVICE})'


def quantile(q: float, histogram: str) -> str:
    """The ``q`` quantile of a histogram per routed model."""
    return f"histogram_quantile({q}, sum by (le, gen_ai_response_model) ({rate(histogram + '_bucket')}))"


def query(expr: str, legend: str = "", ref: str = "A", *, exemplar: bool = False) -> prometheus.Dataquery:
    """A Prometheus target on the dashboard's datasource variable."""
    target = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE).exemplar(exemplar)
    return target.legend_format(legend) if legend else target


def series(
    title: str, unit: str, description: str, *targets: prometheus.Dataquery, width: int = 12
) -> timeseries.Panel:
    """A time series panel."""
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    panel = panel.height(8).span(width).fill_opacity(12).line_width(1)
    panel = panel.legend(
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["mean", "lastNotNull"])
    ).tooltip(
        common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def total(title: str, unit: str, description: str, expr: str) -> stat.Panel:
    """A single figure over the dashboard's time range."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(4)
        .span(6)
        .with_target(query(expr).instant())
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def variable(name: str, label: str, values_query: str, regex: str = "") -> db.QueryVariable:
    """A multi-select variable with "All" (expanded to ``.*``, which also matches an absent label)."""
    var = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": values_query, "refId": f"{name}-values"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return var.regex(regex) if regex else var


def build() -> model.Dashboard:
    """The dashboard model."""
    by = "sum by ({label}) ({expr})"
    dashboard = (
        db.Dashboard("Joule Cloud energy (joule-otel)")
        .uid("joule-otel-energy")
        .description("Energy, carbon, tokens and latency of Joule Cloud inference calls, recorded by joule-otel.")
        .tags(["joule-otel", "energy", "genai", "opentelemetry"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus").regex(""))
        .with_variable(variable("service", "Service", SERVICE_VALUES, regex='/service="([^"]+)"/'))
        .with_variable(variable("workload", "Workload", f"label_values({ENERGY}, joule_workload)"))
        .with_variable(variable("model", "Model", f"label_values({ENERGY}, gen_ai_response_model)"))
        .with_variable(variable("region", "Region", f"label_values({ENERGY}, joule_region)"))
        .with_row(db.Row("Totals over the time range"))
        .with_panel(total("Energy", "joule", "Joules billed in the time range.", f"sum({increase(ENERGY)})"))
        .with_panel(total("Carbon", "massmg", "mg CO2e of that energy.", f"sum({increase(CARBON)})"))
        .with_panel(
            total("Power now", "watt", "Joules per second billed (a rate of joules is watts).", f"sum({rate(ENERGY)})")
        )
        .with_panel(
            total(
                "402 refusals",
                "short",
                "Calls refused with 402 (energy budget exhausted).",
                f"sum({increase(DURATION + '_count', 'error_type=' + chr(34) + 'insufficient_balance' + chr(34))})",
            )
        )
        .with_row(db.Row("Energy and carbon"))
    )
    for label, title in (
        ("joule_workload", "workload"),
        ("gen_ai_response_model", "routed model"),
        ("joule_region", "region"),
        ("joule_tier", "tier"),
    ):
        dashboard = dashboard.with_panel(
            series(
                f"Power by {title}",
                "watt",
                f"Energy rate (J/s = W) by {title}.",
                query(by.format(label=label, expr=rate(ENERGY)), f"{{{{{label}}}}}"),
                width=6 if title in ("region", "tier") else 12,
            )
        )
    dashboard = (
        dashboard.with_panel(
            series(
                "Carbon rate by region",
                "massmg",
                "mg CO2e per second by the region that served the calls.",
                query(by.format(label="joule_region", expr=rate(CARBON)), "{{joule_region}}"),
                width=6,
            )
        )
        .with_panel(
            series(
                "Carbon rate by workload",
                "massmg",
                "mg CO2e per second by workload.",
                query(by.format(label="joule_workload", expr=rate(CARBON)), "{{joule_workload}}"),
                width=6,
            )
        )
        .with_row(db.Row("Per request"))
        .with_panel(
            heatmap.Panel()
            .title("Energy per request")
            .description("Distribution of joules per call (joule.client.request.energy buckets).")
            .datasource(DATASOURCE)
            .height(8)
            .span(12)
            .with_target(
                query(f"sum by (le) ({rate(REQUEST_ENERGY + '_bucket')})", "{{le}}").format(PromQueryFormat.HEATMAP)
            )
            .calculate(False)
            .cell_gap(1)
            .show_legend()
            .show_tooltip()
            .show_y_histogram()
            .exemplars_color("rgba(255,0,255,0.7)")
            .hide_from(common_builders.HideSeriesConfig().legend(False).tooltip(False).viz(False))
        )
        .with_panel(
            series(
                "Energy per request p50 / p95 by model",
                "joule",
                "Quantiles of joules per call; exemplars link to the call's trace.",
                query(
                    quantile(0.5, REQUEST_ENERGY),
                    "p50 {{gen_ai_response_model}}",
                    exemplar=True,
                ),
                query(
                    quantile(0.95, REQUEST_ENERGY),
                    "p95 {{gen_ai_response_model}}",
                    "B",
                ),
            )
        )
        .with_panel(
            series(
                "Joules per output token by model",
                "joule",
                "Energy rate divided by the output-token rate.",
                query(
                    by.format(label="gen_ai_response_model", expr=rate(ENERGY))
                    + " / "
                    + by.format(
                        label="gen_ai_response_model",
                        expr=rate(TOKENS + "_sum", 'gen_ai_token_type="output"'),
                    ),
                    "{{gen_ai_response_model}}",
                ),
            )
        )
        .with_panel(
            series(
                "Token usage",
                "short",
                "Tokens per second by type (gen_ai.client.token.usage).",
                query(by.format(label="gen_ai_token_type", expr=rate(TOKENS + "_sum")), "{{gen_ai_token_type}}"),
            )
        )
        .with_row(db.Row("Latency and refusals"))
        .with_panel(
            series(
                "Duration p95 by model",
                "s",
                "gen_ai.client.operation.duration, start to the last byte; exemplars link to traces.",
                query(
                    quantile(0.95, DURATION),
                    "{{gen_ai_response_model}}",
                    exemplar=True,
                ),
                width=8,
            )
        )
        .with_panel(
            series(
                "Time to first chunk p95 by model",
                "s",
                "Streams only: request start to the first chunk.",
                query(
                    quantile(0.95, TTFC),
                    "{{gen_ai_response_model}}",
                    exemplar=True,
                ),
                width=8,
            )
        )
        .with_panel(
            series(
                "Calls by outcome",
                "reqps",
                "Calls per second; error_type is empty on success, insufficient_balance on a 402.",
                query(by.format(label="error_type", expr=rate(DURATION + "_count")), "{{error_type}}"),
                width=8,
            )
        )
        .with_panel(
            series(
                "402 refusals by workload",
                "short",
                "Calls refused because the workload's energy budget ran out.",
                query(
                    by.format(
                        label="joule_workload",
                        expr=increase(DURATION + "_count", 'error_type="insufficient_balance"', "$__rate_interval"),
                    ),
                    "{{joule_workload}}",
                ),
                width=24,
            )
        )
        .with_row(db.Row("Budgets (JOULE_OTEL_BUDGETS)"))
        .with_panel(
            series(
                "Month-to-date energy vs budget",
                "joule",
                "joule.budget.spent (this UTC month, from the ledger and each process) and joule.budget.limit.",
                query(budget(BUDGET_SPENT), "{{joule_workload}} {{joule_budget_service}} spent"),
                query(budget(BUDGET_LIMIT), "{{joule_workload}} {{joule_budget_service}} budget", ref="B"),
                width=12,
            )
        )
        .with_panel(
            series(
                "Budget used",
                "percentunit",
                "Share of each monthly budget used; `joule-otel budgets rules` alerts at the thresholds.",
                query(
                    f"{budget(BUDGET_SPENT)} / {budget(BUDGET_LIMIT)}", "{{joule_workload}} {{joule_budget_service}}"
                ),
                width=12,
            )
        )
    )
    return dashboard.build()


def render() -> str:
    """The dashboard as the JSON file Grafana provisions."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build()) + "\n"


def main() -> int:
    """Write (or ``--check``) the dashboard JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs from the build")
    args = parser.parse_args()
    text = render()
    json.loads(text)
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
