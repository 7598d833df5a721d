"""The ``federation`` command as a user runs it: real subprocesses against real nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from federation.coordinator import Coordinator
from federation.local import LocalFederation


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def federation_toml(local_fed: LocalFederation, tmp_path: Path) -> Path:
    pki_dir = local_fed.workdir / "pki"
    lines = [
        "[coordinator]",
        "timeout_s = 30",
        "",
        "[tls]",
        f'ca = "{pki_dir / "ca.pem"}"',
        f'cert = "{pki_dir / "local-researcher.pem"}"',
        f'key = "{pki_dir / "local-researcher.key"}"',
    ]
    for name, proc in local_fed.processes.items():
        lines += ["", "[[nodes]]", f'name = "{name}"', f'address = "{proc.address}"']
    path = tmp_path / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_query_json_has_estimate_interval_and_per_node_costs(federation_toml: Path) -> None:
    proc = run(
        "query", "mean", "--config", str(federation_toml), "--dataset", "credit",
        "--column", "income", "--where", "age >= 30", "--epsilon", "0.5", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    estimate = out["groups"][0]["estimates"][0]
    assert estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]
    assert {n["node"] for n in out["nodes"]} == {"hong-kong", "shenzhen"}
    for node in out["nodes"]:
        assert node["epsilon_charged"] == pytest.approx(0.5)
        assert node["remaining_epsilon"] < 1000
        assert len(node["receipt_id"]) == 32
        assert node["receipt"]["id"] == node["receipt_id"]


def test_query_group_by_table_and_describe(federation_toml: Path) -> None:
    proc = run(
        "query", "count", "--config", str(federation_toml), "--dataset", "credit",
        "--group-by", "housing", "--epsilon", "0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for value in ("own", "mortgage", "rent", "public", "family", "95% CI"):
        assert value in proc.stdout
    described = run("describe", "--config", str(federation_toml), "--json")
    assert described.returncode == 0, described.stderr
    info = json.loads(described.stdout)
    assert info["hong-kong"]["consumer"] == "local-researcher"
    assert info["shenzhen"]["budget"]["releases"] >= 1


def test_describe_shows_the_reachable_nodes_when_one_is_down(
    federation_toml: Path, tmp_path: Path
) -> None:
    config = tmp_path / "with-a-dead-node.toml"
    dead = '\n[[nodes]]\nname = "macau"\naddress = "127.0.0.1:1"\n'
    config.write_text(federation_toml.read_text() + dead)
    proc = run("describe", "--config", str(config), "--json")
    assert proc.returncode == 1
    info = json.loads(proc.stdout)
    assert info["hong-kong"]["node"] == "hong-kong"
    assert info["shenzhen"]["node"] == "shenzhen"
    assert "error" in info["macau"]
    assert "node 'macau' not described" in proc.stderr


def test_bad_query_exits_2_with_a_clear_message(federation_toml: Path) -> None:
    proc = run(
        "query", "sum", "--config", str(federation_toml), "--dataset", "credit",
        "--column", "salary", "--epsilon", "0.5",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "has no column 'salary'" in proc.stderr
    bad_filter = run(
        "query", "count", "--config", str(federation_toml), "--dataset", "credit",
        "--where", "age >>= 3", "--epsilon", "0.5",
    )  # fmt: skip
    assert bad_filter.returncode == 2
    assert "filter" in bad_filter.stderr


def test_train_checks_where_it_will_write_before_any_round_is_charged(
    federation_toml: Path, fed: Coordinator, tmp_path: Path
) -> None:
    before = {n: d.budget.releases for n, d in fed.describe().items()}
    common = [
        "train", "--config", str(federation_toml), "--dataset", "credit", "--model",
        "logistic", "--features", "age,income", "--target", "defaulted", "--rounds", "1",
        "--target-epsilon", "1", "--local-steps", "1", "--no-progress",
    ]  # fmt: skip
    no_folder = run(*common, "--out", str(tmp_path / "missing" / "m.safetensors"))
    assert no_folder.returncode == 2, no_folder.stderr
    assert "--out: folder" in no_folder.stderr
    assert "does not exist" in no_folder.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = str(tmp_path / "m.safetensors")
    bad_dir = run(*common, "--out", out, "--checkpoint-dir", str(a_file))
    assert bad_dir.returncode == 2, bad_dir.stderr
    assert "checkpoint directory" in bad_dir.stderr
    assert not (tmp_path / "m.safetensors").exists()
    under_a_file = run(*common, "--out", str(a_file / "m.safetensors"))
    assert under_a_file.returncode == 2, under_a_file.stderr
    assert f"--out: {a_file} is a file, not a folder" in under_a_file.stderr
    # A model already there cost privacy budget: kept unless --overwrite says otherwise.
    kept = tmp_path / "kept.safetensors"
    kept.write_bytes(b"a model that cost epsilon")
    existing = run(*common, "--out", str(kept))
    assert existing.returncode == 2, existing.stderr
    assert "already holds a model; pass --overwrite to replace it" in existing.stderr
    assert kept.read_bytes() == b"a model that cost epsilon"
    after = {n: d.budget.releases for n, d in fed.describe().items()}
    assert after == before


def test_common_mistakes_exit_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("age,income\n30,100\n40,200\n")
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe[x")
    empty_json = tmp_path / "results.json"
    empty_json.write_text("{}")
    node_toml = tmp_path / "node.toml"
    assert run("node", "init", str(data), "--out", str(node_toml)).returncode == 0
    hand_edited = node_toml.read_text() + "# the operator's edits\n"
    node_toml.write_text(hand_edited)
    in_the_way = tmp_path / "state-file"
    in_the_way.write_text("")
    with_file_state = tmp_path / "file-state.toml"
    with_file_state.write_text(
        "\n".join(
            f'state_dir = "{in_the_way}"' if line.startswith("state_dir =") else line
            for line in hand_edited.splitlines()
        )
    )
    mistakes = {
        "quantiles": (
            ["query", "quantile", "--dataset", "d", "--column", "age", "--quantiles", "0.5,x",
             "--epsilon", "1"],
            "--quantiles: expected numbers",
        ),
        "config is a folder": (["describe", "--config", str(tmp_path)], "Is a directory"),
        "config not UTF-8": (
            ["describe", "--config", str(tmp_path / "bad.toml")], "not UTF-8 text"
        ),
        "log level": (
            ["node", "serve", "--config", str(node_toml), "--log-level", "verbose"],
            "invalid choice: 'VERBOSE'",
        ),
        "init over a config": (
            ["node", "init", str(data), "--out", str(node_toml)], "pass --force to overwrite"
        ),
        "init into no folder": (
            ["node", "init", str(data), "--out", str(tmp_path / "no" / "n.toml")],
            "No such file or directory",
        ),
        "state_dir is a file": (
            ["node", "serve", "--config", str(with_file_state), "--insecure"],
            "node.state_dir: cannot use",
        ),
        "--ca not a certificate": (
            ["receipts", "verify", str(empty_json), "--ca", str(data)], "is not a PEM certificate"
        ),
        "certs into no folder": (
            ["certs", "init", "--out", str(in_the_way / "pki")], "Not a directory"
        ),
    }  # fmt: skip
    for what, (args, message) in mistakes.items():
        proc = run(*args)
        assert proc.returncode == 2, (what, proc.stderr)
        assert message in proc.stderr, (what, proc.stderr)
        assert "Traceback" not in proc.stderr, (what, proc.stderr)
    assert node_toml.read_text() == hand_edited  # never overwritten without --force
    resume = run(
        "train", "--dataset", "d", "--features", "a", "--target", "t", "--rounds", "1",
        "--target-epsilon", "1", "--out", str(tmp_path / "m.safetensors"), "--resume",
    )  # fmt: skip
    assert resume.returncode == 2
    assert "--resume needs --checkpoint-dir" in resume.stderr
    version = run("--version")
    assert (version.returncode, version.stdout.split()[0]) == (0, "federation")
    help_text = run("audit", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "usage: federation audit" in help_text.stdout


def test_node_serve_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nname = "hk"\nlisten = "127.0.0.1:0"\n[[datasets]]\nname = 3\n')
    proc = run("node", "serve", "--config", str(config))
    assert proc.returncode == 2
    assert "datasets[0].name" in proc.stderr


def _copied_config(
    local_fed: LocalFederation, tmp_path: Path, *, listen: str = "127.0.0.1:0"
) -> list[str]:
    """The lines of hong-kong's running config, listening on ``listen``, with a state dir
    of its own under ``tmp_path``."""
    return [
        f'listen = "{listen}"'
        if line.startswith("listen =")
        else f'state_dir = "{tmp_path / "state"}"'
        if line.startswith("state_dir =")
        else line
        for line in local_fed.processes["hong-kong"].config_path.read_text().splitlines()
    ]


def test_node_serve_refuses_an_allowed_model_it_cannot_build(
    local_fed: LocalFederation, tmp_path: Path
) -> None:
    # A typo in allowed_models would otherwise show only as every training request for it
    # being refused; the node names the key, the nearest architecture and the known ones.
    lines = _copied_config(local_fed, tmp_path)
    at = next(i for i, line in enumerate(lines) if line.startswith("[consumers."))
    lines.insert(at + 1, 'allowed_models = ["logistic", "mlpp"]')
    config = tmp_path / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = run("node", "serve", "--config", str(config), "--insecure")
    assert proc.returncode == 2, proc.stderr
    consumer = lines[at].removeprefix("[consumers.").rstrip("]").strip('"')
    assert (
        f"consumers.{consumer}.allowed_models: 'mlpp' is not an architecture this node "
        "builds (did you mean 'mlp'?); it builds: logistic, mlp, wide-mlp"
    ) in proc.stderr


def test_a_second_node_on_a_serving_nodes_address_fails_to_start(
    local_fed: LocalFederation, tmp_path: Path
) -> None:
    # The same node config with its own ledger: sharing the port (SO_REUSEPORT) would let
    # the kernel split a consumer's calls between two budgets.
    running = local_fed.processes["hong-kong"]
    lines = _copied_config(local_fed, tmp_path, listen=running.address)
    config = tmp_path / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = run("node", "serve", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert f"node.listen: cannot bind {running.address}" in proc.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # Found by review: the node served, refusing every certificate (a log line only).
        ("revocation", "tls.revocation: "),
        # Found by review: the node served; every consumer's handshake failed, blaming it.
        ("ca", "tls.ca: holds no CA certificate"),
    ],
)
def test_node_serve_refuses_unusable_tls_files_naming_the_key(
    local_fed: LocalFederation, tmp_path: Path, edit: str, message: str
) -> None:
    lines = _copied_config(local_fed, tmp_path)
    at = lines.index("[tls]")
    cert = next(line for line in lines[at:] if line.startswith("cert ="))
    if edit == "revocation":
        revoked = tmp_path / "revoked.txt"
        revoked.write_text("not-a-serial!!\n")
        lines.insert(at + 1, f'revocation = "{revoked}"')
    else:
        lines = [
            cert.replace("cert =", "ca =") if line.startswith("ca =") else line for line in lines
        ]
    config = tmp_path / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = run("node", "serve", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_node_init_writes_a_starter_config_without_data_values(tmp_path: Path) -> None:
    data = tmp_path / "loans.csv"
    table = pa.table({"amount": [12345.67, 89012.34], "approved": [True, False]})
    pa_csv.write_csv(table, data)
    out = tmp_path / "node.toml"
    proc = run("node", "init", str(data), "--name", "hong-kong", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "amount" in text
    assert "approved" in text
    assert "12345" not in text
    assert "89012" not in text


def test_certs_commands_write_a_ca_and_certificates(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    assert run("certs", "init", "--out", str(pki_dir)).returncode == 0
    node = run(
        "certs", "issue", "--ca", str(pki_dir), "--name", "hong-kong", "--role", "node",
        "--host", "127.0.0.1,node.hk.example",
    )  # fmt: skip
    assert node.returncode == 0, node.stderr
    consumer = run(
        "certs", "issue", "--ca", str(pki_dir), "--name", "acme-ai", "--role", "consumer"
    )
    assert consumer.returncode == 0, consumer.stderr
    assert (pki_dir / "acme-ai.key").stat().st_mode & 0o777 == 0o600
    assert (pki_dir / "hong-kong.pem").exists()
