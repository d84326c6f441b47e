"""`minidisc plan`: parameter counts at billion scale from the architecture alone, memory per GPU, fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidisc_ray.families import count_params
from minidisc_ray.plan import _shape, candidate_models, load_architecture, make_plan, stage_memory
from minidisc_ray.pruning import PruningPlan, prune_model

from .conftest import REPO, tiny_llama


@pytest.mark.parametrize(("hub_id", "published"), [("meta-llama/Llama-3.1-8B", 8.03e9),
                                                   ("meta-llama/Llama-3.1-70B", 70.6e9),
                                                   ("Qwen/Qwen2.5-7B", 7.62e9)])
def test_planned_teacher_sizes_match_the_published_counts(hub_id: str, published: float) -> None:
    arch = load_architecture(hub_id)  # the bundled config.json: no network, no weights
    plan = make_plan(arch, "lm", [0.7, 0.8], 0.9, 512, 4, 4, 8, 80.0, source=hub_id)
    assert abs(plan["teacher_params"] - published) / published < 0.01
    params = [r["params"] for r in plan["candidates"]]
    assert params == sorted(params, reverse=True) and plan["candidates"][-1]["role"] == "student"
    flops = plan["candidates"][0]["gflops_per_token"] * 1e9
    assert 1.8 * plan["teacher_params"] < flops < 2.1 * plan["teacher_params"]


def test_llama_8b_config_on_8_gpus_says_which_stages_fit(capsys: pytest.CaptureFixture[str]) -> None:
    from minidisc_ray.cli import main

    code = main(["plan", str(REPO / "search_spaces" / "llama-8b-gpu.yaml"), "--gpus", "8", "--gpu-memory", "80"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out.strip().splitlines()[-1])
    chain = plan["chain"]
    assert set(chain) == {"teacher_to_assistant", "assistant_to_student", "direct_kd"}
    assert all(stage["smallest"]["fits"] for stage in chain.values())
    assert plan["search_trial"]["all_fit_one_gpu"] is True
    assert "teacher_to_assistant: fits" in out.err
    # 70B: the bf16 teacher alone (131 GiB) exceeds an 80 GiB GPU, so nothing fits as the chain places it
    big = make_plan(load_architecture("meta-llama/Llama-3.1-70B"), "lm", [0.7], 0.9, 512, 4, 4, 8, 80.0)
    assert not big["chain"]["teacher_to_assistant"]["smallest"]["fits"]


def test_fsdp_memory_falls_with_workers_and_ddp_does_not() -> None:
    arch = load_architecture("meta-llama/Llama-3.1-8B")
    teacher, models = candidate_models(arch, "lm", [0.8])
    t, s = _shape(teacher, arch.vocab_size), _shape(models[0.8], arch.vocab_size)
    fsdp = [stage_memory(s, t, 2048, True, "fsdp", n)["total"] for n in (1, 2, 4, 8)]
    ddp = [stage_memory(s, t, 2048, True, "ddp", n)["total"] for n in (1, 2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True) and fsdp[0] > fsdp[-1] and len(set(ddp)) == 1
    one = stage_memory(s, t, 2048, True, "ddp", 1)
    assert one["weights"] == 4 * s.params and one["optimizer"] == 8 * s.params and one["teacher"] == 2 * t.params


def test_planned_candidates_are_what_pruning_builds(tmp_path: Path) -> None:
    teacher = tiny_llama(layers=4, heads=8, kv_heads=4, hidden=64, ffn=128)
    cfg_path = tmp_path / "config.json"
    teacher.config.architectures = ["LlamaForCausalLM"]
    teacher.config.to_json_file(cfg_path)
    plan = make_plan(load_architecture(str(cfg_path)), "lm", [0.5], 0.75, 32, 2, 2, 1, 24.0)
    assert plan["teacher_params"] == count_params(teacher)[1]
    real = prune_model(teacher, PruningPlan.prefix([2, 2, 2, 2], [64] * 4))  # uniform widths at s = 0.5
    row = next(r for r in plan["candidates"] if r["sparsity"] == 0.5)
    assert row["params"] == count_params(real)[1] and row["cpu_latency_ms"] > 0


def test_plan_cli_writes_json_and_rejects_bad_input(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    ok = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "plan", "Qwen/Qwen2.5-7B", "--gpus", "4",
                         "--output", str(target)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(target.read_text())["model_type"] == "qwen2"
    assert json.loads(ok.stdout.strip().splitlines()[-1])["gpus"] == 4, "the last stdout line is the JSON"


@pytest.mark.parametrize(("argv", "field"), [(["Qwen/Qwen2.5-7B", "--gpus", "0"], "--gpus"),
                                             (["nobody/no-such-model"], "config.json"),
                                             (["Qwen/Qwen2.5-7B", "--gpu-memory", "-1"], "--gpu-memory")])
def test_plan_bad_input_is_one_line(argv: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    from minidisc_ray.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err
