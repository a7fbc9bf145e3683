"""The `zebra` command as installed (.venv/bin/zebra), its subcommands from the entry-point group,
the layering it keeps (no Ray for --help or convert; zebra/ imports no layer above it), the
refusals of `zebra convert`, and every command line README.md shows: each is parsed by the real
parser or its --help run, or it is one the launch-file tests cover, so the README cannot drift."""
import ast
import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from jobs.spec import load_spec
from tests.jobs.conftest import teacher_dir  # noqa: F401  (a fixture: a tiny Llama with the SmolLM2 tokenizer)
from zebra.cli import COMMANDS_GROUP, build_parser, main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ZEBRA = BIN / "zebra"  # the console script pip installed from pyproject's [project.scripts]
SUBCOMMANDS = ("convert", "eval", "run", "serve", "submit", "tune")
LAYERS_ABOVE_ZEBRA = ("ray", "jobs", "tune", "serve", "cluster")
TIMEOUT_S = 240


def run_all(cmds: list[list[str]], **kw) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side (each mostly waits on imports); results in order."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **kw.pop("env", {})}
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, **kw) for cmd in cmds]
    results = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=TIMEOUT_S)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def imported(stderr: str) -> set[str]:
    """Top-level packages a process imported, from its -X importtime report on stderr."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", stderr, re.M)}


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    tail = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))[-3000:]
    assert result.returncode == 0, f"{' '.join(map(str, result.args))} exited {result.returncode}:\n{tail}"
    return result


# ---- the installed script and its subcommands -------------------------------------------------------

def test_installed_zebra_help_lists_every_subcommand_without_ray():
    result = check(run_all([[ZEBRA, "--help"]])[0])
    assert result.stdout.startswith("usage: zebra")
    listed = re.findall(r"^    (\w+)\s", result.stdout, re.M)
    assert tuple(sorted(listed)) == SUBCOMMANDS
    modules = imported(result.stderr)
    assert "zebra" in modules and "ray" not in modules, sorted(modules)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: zebra {command}")


# Runs the installed script (its own code, as its shebang would) once per subcommand in one process, so
# torch and transformers are imported once, not once per subcommand; after each help it reports on
# stderr whether Ray has been imported so far (a later help cannot hide an earlier one's import).
HELP_EACH = """
import runpy, sys
script, commands = sys.argv[1], sys.argv[2:]
for command in commands:
    sys.argv = [script, command, "--help"]
    print(f"=== zebra {command} --help", flush=True)
    try:
        runpy.run_path(script, run_name="__main__")
        code = None
    except SystemExit as e:
        code = e.code
    print(f"=== zebra {command} --help: exit {code}, ray imported: {'ray' in sys.modules}", file=sys.stderr,
          flush=True)
"""


def test_installed_subcommand_help():
    result = check(run_all([[sys.executable, "-c", HELP_EACH, ZEBRA, *SUBCOMMANDS]])[0])
    helps = re.split(r"^=== zebra (\w+) --help\n", result.stdout, flags=re.M)[1:]
    assert helps[::2] == list(SUBCOMMANDS), result.stdout[:3000]
    reports = re.findall(r"^=== zebra (\w+) --help: exit (\S+), ray imported: (\w+)$", result.stderr, re.M)
    assert reports == [(command, "0", "False") for command in SUBCOMMANDS], reports
    for command, text in zip(helps[::2], helps[1::2]):
        assert text.startswith(f"usage: zebra {command}"), text[:500]
    assert "ray" not in imported(result.stderr)  # heavy modules load when a command runs, not for its help


def test_entry_points_are_the_installed_ones():
    """pyproject.toml's "zebra.commands" group is what the environment has (else: pip install -e . again)."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][COMMANDS_GROUP]
    installed = {ep.name: ep.value for ep in entry_points(group=COMMANDS_GROUP)}
    assert installed == declared
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"] == {"zebra": "zebra.cli:main"}


def test_zebra_imports_no_layer_above_it():
    """DESIGN: zebra/ never imports ray, cluster, jobs, tune or serve (the CLI's subcommands arrive by entry point)."""
    found = []
    for path in sorted((REPO / "zebra").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in LAYERS_ABOVE_ZEBRA]
    assert found == []


