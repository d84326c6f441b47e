"""`minidisc plan`: parameter counts at billion scale from the architecture alone, memory per GPU, fits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidisc_ray.families import count_params
from minidisc_ray.plan import make_plan
from minidisc_ray.plan_memory import Setting, stage_memory
from minidisc_ray.plan_shapes import candidate_models, load_architecture, model_shape, uniform_cut
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
    assert params == sorted(params, reverse=True)
    assert plan["candidates"][-1]["role"] == "student"
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
    assert "recommended: teacher.placement: replicated" in out.err
    assert "teacher_to_assistant: teacher replicated, " in out.err
    # 70B: the bf16 teacher alone (131 GiB) exceeds an 80 GiB GPU, so nothing fits with it replicated
    big = make_plan(load_architecture("meta-llama/Llama-3.1-70B"), "lm", [0.7], 0.9, 512, 4, 4, 8, 80.0)
    assert not big["placements"]["replicated"]["stages"]["teacher_to_assistant"]["fits"]


def test_fsdp_memory_falls_with_workers_and_ddp_does_not() -> None:
    arch = load_architecture("meta-llama/Llama-3.1-8B")
    teacher, models = candidate_models(arch, "lm", [0.8])
    t, s = model_shape(teacher, arch.vocab_size), model_shape(models[0.8], arch.vocab_size)
    fsdp = [stage_memory(s, t, 512, True, Setting(parallelism="fsdp", workers=n, micro_batch=4))["total"]
            for n in (1, 2, 4, 8)]
    ddp = [stage_memory(s, t, 512, True, Setting(workers=n, micro_batch=4))["total"] for n in (1, 2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True)
    assert fsdp[0] > fsdp[-1]
    assert len(set(ddp)) == 1
    one = stage_memory(s, t, 512, True, Setting(micro_batch=4))
    assert one["weights"] == 4 * s.params
    assert one["optimizer"] == 8 * s.params
    assert one["teacher"] == 2 * t.params
    # the teacher's placements: whole, 1/n plus two gathered layers, nothing (top-k targets read back instead)
    sharded = stage_memory(s, t, 512, True, Setting("sharded", "fsdp", 8, micro_batch=4))
    offline = stage_memory(s, t, 512, True, Setting("offline", "fsdp", 8, micro_batch=4, top_k=64))
    assert sharded["teacher"] == 2 * t.params / 8 + 4 * t.largest_layer
    assert offline["teacher"] == 0
    assert offline["teacher_outputs"] == 4 * 512 * (64 * 8 + 4) < sharded["teacher_outputs"]
    # each memory saver lowers the activations; a smaller micro-batch lowers them in proportion
    acts = [stage_memory(s, t, 512, True, Setting(micro_batch=m, checkpointing=c, kl_chunk=k))["activations"]
            for m, c, k in ((4, False, 0), (4, False, 256), (4, True, 256), (1, True, 256))]
    assert acts == sorted(acts, reverse=True)
    assert len(set(acts)) == 4



def test_the_cpu_column_is_the_same_arithmetic_in_fp32_with_the_stage_s_best_weights() -> None:
    """What benchmarks/memory.py --against-plan checks against measured peaks: the teacher, activations and
    teacher outputs in fp32 (twice the bf16 bytes for a classifier), the training state unchanged, and a
    stage's copy of its best weights."""
    bert = tiny_llama(lm=False, layers=4, hidden=96, ffn=256)
    s = model_shape(uniform_cut(bert, 0.5), 128)
    t = model_shape(bert, 128)
    gpu = stage_memory(s, t, 64, False, Setting(micro_batch=32))
    cpu = stage_memory(s, t, 64, False, Setting(micro_batch=32), cpu=True)
    stage = stage_memory(s, t, 64, False, Setting(micro_batch=32), cpu=True, keep_best=True)
    assert cpu["teacher"] == 2 * gpu["teacher"] == 4 * t.params
    assert cpu["activations"] == 2 * gpu["activations"]
    assert cpu["teacher_outputs"] == 2 * gpu["teacher_outputs"]
    assert (cpu["weights"], cpu["gradients"], cpu["optimizer"]) == (gpu["weights"], gpu["gradients"],
                                                                     gpu["optimizer"])
    assert "best_weights" not in cpu
    assert stage["best_weights"] == 4 * s.params
    assert stage["total"] == pytest.approx(cpu["total"] + 4 * s.params)
    assert count_params(uniform_cut(bert, 0.5))[1] == s.params

