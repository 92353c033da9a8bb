"""`fleetwatch --help` lists the workflows, and every command's --help works and names its
options (through `main(argv)`, as a user runs it)."""

from __future__ import annotations

import argparse

import pytest

from aggregator.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command path with its parser, leaves and groups alike."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(_commands(sub, (*path, name)))
    return out


COMMANDS = _commands(build_parser())


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0, argv
    return capsys.readouterr().out


def test_top_level_help_lists_the_workflows(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([], capsys)
    assert "workflows:" in out
    for workflow in ("fleetwatch demo", "fleetwatch serve --db", "fleetwatch certs init",
                     "fleetwatch baseline build", "fleetwatch spec push", "fleetwatch health",
                     "fleetwatch alerts", "fleetwatch compare", "fleetwatch explain",
                     "fleetwatch stats", "--http", "/metrics", "--json", "NO_COLOR"):
        assert workflow in out, workflow
    # Continuation lines are their own lines (a lone backslash in the epilog would join them).
    assert "--baseline 1 \\\n" in out


def test_the_test_sees_every_command() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"demo", "serve", "health", "privacy", "cohorts", "alerts", "compare", "explain",
            "stats", "baseline build", "spec push", "spec show", "certs init",
            "certs issue-device"} <= names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) or "fleetwatch"
                                                       for p, _ in COMMANDS])
def test_every_help_exits_0_and_names_its_options(path: tuple[str, ...],
                                                  parser: argparse.ArgumentParser,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(list(path), capsys)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in out, (path, option)
        if action.help and action.help != argparse.SUPPRESS and not action.option_strings \
                and not isinstance(action, argparse._SubParsersAction):
            assert action.dest in out or (action.metavar or "") in out, (path, action.dest)


# Commands that print data take --json (a script reads them); the rest act (serve, demo's
# --print-rules) or write files and say where.
PRINTS_DATA = ("health", "privacy", "cohorts", "alerts", "compare", "explain", "stats", "demo",
               "spec show", "spec push", "certs init", "certs issue-server",
               "certs issue-device", "certs issue-operator")


@pytest.mark.parametrize("command", PRINTS_DATA)
def test_every_command_that_prints_data_has_json(command: str) -> None:
    parser = dict((" ".join(p), q) for p, q in COMMANDS)[command]
    assert any("--json" in a.option_strings for a in parser._actions), command


def test_spec_show_and_certs_print_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from aggregator.baseline import build_spec_from_columns
    from aggregator.simulator import LATENCY_COLUMN, PREDICTION_COLUMN, reference_columns

    spec = build_spec_from_columns(reference_columns(2000, 1), model="m", model_version="1",
                                   prediction_col=PREDICTION_COLUMN, latency_col=LATENCY_COLUMN,
                                   categorical=("scene", "lens"))
    spec.save(tmp_path / "spec.json")
    assert main(["spec", "show", str(tmp_path / "spec.json"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["model"], shown["hash"]) == ("m", spec.hash)
    assert [f["name"] for f in shown["features"]] == [f.name for f in spec.features]
    assert shown["prediction"]["name"] == PREDICTION_COLUMN and shown["privacy"]["noisy"]

    assert main(["certs", "init", "--dir", str(tmp_path / "pki"), "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["what"] == "CA" and issued["serial"] and issued["not_after"]
    assert {p.rsplit("/", 1)[-1] for p in issued["paths"]} >= {"ca.pem", "server.pem"}
    assert all((tmp_path / "pki" / p.rsplit("/", 1)[-1]).exists() for p in issued["paths"])
