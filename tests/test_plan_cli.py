"""`torchmics plan` and `torchmics simulate`: what they print is what the library computes, errors exit 2."""

import json
from pathlib import Path

import pytest

from torchmics.cli import main
from torchmics.plan import (
    ModelSpec,
    Strategy,
    calibrate,
    get_profile,
    plan,
    recommend,
    simulate,
    with_gpus_per_node,
)

EMULATED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h100-emulated-2x1" / "results.jsonl"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _recommendation_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("**Recommendation"))


def test_plan_prints_the_planners_recommendation(capsys):
    pytest.importorskip("torchmics.models.gpt")
    argv = ["--model", "1.4b", "--nodes", "2", "--gpus-per-node", "1", "--cluster", "emulated-h100"]
    code, out, _ = _run(capsys, "plan", *argv, "--micro-batch", "4", "--accum", "4", "--calibrate", str(EMULATED))
    cluster = calibrate(with_gpus_per_node(get_profile("emulated-h100"), 1), EMULATED)
    candidates = plan(ModelSpec.from_preset("1.4b"), cluster, 2, micro_batch=4, accum=4, options=Strategy("mics"))
    best = recommend(candidates)
    assert code == 0
    expected = f"**Recommendation: {best.label}** (partition size {best.partition_size}): "
    assert _recommendation_line(out).startswith(expected)
    assert f"| * | {best.label}" in out and "emulated-h100-calibrated" in out
    assert out.count("| mics P=") == len(candidates)


def test_plan_with_beyond_mics_options(capsys):
    """The flags reach the planner: its recommendation is the library's for the same options."""
    argv = ["--model", "1.4b", "--nodes", "2", "--gpus-per-node", "1", "--cluster", "emulated-h100", "--accum", "4"]
    code, out, _ = _run(capsys, "plan", *argv, "--optimizer-over-replicas", "--replica-reduce-dtype", "bf16")
    options = Strategy("mics", replica_reduce_bytes=2, optimizer_over_replicas=True)
    cluster = with_gpus_per_node(get_profile("emulated-h100"), 1)
    best = recommend(plan(ModelSpec.from_preset("1.4b"), cluster, 2, micro_batch=4, accum=4, options=options))
    assert code == 0
    assert "bf16 replica hop, optimizer states sharded across replicas" in out
    assert _recommendation_line(out).startswith(f"**Recommendation: {best.label}**")
    assert f"{best.memory.total_gib:.1f}" in out


def test_plan_of_a_bare_shape(capsys):
    argv = ["--params", "13e9", "--layers", "40", "--d-model", "5120", "--nodes", "4", "--activation-checkpointing"]
    code, out, _ = _run(capsys, "plan", *argv, "--reduce-dtype", "bf16")
    spec = ModelSpec.from_shape(40, 5120, 40, 2048, 50304, num_params=13_000_000_000)
    options = Strategy("mics", reduce_bytes=2)
    candidates = plan(spec, get_profile("h100-3200"), 4, micro_batch=4, activation_checkpointing=True, options=options)
    best = recommend(candidates)
    assert code == 0 and f"**Recommendation: {best.label}**" in out


def test_the_recommendation_never_calls_its_own_partition_size_unfit(capsys):
    # 13B on 2 x 8 H100s: P = 16 with hierarchical collectives needs 74.9 GiB, flat fits and is recommended.
    argv = ["--params", "13e9", "--layers", "40", "--d-model", "5120", "--nodes", "2"]
    code, out, _ = _run(capsys, "plan", *argv)
    line = _recommendation_line(out)
    assert code == 0 and line.startswith("**Recommendation: mics P=16 flat**"), line
    assert "P = 1, 2, 4, 8, 16 hier do not fit" in line and "(P = 16 hier needs 74.9 GiB)" in line, line