def test_llama_70b_fits_two_nodes_of_eight_80gb_gpus_sharded_or_offline_and_not_replicated(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The plan the issue asks for: every search trial and every chain stage of a 70B job under one
    placement on at most 2 nodes x 8 x 80 GiB, memory itemised; one node or a replicated teacher does not fit.
    Sharded (the exact loss, trials sharded over search.trial_workers) is recommended before offline; both fit."""
    from minidisc_ray.cli import main

    code = main(["plan", "meta-llama/Llama-3.1-70B", "--nodes", "2", "--gpus", "8", "--gpu-memory", "80"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out.strip().splitlines()[-1])
    assert plan["gpus"] == 16
    assert plan["placement"] == "sharded"
    assert not plan["placements"]["replicated"]["fits_all"]
    for name in ("sharded", "offline"):
        chosen = plan["placements"][name]
        assert chosen["fits_all"], name
        for fit in [*chosen["trials"].values(), *chosen["stages"].values()]:
            assert fit["fits"]
            assert fit["workers"] <= 16
            assert fit["gib_per_gpu"] <= 0.9 * 80
            items = fit["memory_gib"]
            assert abs(sum(v for k, v in items.items() if k != "total") - items["total"]) < 0.01
    assert plan["placements"]["offline"]["teacher_pass"]["fits"]
    assert plan["placements"]["offline"]["teacher_pass"]["gpus_per_replica"] >= 2
    trial_gpus = plan["placements"]["sharded"]["trial_gpus"]
    assert f"recommended: teacher.placement: sharded, search.trial_workers: {trial_gpus}" in out.err
    assert "teacher_to_assistant: teacher sharded" in out.err
    # what the driver and the output volume hold: under sharded the teacher is never in the object store and
    # auto keeps no recovered candidates; the driver's own fp32 copy is gone too (it holds the shapes only)
    driver = plan["driver"]
    assert driver["object_store_gib"]["sharded"] == 0
    assert driver["recovered_gib"]["sharded"] == 0
    assert driver["object_store_gib"]["replicated"] == pytest.approx(4 * plan["teacher_params"] / 2**30, abs=0.01)
    one_node = make_plan(load_architecture("meta-llama/Llama-3.1-70B"), "lm", [0.5, 0.6, 0.7, 0.8], 0.9, 512, 4, 4,
                         8, 80.0, nodes=1)
    assert one_node["placements"]["replicated"]["fits_all"] is False


def test_the_plan_counts_every_host_as_the_chain_holds_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``minidisc plan`` itemises the host RAM of the driver, a stage's rank 0 and its other ranks per stage and
    placement, as the code holds it today: under sharded the teacher stays off every host, but the driver reads each
    stage's model back whole (two fp32 copies), keeps the assistant, and cuts the student from it after a gradient
    pass; rank 0 gathers the best and the last weights whole. So the 70B layout's driver does not fit a 64 GiB head,
    and the plan says so instead of the 0 it showed for the driver."""
    from minidisc_ray.cli import main

    code = main(["plan", "meta-llama/Llama-3.1-70B", "--nodes", "2", "--head-memory", "64", "--worker-memory", "1024"])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out.strip().splitlines()[-1])
    gib = 2.0**30
    ta = plan["chain"]["teacher_to_assistant"]["trained_params"]
    student = plan["chain"]["assistant_to_student"]["trained_params"]
    teacher = plan["teacher_params"]
    for placement in ("replicated", "sharded", "offline"):
        stages = plan["host"][placement]["stages"]
        first, second, direct = (stages[k] for k in ("teacher_to_assistant", "assistant_to_student", "direct_kd"))
        whole = 0.0 if placement == "sharded" else 4 * teacher / gib
        assert first["driver"].get("teacher (fp32, whole)", 0.0) == pytest.approx(whole, abs=0.01)
        # a link from the teacher starts from a cut the driver makes, except from a sharded teacher's files
        cut = 0 if placement == "sharded" else 4
        # the finished assistant read back and rebuilt on the driver, and gathered twice on rank 0
        assert first["driver"]["total"] == pytest.approx(whole + (cut + 8) * ta / gib, abs=0.02)
        assert first["rank0"]["best weights gathered whole (fp32)"] == pytest.approx(4 * ta / gib, abs=0.01)
        # the student link: the assistant kept, the student cut from it on the driver, read back and rebuilt
        assert second["driver"]["total"] == pytest.approx(whole + (4 * ta + 12 * student) / gib, abs=0.02)
        assert direct["driver"]["total"] == pytest.approx(whole + (4 * ta + (cut + 8) * student) / gib, abs=0.02)
        assert ("not_counted" in first) == (placement == "offline")
        for s in stages.values():
            for who in ("driver", "rank0", "other_ranks"):
                items = s[who]
                if items:
                    assert abs(sum(v for k, v in items.items() if k != "total") - items["total"]) < 0.05
    sharded = plan["host"]["sharded"]
    assert sharded["driver_peak_gib"] > 64 and sharded["driver_fits_head"] is False
    assert sharded["rank0_peak_gib"] < 1024 and sharded["rank0_fits_worker"] is True
    assert "the driver does NOT fit 64 GiB of host memory" in out.err
    assert "host memory per process under teacher.placement: sharded" in out.err
    assert main(["plan", "meta-llama/Llama-3.1-70B", "--head-memory", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--head-memory" in err


def test_planned_candidates_are_what_pruning_builds(tmp_path: Path) -> None:
    teacher = tiny_llama(layers=4, heads=8, kv_heads=4, hidden=64, ffn=128)
    cfg_path = tmp_path / "config.json"
    teacher.config.architectures = ["LlamaForCausalLM"]
    teacher.config.to_json_file(cfg_path)
    plan = make_plan(load_architecture(str(cfg_path)), "lm", [0.5], 0.75, 32, 2, 2, 1, 24.0)
    assert plan["teacher_params"] == count_params(teacher)[1]
    real = prune_model(teacher, PruningPlan.prefix([2, 2, 2, 2], [64] * 4))  # uniform widths at s = 0.5
    row = next(r for r in plan["candidates"] if r["sparsity"] == 0.5)
    assert row["params"] == count_params(real)[1]
    assert row["cpu_latency_ms"] > 0


def test_plan_cli_writes_json_and_rejects_bad_input(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    ok = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "plan", "Qwen/Qwen2.5-7B", "--gpus", "4",
                         "--output", str(target)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(target.read_text())
    assert plan["model_type"] == "qwen2"
    assert json.loads(ok.stdout.strip().splitlines()[-1])["gpus"] == 4, "the last stdout line is the JSON"
    # the fp32 CPU column beside the GPU one: an fp32 teacher and activations cost more than bf16 ones
    for row in plan["candidates"]:
        if row["role"] == "candidate":
            assert row["trial_cpu_gib"] > row["trial_gib"]
    assert all(link["cpu_gib"] > 0 for link in plan["chain"].values())
    assert "on CPU workers (fp32, one process each)" in ok.stderr


@pytest.mark.parametrize(("argv", "field"), [(["Qwen/Qwen2.5-7B", "--gpus", "0"], "--gpus"),
                                             (["nobody/no-such-model"], "config.json"),
                                             (["Qwen/Qwen2.5-7B", "--gpu-memory", "-1"], "--gpu-memory")])
def test_plan_bad_input_is_one_line(argv: list[str], field: str, capsys: pytest.CaptureFixture[str]) -> None:
    from minidisc_ray.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert field in err


def test_a_placement_the_engine_does_not_run_and_bad_savers_are_refused_in_one_line() -> None:
    from minidisc_ray.config import config_from_dict

    for section, values, needle in (("teacher", {"placement": "everywhere"}, "teacher.placement"),
                                    ("teacher", {"top_k": 0}, "teacher.top_k"),
                                    ("distill", {"kl_chunk": -1}, "distill.kl_chunk"),
                                    ("search", {"trial_workers": 0}, "search.trial_workers")):
        with pytest.raises(Exception, match=needle):
            config_from_dict({section: values})
    for strategy in ("halving", "optuna-kd", "exhaustive", "sandwich"):  # they would load the teacher online
        with pytest.raises(Exception, match=f"search.strategy.*{strategy}.*teacher.placement: offline"):
            config_from_dict({"teacher": {"placement": "offline"}, "search": {"strategy": strategy}})
    for strategy in ("bisection", "grid", "optuna", "auto"):
        assert config_from_dict({"teacher": {"placement": "offline"}, "search": {"strategy": strategy}})
    ok = config_from_dict({"teacher": {"placement": "offline", "top_k": 8},
                           "distill": {"activation_checkpointing": True, "kl_chunk": 128}})
    assert ok.teacher.placement == "offline"
    assert ok.distill.kl_chunk == 128