def test_submit_builds_the_ray_job_submit_line(tmp_path):
    from jobs.cli import submit_command

    cmd = submit_command("jobs/examples/demo.yaml", str(REPO), "http://127.0.0.1:8265", no_wait=True)
    assert Path(cmd[0]).name == "ray" and cmd[1:5] == ["job", "submit", "--working-dir", str(REPO)]
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265" and "--no-wait" in cmd
    assert cmd[cmd.index("--"):] == ["--", "python", "-m", "jobs.run", "jobs/examples/demo.yaml"]
    outside = tmp_path / "spec.yaml"
    outside.write_text("name: outside\n")
    with pytest.raises(ValueError, match="not inside --working-dir"):
        submit_command(str(outside), str(REPO), None, no_wait=False)


def test_submit_refuses_a_bad_spec_before_ray(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd:\n  lr: .inf\n")
    assert main(["submit", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "zebra submit: error:" in err and "kd.lr" in err
    assert main(["submit", "jobs/examples/demo.yaml", "--dry-run", "--address", "http://h:8265"]) == 0
    assert "job submit" in capsys.readouterr().out


# ---- zebra convert: refusals before any work, and a run that never loads Ray -------------------------

RAY_LOG_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def usage_error(argv: list[str]) -> str:
    """stderr of `zebra ARGV`, which must exit 2 (argparse or UsageError)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2, err.getvalue()
    print(err.getvalue())
    # lines Ray's log monitor thread wrote meanwhile for the session's cluster ("(Actor pid=N) ...")
    return "".join(line for line in err.getvalue().splitlines(keepends=True) if not RAY_LOG_LINE.match(line))


@pytest.mark.parametrize("args, message", [
    (["--kv-rank", "0"], "argument --kv-rank: must be a positive integer, got 0"),
    (["--kv-rank", "-5"], "argument --kv-rank: must be a positive integer, got -5"),
    (["--kv-rank", "lots"], "argument --kv-rank: expected a positive integer, got 'lots'"),
    (["--qk-rope-dim", "0"], "argument --qk-rope-dim: must be a positive integer, got 0"),
    (["--qk-rope-dim", "31"], "argument --qk-rope-dim: must be even"),
    (["--calib-tokens", "0"], "argument --calib-tokens: must be a positive integer, got 0"),
    (["--q-rank", "0"], "argument --q-rank: must be a positive integer"),
    (["--mla-layers", "1,1"], "argument --mla-layers: layers [1] listed more than once"),
    (["--mla-layers", "0,-1"], "argument --mla-layers: layer indices start at 0, got [-1]"),
    (["--mla-layers", ","], "argument --mla-layers: expected at least one layer index"),
])
def test_convert_flags_refused_by_the_parser(tmp_path, args, message):
    argv = ["convert", "--teacher", str(tmp_path / "never-read"), "--mla-layers", "0", "--out", str(tmp_path / "o")]
    assert message in usage_error(argv + args)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def config_only_teacher(tmp_path) -> Path:
    """A teacher folder with only config.json (4 layers, 2 kv heads x head_dim 16): the checks read
    nothing more, and loading its weights would fail."""
    from tests.conftest import tiny_llama_config

    folder = tmp_path / "teacher"
    tiny_llama_config().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args, message", [
    (["--mla-layers", "0,4"], "--mla-layers: [4] out of range for a teacher with 4 layers (valid 0..3)"),
    (["--mla-layers", "0", "--kv-rank", "5000"], "--kv-rank 5000 exceeds the teacher's per-layer K+V width 64, "
                                                 "the maximum"),
    (["--mla-layers", "0", "--kv-rank", "65"], "--kv-rank 65 exceeds"),
    (["--mla-layers", "0", "--kv-rank", "8", "--qk-rope-dim", "34"], "--qk-rope-dim 34 exceeds the teacher's per-layer key width 32"),
    (["--full-rank", "--kv-rank", "8"], "--full-rank keeps every layer and dimension of the teacher; drop --kv-rank"),
    ([], "--mla-layers is required unless --full-rank is given"),
])
def test_convert_shape_refused_against_the_teacher(config_only_teacher, tmp_path, args, message):
    msg = usage_error(["convert", "--teacher", str(config_only_teacher), "--out", str(tmp_path / "o"), *args])
    assert msg.startswith("zebra convert: error:") and message in msg


def test_convert_unwritable_out_refused_before_the_teacher_loads(tmp_path, monkeypatch):
    import zebra.teacher

    monkeypatch.setattr(zebra.teacher, "teacher_folder", lambda *a: pytest.fail("the teacher was looked up"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    msg = usage_error(["convert", "--mla-layers", "0", "--out", str(blocker / "out")])
    assert f"--out {blocker / 'out'}: cannot write to" in msg and "Not a directory" in msg


def test_convert_missing_teacher_named(tmp_path):
    msg = usage_error(["convert", "--teacher", str(tmp_path / "nope.gguf"), "--mla-layers", "0", "--out",
                       str(tmp_path / "o")])
    assert f"--teacher '{tmp_path / 'nope.gguf'}'" in msg


@pytest.mark.slow  # a process importing torch + the GGUF tokenizer fixture: ~15-30 s on 2 busy cores
def test_installed_convert_runs_without_ray(teacher_dir, tmp_path):  # noqa: F811
    """The installed script converts a tiny teacher (2 of 4 layers MLA) and never imports Ray."""
    out = tmp_path / "hybrid"
    result = check(run_all([[ZEBRA, "convert", "--teacher", teacher_dir, "--mla-layers", "0,3", "--kv-rank", "8",
                             "--qk-rope-dim", "4", "--calib-tokens", "64", "--out", out, "--json"]])[0])
    assert "ray" not in imported(result.stderr)
    report = json.loads(result.stdout)
    assert [row["type"] for row in report["layers"]] == ["mla", "mamba", "mamba", "mla"]
    assert report["student_kv_bytes_per_token"] == 2 * (8 + 4) * 2  # 2 MLA layers x (latent + rope key) x bf16
    assert report["teacher_kv_bytes_per_token"] == 4 * 2 * 2 * 8 * 2  # layers x K,V x kv heads x head_dim x bf16
    assert all(row["init_error"] > 0 for row in report["layers"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mixer_types == ["mla", "mamba", "mamba", "mla"] and model.config.kv_rank == 8


# ---- every command README.md shows -------------------------------------------------------------------

COMMAND_WORDS = ("zebra", "python", "ray", "make", "docker", "kubectl", "pip")


def readme_commands() -> list[str]:
    """Command lines of README.md: the lines of its bash blocks (and commands their comments name after
    "or:"), and inline code that starts with a command word."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a continued line is one command
            command, comment = (re.split(r"\s#\s", line + " ", maxsplit=1) + [""])[:2]
            lines += [command.strip()] if command.strip() else []
            lines += [m.strip() for m in re.findall(r"or: (.+)$", comment)]
    for span in re.findall(r"`([^`\n]+)`", text):
        first = span.split()[0].removeprefix(".venv/bin/")
        if first in COMMAND_WORDS and (" " in span or first == "zebra") and not span.startswith(tuple("`(")):
            lines.append(span)
    return list(dict.fromkeys(lines))


def test_readme_commands_found():
    lines = readme_commands()
    assert any(line.startswith(".venv/bin/zebra convert") for line in lines)
    assert {"make demo", "make test", "kubectl apply -f cluster/launch/rayjob.yaml"} <= set(lines)
    assert any(line.startswith("ray job submit") for line in lines)


def zebra_parses(args: list[str]) -> None:
    """The real parser accepts the line (placeholders like SPEC are strings to it); a bare `zebra X`
    in prose stands for its help, and `zebra COMMAND ...` for the line with each subcommand."""
    if args and args[0] == "COMMAND":
        for command in SUBCOMMANDS:
            zebra_parses([command, *args[1:]])
        return
    if len(args) == 1 and args[0] in SUBCOMMANDS:
        args = [*args, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            build_parser().parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"zebra {' '.join(args)}: {out.getvalue()}"


def repo_path(arg: str) -> Path:
    """A path the README passes, in this checkout (the image keeps the checkout at /home/ray/zebra)."""
    return REPO / arg.removeprefix("/home/ray/zebra/")


def check_files(args: list[str], made: set[str]) -> None:
    for arg in args:
        if arg.endswith((".yaml", "Dockerfile")) and not arg.startswith("runs/") and arg not in made:
            assert repo_path(arg).is_file(), f"README names {arg}, which does not exist"
            if "jobs/examples/" in arg:
                load_spec(repo_path(arg))


def help_checks(line: str, made: set[str]) -> list[tuple[list[str], list[str]]]:
    """Static checks of one README line; returns the (--help command, flags its output must name) to run.
    made: files that earlier lines write (`... > FILE`), which later lines may use."""
    args = shlex.split(line)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", args[0]):  # VAR=value before the command
        args.pop(0)
    if args[0] in ("zebra", ".venv/bin/zebra"):
        assert args[0] == "zebra" or ZEBRA.is_file()
        zebra_parses(args[1:])
        return []
    if args[0] == "sed":
        sed_writes_a_valid_spec(line, made)
        return []
    check_files(args, made)
    if args[0] in ("python", ".venv/bin/python"):
        assert args[1] == "-m", line
        return [(["python", "-m", args[2], "--help"], [])]
    if args[0] == "ray":
        entry = args.index("--") if "--" in args else len(args)
        words = [a for a in args[1:entry] if re.fullmatch(r"[a-z]+", a)][:2 if args[1] == "job" else 1]
        flags = [a.split("=")[0] for a in args[1:entry] if a.startswith("--")]
        nested = help_checks(shlex.join(args[entry + 1:]), made) if entry < len(args) else []
        return [(["ray", *words, "--help"], flags)] + nested
    if args[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert args[1] in targets, f"README runs `make {args[1]}`; the Makefile has {targets}"
        return []
    covered_by_launch_file_tests(args)
    return []


def sed_writes_a_valid_spec(line: str, made: set[str]) -> None:
    """`sed ... SPEC > NEW.yaml`: run the sed (not the redirect) here and validate what it writes."""
    command, _, target = line.rpartition(" > ")
    assert target.endswith(".yaml") and command, f"README's sed line should write a job spec: {line!r}"
    check_files(shlex.split(command), made)
    edited = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, check=True).stdout
    load_spec(yaml.safe_load(edited), source=f"README: {line}")
    made.add(target.strip())


def covered_by_launch_file_tests(args: list[str]) -> None:
    """docker, kubectl and pip lines belong to cluster/launch/, which tests/cluster/test_launch_files.py
    validates: the names here must be the files' own."""
    job = yaml.safe_load((REPO / "cluster/launch/rayjob.yaml").read_text())
    image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    launcher = yaml.safe_load((REPO / "cluster/launch/ray-cluster.yaml").read_text())
    quiet = [a for a in args if a != "-q"]
    if args[:2] == ["docker", "build"]:
        assert args[args.index("-t") + 1] == image and args[args.index("-f") + 1] == "cluster/launch/Dockerfile"
    elif args[:2] == ["docker", "push"]:
        assert args[2] == image
    elif args[:2] == ["kubectl", "apply"]:
        assert args[3] == "cluster/launch/rayjob.yaml"
    elif args[:2] == ["kubectl", "logs"]:
        assert args[-1] == f"job/{job['metadata']['name']}"  # KubeRay's submitter Job takes the RayJob's name
    elif args[:2] == ["pip", "install"]:
        assert quiet in [[a for a in shlex.split(cmd) if a != "-q"] for cmd in launcher["setup_commands"]], args
    else:
        pytest.fail(f"README shows a command this test cannot check: {shlex.join(args)!r}; teach help_checks about it")


def help_output(cmd: list[str]) -> str:
    """stdout of `python -m MODULE --help` or `ray ... --help`, run in this process as those commands
    run it (runpy as __main__; Ray's click CLI): the exit status must be 0."""
    out = io.StringIO()
    if cmd[0] == "ray":
        from click.testing import CliRunner
        from ray.scripts.scripts import cli

        result = CliRunner().invoke(cli, cmd[1:])
        assert result.exit_code == 0, f"{shlex.join(cmd)}: {result.output}"
        return result.output
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info, \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [cmd[2], *cmd[3:]])
        runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
    assert info.value.code in (0, None), f"{shlex.join(cmd)}: {out.getvalue()}"
    return out.getvalue()


def test_every_readme_command_parses_runs_or_is_covered():
    """zebra lines parse with the real parser; python -m and ray lines run their --help (and the flags
    they use appear in it); files exist and specs validate; make targets exist; the docker, kubectl and
    pip lines name what the launch files hold."""
    made: set[str] = set()
    checks = {tuple(cmd): needles for line in readme_commands() for cmd, needles in help_checks(line, made)}
    assert ("python", "-m", "jobs.run", "--help") in checks and ("ray", "job", "submit", "--help") in checks
    for cmd, needles in checks.items():
        text = help_output(list(cmd))
        missing = [n for n in needles if n not in text]
        assert not missing, f"{shlex.join(cmd[:-1])} has no {missing}"