def test_plan_of_a_hugging_face_config(tmp_path, capsys):
    config = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 11008,
              "max_position_embeddings": 4096, "vocab_size": 32000, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = _run(capsys, "plan", "--model", f"hf:{tmp_path}", "--nodes", "1", "--seq-len", "1024")
    assert code == 0 and out.startswith(f"# torchmics plan: {tmp_path.name} on 1 x 8 GPUs")
    assert "micro-batch 4 x 1024 tokens" in out


def test_simulate_writes_what_it_prints(tmp_path, capsys):
    argv = ["--model", "mics-100b", "--cluster", "p4d", "--gpus", "128,256", "--micro-batch", "4", "--accum", "4"]
    code, out, _ = _run(capsys, "simulate", *argv, "--activation-checkpointing", "--reduce-dtype", "bf16",
                        "--out", str(tmp_path))
    rows = simulate(ModelSpec.from_preset("mics-100b"), get_profile("p4d"), 4, 4, True, [128, 256],
                    Strategy("mics", reduce_bytes=2))
    assert code == 0
    assert [json.loads(line)["label"] for line in (tmp_path / "simulate.jsonl").read_text().splitlines()] == [
        r.label for r in rows
    ]
    table = (tmp_path / "simulate.md").read_text()
    assert table.startswith("# Weak scaling of mics-100b on p4d") and table.split("\n\n")[-1].strip() in out
    assert (tmp_path / "simulate.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--model", "1.4b", "--nodes", "2", "--cluster", "dgx-9000"], "unknown cluster profile 'dgx-9000'"),
        (["plan", "--model", "mics-100b", "--nodes", "1", "--cluster", "p4d"], "even at partition = world"),
        (["simulate", "--model", "mics-100b", "--cluster", "p4d", "--gpus", "8,16"], "nothing fits at any size up"),
        (["simulate", "--model", "1.4b", "--cluster", "p4d", "--gpus", "8,12"], "must be whole nodes of 8 GPUs"),
        (["plan", "--model", "1.4b", "--params", "1e9", "--nodes", "1"], "either --model or a bare shape"),
        (["plan", "--layers", "4", "--nodes", "1"], "describe the model"),
        (["plan", "--model", "no-such-model", "--nodes", "1"], "unknown model preset"),
        (["plan", "--model", "1.4b", "--nodes", "1", "--calibrate", "missing.jsonl"], "no results file"),
        (["simulate", "--model", "1.4b", "--cluster", "p4d", "--max-gpus", "4"],
         "--max-gpus 4 is below the smallest size simulated on p4d, 8 GPUs"),
        (["plan", "--model", "1.4b", "--heads", "8", "--nodes", "1"], "either --model or a bare shape"),
        (["plan", "--params", "13e9", "--layers", "40", "--d-model", "5120", "--heads", "7", "--nodes", "1"],
         "--heads 7 must divide --d-model 5120"),
        (["simulate", "--model", "1.4b", "--cluster", "p4d", "--out", "{file}"], "is a file; it must be a folder"),
    ],
)
def test_errors_exit_2_with_the_reason(argv, message, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    argv = [arg.replace("{file}", str(tmp_path / "a-file")) for arg in argv]
    code, _, err = _run(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "simulate" and "--out" not in argv else []))
    assert code == 2 and message in err, err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--network-latency-us", "-5", "argument --network-latency-us: must be a number >= 0, got -5"),
    ("--params", "-5", "argument --params: must be a positive number, got -5"),
])
def test_impossible_numbers_are_refused_by_the_parser(flag, value, message, capsys):
    argv = ["plan", "--nodes", "1", *(["--layers", "2", "--d-model", "128"] if flag == "--params" else ["--model", "1.4b"])]
    with pytest.raises(SystemExit) as exit:
        main([*argv, flag, value])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_every_flag_with_a_default_says_it(command):
    import argparse

    from torchmics.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    silent = [a.option_strings[0] for a in parser._actions
              if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in (a.help or "")]
    assert silent == []
