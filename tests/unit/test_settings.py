"""Settings and their environment twins: the flag wins, a bad twin is one line, never a crash.

The variables below are exactly what Kubernetes injects into every pod of a namespace with the
chart's Services (`pcipt-webhook`, `pcipt-controller-metrics`) when service links are on.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from controller import cli as controller_cli
from controller.runtime import ControllerSettings
from nodeplugin import cli as nodeplugin_cli
from nodeplugin.settings import AgentSettings
from pcipt.settings import Setting, SettingError, add_settings, parse_args, resolve


def service_links(service: str, ip: str, port: int) -> dict[str, str]:
    """The docker-link style variables the kubelet writes for one Service (enableServiceLinks)."""
    name = service.upper().replace("-", "_")
    url = f"tcp://{ip}:{port}"
    return {
        f"{name}_SERVICE_HOST": ip,
        f"{name}_SERVICE_PORT": str(port),
        f"{name}_PORT": url,
        f"{name}_PORT_{port}_TCP": url,
        f"{name}_PORT_{port}_TCP_PROTO": "tcp",
        f"{name}_PORT_{port}_TCP_PORT": str(port),
        f"{name}_PORT_{port}_TCP_ADDR": ip,
    }


CHART = Path(__file__).resolve().parents[2] / "charts" / "pcipt"

INJECTED = {
    **service_links("pcipt-webhook", "10.96.0.7", 443),
    **service_links("pcipt-controller-metrics", "10.96.0.8", 8080),
}

# The controller's arguments as the chart renders them (webhook on, self-issued certificate).
CHART_ARGS = [
    "run",
    "--namespace=pcipt-system",
    "--leader-elect",
    "--leader-elect-lease=pcipt-controller",
    "--scoring=best-fit",
    "--webhook=serve",
    "--webhook-port=9443",
    "--webhook-service=pcipt-webhook",
    "--webhook-secret=pcipt-webhook-tls",
    "--metrics-host=0.0.0.0",
    "--metrics-port=8080",
    "--log-format=json",
    "--log-level=info",
]


def parse_controller(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):  # type: ignore[no-untyped-def]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return parse_args(
        controller_cli.build_parser(),
        {"run": controller_cli.RUN_SETTINGS},
        argv,
    )


def test_injected_service_links_do_not_matter_when_the_flags_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse_controller(CHART_ARGS, monkeypatch, INJECTED)
    assert args.webhook_port == 9443
    assert args.metrics_port == 8080
    assert args.log_level == "INFO"
    assert args.leader_elect is True
    assert args.leader_elect_lease == "pcipt-controller"


def test_a_twin_of_the_wrong_type_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a for a in CHART_ARGS if not a.startswith("--webhook-port")]
    with pytest.raises(SystemExit) as exit_info:
        parse_controller(argv, monkeypatch, INJECTED)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pcipt-controller: PCIPT_WEBHOOK_PORT='tcp://10.96.0.7:443'")
    assert "expected an integer" in err
    assert "enableServiceLinks: false" in err
    assert "Traceback" not in err


def test_the_twin_is_used_when_the_flag_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_controller(
        ["run"],
        monkeypatch,
        {"PCIPT_WEBHOOK_PORT": "9555", "PCIPT_LEADER_ELECT": "true", "PCIPT_CLAIM_GRACE": "2.5"},
    )
    assert args.webhook_port == 9555
    assert args.leader_elect is True
    assert args.claim_grace == 2.5
    assert args.scoring == "best-fit"  # the default


def test_the_main_entry_point_reports_a_bad_twin_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PCIPT_LEASE_DURATION", "forty")
    with pytest.raises(SystemExit) as exit_info:
        nodeplugin_cli.main(["run", "--simulate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "pcipt-nodeplugin: PCIPT_LEASE_DURATION='forty': expected an integer\n"


def test_a_twin_only_matters_to_the_command_that_has_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    # `discover` has no lease or restore setting: their twins are never read.
    monkeypatch.setenv("PCIPT_LEASE_DURATION", "forty")
    monkeypatch.setenv("PCIPT_RESTORE_DRIVERS", "maybe")
    assert nodeplugin_cli.main(["discover", f"--sysfs-root={tmp_path}", "-o", "json"]) == 0


@pytest.mark.parametrize(
    ("setting", "text", "message"),
    [
        (Setting("--n", 1, "n", int), "x", "PCIPT_N='x': expected an integer"),
        (Setting("--f", 1.0, "f", float), "1,5", "PCIPT_F='1,5': expected a number"),
        (Setting("--b", False, "b", kind="flag"), "maybe", "PCIPT_B='maybe': expected a boolean"),
        (
            Setting("--mode", "a", "m", choices=("a", "b")),
            "c",
            "PCIPT_MODE='c': expected one of a, b",
        ),
    ],
)
def test_every_type_names_what_it_expects(setting: Setting, text: str, message: str) -> None:
    args = argparse.Namespace()
    with pytest.raises(SettingError, match=message.replace("(", r"\(")):
        resolve(args, [setting], {setting.variable: text})


def test_a_bad_flag_value_is_refused_by_argparse_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="p")
    add_settings(parser, [Setting("--port", 1, "port", int)])
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "tcp://x"])
    assert "argument --port: 'tcp://x': expected an integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings",
    [
        controller_cli.RUN_SETTINGS,
        (*nodeplugin_cli.COMMON_SETTINGS, *nodeplugin_cli.RUN_SETTINGS),
    ],
    ids=["controller", "nodeplugin"],
)
def test_each_setting_has_one_flag_and_one_twin(settings: tuple[Setting, ...]) -> None:
    flags = [s.flag for s in settings]
    variables = [s.variable for s in settings]
    assert len(set(flags)) == len(flags)
    assert len(set(variables)) == len(variables)
    # Resolving with an empty environment gives every default, of the declared type.
    args = argparse.Namespace()
    resolve(args, settings, {})
    for s in settings:
        if s.kind == "flag":
            assert isinstance(getattr(args, s.dest), bool), s.flag


@pytest.mark.parametrize(
    ("settings", "template"),
    [
        (controller_cli.RUN_SETTINGS, "controller-deployment.yaml"),
        (nodeplugin_cli.RUN_SETTINGS, "nodeplugin-daemonset.yaml"),
    ],
    ids=["controller", "nodeplugin"],
)
def test_the_chart_passes_every_flag_a_service_link_could_spell(
    settings: tuple[Setting, ...], template: str
) -> None:
    """PCIPT_<X>_PORT is what a Service named pcipt-<x> injects; the chart turns service links
    off, and passes each such setting as a flag anyway, so the variable never matters."""
    text = (CHART / "templates" / template).read_text()
    assert "enableServiceLinks: false" in text
    for s in settings:
        if s.variable.endswith("_PORT"):
            assert f"- {s.flag}=" in text, f"{template} does not pass {s.flag}"


@pytest.mark.parametrize(
    ("settings", "dataclass_", "renames"),
    [
        (
            controller_cli.RUN_SETTINGS,
            ControllerSettings,
            {
                "leader_elect_lease_duration": "lease_duration",
                "leader_elect_renew_period": "renew_period",
            },
        ),
        (
            (*nodeplugin_cli.COMMON_SETTINGS, *nodeplugin_cli.RUN_SETTINGS),
            AgentSettings,
            {"node_name": "node"},
        ),
    ],
    ids=["controller", "nodeplugin"],
)
def test_a_flag_without_value_means_what_the_program_runs_with(
    settings: tuple[Setting, ...], dataclass_: type, renames: dict[str, str]
) -> None:
    """Each default is declared once, on the settings the program runs with: the flag's default
    is that field's default (where the CLI spells the value the same way). Not the identity
    (computed per process) nor the metrics port (off for code that builds the settings itself,
    such as tests and benchmarks; the program serves on 8080)."""
    args = argparse.Namespace()
    resolve(args, settings, {})
    fields = {f.name: f for f in dataclasses.fields(dataclass_)}
    checked = 0
    for s in settings:
        name = renames.get(s.dest, s.dest)
        f = fields.get(name)
        if f is None or f.default is dataclasses.MISSING or name in {"identity", "metrics_port"}:
            continue
        if not isinstance(getattr(args, s.dest), type(f.default)):
            continue  # spelled differently on the command line ('' for None, a cpulist)
        assert getattr(args, s.dest) == f.default, s.flag
        checked += 1
    assert checked >= 8
