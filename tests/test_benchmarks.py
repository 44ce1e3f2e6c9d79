"""benchmarks/: the per-epoch call-count formulas match what each script's main() really runs, and the memory
meter of the AlignProp benchmark sees what it should."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import call_counts  # noqa: E402

GPU_RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results", "gpu_nvidia_h200", "results.json")


@pytest.fixture(scope="module")
def counted_runs():
    """Every micro case of call_counts.MICRO_CASES run once, in one subprocess (the scripts' main() set global
    state such as the torch seed, so they stay out of the test process); about 30 s on 2 busy cores."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "call_counts.py"), "--micro-check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    lines = [json.loads(line[len("COUNTS ") :]) for line in result.stdout.splitlines() if line.startswith("COUNTS ")]
    return {line["case"]: line for line in lines}


@pytest.mark.parametrize("case", list(call_counts.MICRO_CASES))
def test_counted_calls_match_the_formulas(counted_runs, case):
    run = counted_runs[case]
    for phase in ("train", "eval"):
        measured, predicted = run["measured"][phase], run["predicted"][phase]
        for key in call_counts.KEYS:
            assert measured.get(key, 0) == predicted.get(key, 0), (
                f"{case} {phase} {key}: counted {measured.get(key, 0)}, formula {predicted.get(key, 0)}"
            )
    assert run["measured"]["train"]["unet_backward"] > 0  # the runs did train


def test_paper_table_has_every_script_and_sane_numbers():
    rows = call_counts.paper_table()
    scripts = {row[0] for row in rows}
    assert scripts == {"`ddpo_diffexp.py`", "`ddpo_coca.py`", "`alignprop_diffexp.py`", "`b2_diffurl.py`"}
    ddpo = rows[0][2]  # ddpo_diffexp at its defaults: 64 samples, T = 50, batches 8 / 4
    assert (
        ddpo["unet_calls"] == 8 * 50 + 16 * 50
        and ddpo["unet_backward"] == 16 * 50
        and ddpo["sample_evals"] == 64 * 50 * 2
    )
    table = call_counts.format_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_gaussian_truncation_start_distribution():
    probabilities = call_counts.truncation_start_distribution(50)
    assert probabilities[0] == 0 and abs(sum(probabilities) - 1) < 1e-12
    mean_k = sum(p * (50 - j) for j, p in enumerate(probabilities))
    assert 8.5 < mean_k < 9.5  # int(N(42, 5^2)) kept in [1, 49]: K = 50 - start is about 9 (README)
    import alignprop_diffexp

    args = alignprop_diffexp.parse_args(["--num-steps", "50", "--truncation", "gaussian"])
    starts = alignprop_diffexp.truncation_starts(args, 20_000, torch.Generator().manual_seed(0)).double()
    assert (50 - starts).mean().item() == pytest.approx(mean_k, abs=0.1)  # the script's own draws
    batch_minima = starts.view(-1, 4).min(dim=1).values
    assert batch_minima.mean().item() == pytest.approx(call_counts.expected_min_start(50, 4), abs=0.15)
    assert call_counts.expected_min_start(50, 1) == pytest.approx(50 - mean_k)
    # a batch pays for its largest K
    assert call_counts.expected_min_start(50, 4) < call_counts.expected_min_start(50, 1)


def test_tensor_memory_meter_counts_live_storages_once():
    from iteration_cost import TensorMemory

    with TensorMemory() as meter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:]  # same storage: not counted again
        b = a + 1  # 4000 more
        del b
        c = torch.zeros(500)  # 2000, after b was freed
    assert meter.peak == 8000 and meter.current == 6000
    del a, view, c
    x = torch.randn(4, 4, requires_grad=True)
    with TensorMemory() as meter:
        (x.exp() * 2).sum().backward()  # backward ops are seen as well (the grad of x stays alive)
    assert meter.current == x.grad.untyped_storage().nbytes()


def test_readme_section_is_replaced_between_its_markers_only(tmp_path):
    from iteration_cost import END, START, write_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\ntext\n")
    write_readme(f"{START}\nfirst\n{END}", readme)
    assert readme.read_text() == f"# Title\n\ntext\n\n{START}\nfirst\n{END}\n"
    readme.write_text(readme.read_text() + "\n## Later section\n")
    write_readme(f"{START}\nsecond\n{END}", readme)
    assert readme.read_text() == f"# Title\n\ntext\n\n{START}\nsecond\n{END}\n\n## Later section\n"


def test_readme_option_writes_benchmarks_readme_with_paths_relative_to_the_root(tmp_path, monkeypatch):
    import iteration_cost
    from iteration_cost import END, START

    assert iteration_cost.README == os.path.join(ROOT, "benchmarks", "README.md")
    assert iteration_cost.write_readme.__defaults__ == (iteration_cost.README,)
    with open(iteration_cost.README) as f:
        text = f.read()
    assert START in text and END in text  # --readme replaces the section there instead of appending one
    monkeypatch.chdir(tmp_path)  # absolute paths, and paths relative to another working directory
    world = os.path.join(ROOT, "world", "sd-shapes")
    command = iteration_cost.command_line(["--model", world, "--readme", f"--json={ROOT}/benchmarks/cost.json"])
    assert command == "python benchmarks/iteration_cost.py --model world/sd-shapes --readme --json=benchmarks/cost.json"
    monkeypatch.chdir(os.path.join(ROOT, "benchmarks"))
    assert iteration_cost.command_line(["--model", "../world/sd-shapes", "--steps", "8"]) == (
        "python benchmarks/iteration_cost.py --model world/sd-shapes --steps 8"
    )


# ---------------------------------------------------------------------------------------------- scale.py
def test_scale_epoch_flops_are_calls_times_unit_costs():
    import scale

    import ddpo_diffexp

    args = ddpo_diffexp.parse_args(["--preset", "diffexp-fig4a"])
    unit = dict(
        architecture="sd15",
        unet_forward_per_row=3.0,
        unet_backward_per_row=5.0,
        vae_decode_per_image=7.0,
        vae_backward_per_image=11.0,
        reward_forward_per_image={"aesthetic": 13.0},
        reward_backward_per_image={"aesthetic": 17.0},
        text_encoder_per_prompt=19.0,
    )
    counts = call_counts.ddpo_epoch(args)  # 64 samples x 50 steps, sampled and trained, batch 4
    expected = 2 * 64 * 50 * 3.0 * 2 + 2 * 64 * 50 * 5.0 + 64 * (7.0 + 13.0 + 19.0)  # rows x fwd, rows x bwd, images
    assert scale.epoch_flops(counts, unit, args, "aesthetic", 64, 64) == expected


def test_scale_memory_meter_works_on_the_meta_device():
    import scale

    x = torch.zeros(1000, device="meta", requires_grad=True)
    # exp saves its output for the backward: 4000 bytes; * 2 another 4000; the grad of x another 4000
    assert scale.peak_bytes(lambda: (x.exp() * 2).sum().backward()) >= 8000


@pytest.mark.slow
def test_scale_sd15_units_agree_with_the_independent_estimates():
    """The issue's estimates (matmul / conv / attention FLOPs, batch 1): UNet forward at 64 x 64 latents 0.80 TFLOP,
    LoRA forward + backward 1.7, VAE decode to 512 px 2.5, LoRA rank 4 0.80 M parameters; within 15%."""
    import scale

    unit = scale.unit_costs("sd15", 512)
    assert unit["unet_forward_per_row"] / 1e12 == pytest.approx(0.80, rel=0.15)
    assert (unit["unet_forward_per_row"] + unit["unet_backward_per_row"]) / 1e12 == pytest.approx(1.7, rel=0.15)
    assert unit["vae_decode_per_image"] / 1e12 == pytest.approx(2.5, rel=0.15)
    assert unit["lora_parameters"] / 1e6 == pytest.approx(0.80, rel=0.15)
    # the predicted training-step memory against the peaks an H200 measured for the same runs (benchmarks/gpu.py):
    # within 20% (with the math attention kernel that meta picks by itself, 3-4x too high)
    runs = scale.measured_runs({("sd15", 512): unit, ("sdxl", 1024): unit}, path=GPU_RESULTS_JSON)
    sd15_runs = [run for run in runs if run["architecture"] == "sd15"]
    assert len(sd15_runs) == 4
    for run in sd15_runs:
        predicted = scale.memory_gb(unit, run["kind"], run["args"].train_batch_size)
        assert predicted == pytest.approx(run["peak_gb"], rel=0.2), run["name"]


def test_scale_counts_attention_as_the_memory_efficient_kernel_on_meta():
    """What the H200 showed (memory predicted 3-4x too high): on the meta device torch runs the math attention
    kernel whatever sdpa_kernel allows, saving the (tokens x tokens) matrix for the backward. scale.py's
    efficient_attention_on_meta must not: SD 1.5's 4096-token self-attention, 2 rows of 8 heads."""
    import torch.nn.functional as F

    import scale

    query = torch.zeros(2, 8, 4096, 40, device="meta", dtype=torch.bfloat16, requires_grad=True)

    def attention():
        F.scaled_dot_product_attention(query, query, query).float().sum().backward()

    matrix = 2 * 8 * 4096 * 4096 * 2  # one bf16 attention matrix
    original = F.scaled_dot_product_attention
    assert scale.peak_bytes(attention) >= matrix  # the kernel meta picks by itself
    with scale.efficient_attention_on_meta():
        assert scale.peak_bytes(attention) < matrix / 10
        with torch.no_grad():
            efficient_flops = scale.flops(lambda: F.scaled_dot_product_attention(query, query, query))
    assert efficient_flops == 2 * 2 * (2 * 8 * 4096 * 4096 * 40)  # Q K^T and P V: the math kernel's FLOPs too
    assert F.scaled_dot_product_attention is original  # put back


def fake_units():
    """unit_costs-shaped dicts with made-up, distinct numbers of the real ones' size (TFLOP; SDXL's 8x SD 1.5's), so
    the row building is tested without the ~20 s of counting on the meta device."""

    def unit(architecture, resolution, size):
        scale = 1e12 * size
        return dict(
            architecture=architecture,
            resolution=resolution,
            unet_forward_per_row=3.0 * scale,
            unet_backward_per_row=5.0 * scale,
            vae_decode_per_image=7.0 * scale,
            vae_backward_per_image=11.0 * scale,
            reward_forward_per_image={"aesthetic": 13e12, "clipscore": 29e12},
            reward_backward_per_image={"aesthetic": 17e12, "clipscore": 31e12},
            text_encoder_per_prompt=19.0 * scale,
            weight_bytes=2e9 * size,
            lora_parameters=1e6 * size,
            optimizer_bytes=16e6 * size,
            unet_step_activation_bytes_per_sample=10e9 * size,
            vae_backward_activation_bytes_per_image=3e9 * size,
            unet_checkpointed_activation_bytes_per_sample=1e9 * size,
            vae_weight_bytes=0.2e9 * size,
        )

    return {("sd15", 512): unit("sd15", 512, 1.0), ("sdxl", 1024): unit("sdxl", 1024, 8.0)}


def test_scale_has_a_row_for_every_gpu_preset_of_every_script():
    import scale

    import alignprop_diffexp
    import b2_diffurl
    import ddpo_coca
    import ddpo_diffexp

    modules = (ddpo_diffexp, alignprop_diffexp, b2_diffurl, ddpo_coca)
    assert scale.SCRIPTS == tuple(module.__name__ for module in modules)
    expected = {(m.__name__, p) for m in modules for p in m.PRESETS if p not in ("tiny", "shapes")}
    rows = scale.preset_rows(fake_units())
    assert {(row["script"], row["preset"]) for row in rows} == expected
    assert {
        ("ddpo_diffexp", "diffexp-fig4b"),
        ("b2_diffurl", "b2-template3"),
        ("alignprop_diffexp", "diffexp-fig10a"),
    } < expected
    names = [row["name"] for row in rows]
    assert len(set(names)) == len(names)  # the keys of table(measured=...)
    k1 = [row for row in rows if row["name"].endswith("--truncation fixed --grad-steps 1")]
    assert {row["preset"] for row in k1} == set(alignprop_diffexp.PRESETS) - {"tiny", "shapes"}
    by_name = {row["name"]: row for row in rows}
    fig10b = by_name["alignprop_diffexp.py --preset diffexp-fig10b"]
    assert (fig10b["architecture"], fig10b["resolution"], fig10b["unit"]["architecture"]) == ("sdxl", 1024, "sdxl")
    assert by_name["ddpo_coca.py --preset coca-aesthetic"]["unit"]["architecture"] == "sd15"


def test_scale_whole_run_is_the_sum_of_its_epochs():
    import scale

    units = fake_units()
    sd15 = units[("sd15", 512)]
    rows = {row["name"]: row for row in scale.preset_rows(units)}
    for row in rows.values():
        assert len(row["flops_by_epoch"]) == row["epochs"] == row["args"].epochs
        assert row["run_flops"] == pytest.approx(sum(row["flops_by_epoch"]))
    ddpo = rows["ddpo_diffexp.py --preset diffexp-fig4a"]
    epoch = scale.epoch_flops(call_counts.ddpo_epoch(ddpo["args"]), sd15, ddpo["args"], "aesthetic", 64, 64)
    assert ddpo["run_flops"] == pytest.approx(200 * epoch)
    b2 = rows["b2_diffurl.py --preset b2-template1"]
    args = b2["args"]
    groups = args.samples_per_epoch // args.num_branches
    stages = [
        scale.epoch_flops(call_counts.b2_stage(args, stage, 2 * groups), sd15, args, "clipscore", 1280, groups)
        for stage in range(args.epochs)
    ]
    assert b2["run_flops"] == pytest.approx(sum(stages)) and stages[-1] > stages[0]  # tau grows over the stages
    # the printed H200 time is the run's FLOPs at the utilisation of the measured run that prices the row
    measured = dict(name="fake DDPO", script="ddpo_diffexp", preset="diffexp-fig4a", args=ddpo["args"])
    measured |= dict(architecture="sd15", kind="ddpo", peak_gb=9.9, utilisation=0.1, date="today")
    table = scale.table(units, [measured]).splitlines()
    cells = next(line for line in table if "`ddpo_diffexp.py --preset diffexp-fig4a`" in line)
    cells = [cell.strip() for cell in cells.split("|")[1:-1]]
    assert cells[2] == "200" and cells[3] == str(call_counts.evaluations_per_run(ddpo["args"]))
    rate = 0.1 * scale.H200_PEAK_TFLOPS * scale.TERA
    assert float(cells[8]) == pytest.approx(epoch / rate / 60, abs=0.051)
    assert float(cells[9].replace(",", "")) == pytest.approx(200 * epoch / rate / 3600, abs=0.051)
    assert cells[7] == "9.9" and cells[10] == "measured today (10.0%)"


def test_scale_reward_towers_follow_the_preset_reward():
    import common
    import scale

    assert scale.reward_towers("aesthetic") == ["aesthetic"] and scale.reward_towers("pickscore") == ["clipscore"]
    assert scale.reward_towers("hpsv2+aesthetic+0.5*pickscore") == ["clipscore", "aesthetic", "clipscore"]
    assert set(scale.REWARD_TOWERS) == set(common.REWARD_NAMES)  # every reward has its tower (or none)
    units = fake_units()
    rows = {row["name"]: row for row in scale.preset_rows(units)}
    ensemble = rows["alignprop_diffexp.py --preset diffexp-fig10a"]
    single = rows["alignprop_diffexp.py --preset diffexp-fig4a"]  # the same counts, the aesthetic reward alone
    assert ensemble["reward"] == "hpsv2+aesthetic+pickscore"
    assert "counted as CLIP ViT-H/14 + CLIP ViT-L/14 + CLIP ViT-H/14" in ensemble["note"]
    # same counts, 64 images an epoch: the ensemble adds two ViT-H/14 forwards and backwards per image
    extra = 64 * 2 * (29e12 + 31e12) * ensemble["epochs"]
    assert ensemble["run_flops"] - single["run_flops"] == pytest.approx(extra)
    assert "counted as" in rows["ddpo_diffexp.py --preset diffexp-fig4b"]["note"]  # pickscore: a stand-in, said so


def test_scale_footer_and_docstring_say_what_is_not_counted():
    import scale

    printed = scale.footer(20)
    assert all(len(line) <= 120 for line in printed.splitlines())  # pasted into benchmarks/README.md as it is
    text = " ".join(printed.split())  # words, whatever the line breaks
    assert "Time is that of one H200" in text and "measured" in text
    not_counted = text[text.index("Not counted:") :]
    docstring = " ".join(scale.__doc__.split())
    for words in ("evaluation", "reward's text tower", "data loading", "Python overhead", "checkpoints", "weights"):
        assert words in not_counted and words in docstring[docstring.index("What is not:") :], words
    for words in ("sampling UNet", "VAE decode", "text encoder", "vision tower"):
        assert words in text[text.index("Counted:") : text.index("Not counted:")], words


def test_scale_prices_each_row_with_the_measured_run_of_the_same_training_step():
    """calibration(): a preset that ran is its own measurement; another row takes the utilisation of the run with
    the same script (else kind), model and train batch size: coca-ddpo-aesthetic (ddpo_diffexp.py, b = 1) is priced
    by CoCA's b = 1 run, not by DDPO's b = 4 one; the K = 1 rows by their preset's run but are not it."""
    import scale

    rows = {row["name"]: row for row in scale.preset_rows(fake_units())}

    def run(name, script, preset, utilisation=0.05):
        args = rows[f"{script}.py --preset {preset}"]["args"]  # the preset's train batch size: DDPO 4, CoCA 1
        return dict(name=name, script=script, preset=preset, args=args, architecture="sd15",
                    kind=scale.run_kind(script), utilisation=utilisation, peak_gb=1.0, date="today")  # fmt: skip

    runs = [run("ddpo", "ddpo_diffexp", "diffexp-fig4a", utilisation=0.09), run("coca", "ddpo_coca", "coca-aesthetic")]
    runs += [run("alignprop", "alignprop_diffexp", "diffexp-fig4a")]

    def chosen(name):
        match, own = scale.calibration(rows[name], runs)
        return (match["name"] if match else None), own

    assert chosen("ddpo_diffexp.py --preset diffexp-fig4a") == ("ddpo", True)
    assert chosen("ddpo_diffexp.py --preset diffexp-fig4b") == ("ddpo", False)
    assert chosen("ddpo_diffexp.py --preset coca-ddpo-aesthetic") == ("coca", False)
    k1 = "alignprop_diffexp.py --preset diffexp-fig4a --truncation fixed --grad-steps 1"
    assert chosen(k1) == ("alignprop", False)
    assert chosen("alignprop_diffexp.py --preset diffexp-fig10b") == (None, False)  # no SDXL run among these
    assert "no measured run" in next(line for line in scale.table(fake_units(), runs).splitlines() if "fig10b`" in line)


# ---------------------------------------------------------------------------------------------- compare_methods.py
def test_bootstrap_interval_on_known_data():
    import compare_methods

    assert compare_methods.bootstrap_interval([0.5] * 5) == (0.5, 0.5)  # no spread, no width
    values = np.random.default_rng(0).normal(0.6, 0.1, 400)
    low, high = compare_methods.bootstrap_interval(values)
    half_width = 1.96 * values.std() / np.sqrt(len(values))  # the normal interval, which the bootstrap matches here
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    covered = 0  # coverage over repeated experiments of 5 seeds, true mean 0.6
    for trial in range(200):
        sample = np.random.default_rng(100 + trial).normal(0.6, 0.1, 5)
        low, high = compare_methods.bootstrap_interval(sample, resamples=2000, seed=trial)
        covered += low <= 0.6 <= high
    assert 0.75 <= covered / 200 <= 0.97  # the percentile bootstrap under-covers a little at n = 5


def test_paired_differences_pair_by_seed_not_by_position():
    import compare_methods

    finals = {"ddpo": {0: 0.50, 1: 0.60, 2: 0.70}, "ddpo_diffexp": {2: 0.75, 0: 0.52, 3: 0.99}}
    assert compare_methods.paired_differences(finals, "ddpo_diffexp", "ddpo") == pytest.approx([0.02, 0.05])


def test_mean_pairwise_rms_on_known_images():
    import compare_methods

    images = torch.zeros(3, 4)
    images[1] = 1.0  # RMS distance 1 from the others; rows 0 and 2 coincide
    images[2] = 0.0
    # ordered pairs of distinct rows: (0,1) (1,0) (1,2) (2,1) at 1, (0,2) (2,0) at 0 -> 4 / 6
    assert compare_methods.mean_pairwise_rms(images) == pytest.approx(4 / 6)


def test_summary_pairs_queries_and_differences_by_seed(monkeypatch):
    """The query ratio and the paired differences use the same seed of both methods, whatever order runs came in;
    a run that never reaches the target is counted out of the queries, not as zero."""
    import compare_methods

    monkeypatch.setattr(compare_methods, "diversity", lambda run_dir, prompts: 0.3)

    def run(rewards, hits=(0.1, 0.3)):  # eval lines at 0, 320, 640 queries; training rewards of 2 epochs
        lines = [
            dict(reward_queries=q, seen_reward_mean=r, seen_reward_std=0.3, unseen_reward_mean=r, unseen_reward_std=0.3)
            for q, r in zip((0, 320, 640), rewards)
        ]
        return lines, [dict(reward_mean=hit) for hit in hits]

    runs = {
        "ddpo": {0: run((0.4, 0.5, 0.6)), 1: run((0.4, 0.6, 0.7))},  # reach 0.5 at 320 and at 160 queries
        # 320 + 320 / 7 queries on seed 1, never on seed 0; seed 0 hits every attribute 0.1 less often than DDPO's
        "ddpo_diffexp": {1: run((0.4, 0.45, 0.8)), 0: run((0.4, 0.4, 0.45), hits=(0.0, 0.2))},
    }
    args = compare_methods.Args(seeds=[0, 1], reward="shapes_binary", methods=list(runs), reward_queries=640)
    summary = compare_methods.summarise(args, runs, target=0.5)
    ours = summary["ddpo_diffexp"]
    assert ours["reached"] == 1 and ours["queries_to_target"]["mean"] == pytest.approx(320 + 320 / 7)
    # seed 1 / seed 1, and seed 0's never-reached run as the whole budget of 640 against DDPO's 320
    assert ours["queries_ratio_vs_baseline"]["mean"] == pytest.approx(((320 + 320 / 7) / 160 + 640 / 320) / 2)
    assert ours["seen_final_vs_baseline"]["mean"] == pytest.approx(((0.45 - 0.6) + (0.8 - 0.7)) / 2)
    assert ours["training_hit_fraction"]["mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert ours["training_hit_fraction_vs_baseline"]["mean"] == pytest.approx((-0.1 + 0.0) / 2)  # seed 0, seed 1
    assert summary["ddpo"]["seen"][1]["mean"] == pytest.approx(0.55)
    assert summary["ddpo"]["lasting_rise"] == 2 and ours["lasting_rise"] == 1  # diffexp's seed 0 gains only 0.05
    table = compare_methods.markdown(args, summary, 0.5)
    assert "| ddpo_diffexp | 0.400 -> 0.625" in table and "(1/2)" in table
    assert "lasting rise" in table and "ddpo 2/2, ddpo_diffexp 1/2." in table


def test_lasting_rise_needs_the_gain_and_no_drift_down():
    """The quick start's bar: end - start >= 0.10 and best - end <= 0.01."""
    import compare_methods

    def lines(*seen):
        return [dict(seen_reward_mean=value) for value in seen]

    assert compare_methods.lasting_rise(lines(0.50, 0.58, 0.605))
    assert not compare_methods.lasting_rise(lines(0.50, 0.58, 0.595))  # gains 0.095
    assert not compare_methods.lasting_rise(lines(0.50, 0.63, 0.615))  # gains 0.115 but ends 0.015 below its best
    assert compare_methods.lasting_rise(lines(0.50, 0.615, 0.61))  # 0.005 below its best


@pytest.mark.parametrize("variant, change", [("eq8", dict(prompt_weight_range=(1.0, 1.0))), ("eq7", dict(cfg_low=5.0))])
def test_exploration_variants_share_the_noise_of_plain(variant, change):
    """The mechanism benchmark pairs its samplers: Eq. 8 with w = 1, or Eq. 7 with w_l = w_h, is plain sampling, so
    it must give plain's images exactly (the same x_T, step noise and prompts); with the real ranges it must not."""
    from dataclasses import replace

    import ddpo_diffexp
    import exploration
    from common import encode_prompts
    from worlds import SHAPES_MODEL, load_pipeline

    pipeline = load_pipeline(SHAPES_MODEL, "cpu", torch.float32)
    script_args = ddpo_diffexp.parse_args(["--shapes"])
    pipeline.scheduler.set_timesteps(script_args.num_steps)
    null_embeds = encode_prompts(pipeline, [""], script_args.resolution)
    prompts = ["a red triangle", "two blue squares", "a green circle below a yellow triangle"]
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def images(name, settings):
        return exploration.sample_variant(
            ddpo_diffexp, pipeline, settings, prompts, latents, null_embeds, name, seed=3, batch_size=2
        )

    plain = images("plain", script_args)
    assert torch.allclose(images(variant, replace(script_args, **change)), plain, atol=1e-4)  # w = 1: only rounding
    assert not torch.allclose(images(variant, script_args), plain, atol=1e-3)


# ---------------------------------------------------------------------------------------------- evaluation_noise.py
def test_variance_split_separates_evaluation_noise_from_training():
    import evaluation_noise

    # rows are seeds, columns noise sets: within-seed variance 2, and the row means 1, 2, 3 (variance 1) are
    # exactly what a K = 2 average of that noise alone spreads, so the training's part is 0
    within, between, averaged = evaluation_noise.variance_split([[0, 2], [1, 3], [2, 4]])
    assert within == pytest.approx(np.sqrt(2))
    assert averaged == pytest.approx(1.0)
    assert between == 0.0
    # a training spread of 0.03 under evaluation noise of 0.02, 4 evaluations of each of 4000 seeds
    rng = np.random.default_rng(0)
    gains = 0.1 + rng.normal(0, 0.03, (4000, 1)) + rng.normal(0, 0.02, (4000, 4))
    within, between, averaged = evaluation_noise.variance_split(gains)
    assert within == pytest.approx(0.02, rel=0.05)
    assert between == pytest.approx(0.03, rel=0.05)
    assert averaged == pytest.approx(np.sqrt(0.03**2 + 0.02**2 / 4), rel=0.05)


def test_shapes_evaluator_reproduces_a_committed_start_and_its_overrides_reach_the_sampler():
    """evaluation_noise.py and guidance.py judge runs with shapes_evaluator(): with the preset's flags it must give
    the committed benchmark's number (diffexp_20_seeds/results.csv: ddpo, seed 0, epoch 0, unseen 0.6120), and a
    guidance override must change the samples. A subprocess, as the evaluator makes an Accelerator (a process-wide
    state that the forked script runs of other tests must not inherit)."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import evaluation_noise as e\n"
        "_, _, sets, pretrained, evaluate = e.shapes_evaluator()\n"
        "print('REWARDS', evaluate(pretrained, 0, 0, sets['unseen']), evaluate(pretrained, 0, 0, sets['unseen'], "
        "cfg_high=1.0))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REWARDS "))
    preset, unguided = map(float, line.split()[1:])
    assert preset == pytest.approx(0.6120, abs=1e-3)
    # the shapes world's pretrained model scores higher without guidance (unseen, 6 seeds: 0.763 against 0.599 at
    # w = 5; benchmarks/README.md, "Guidance in the shapes world"), against an evaluation noise of about 0.04
    assert unguided > preset + 0.08


def test_missing_runs_give_one_error_line_with_the_command_that_makes_them(tmp_path):
    import evaluation_noise

    (tmp_path / "ddpo_seed0").mkdir()
    (tmp_path / "ddpo_seed0" / "eval.jsonl").write_text("{}\n")
    assert evaluation_noise.require_runs(str(tmp_path), "ddpo_seed{seed}", [0]) == {0: str(tmp_path / "ddpo_seed0")}
    with pytest.raises(SystemExit) as error:
        evaluation_noise.require_runs(str(tmp_path), "ddpo_seed{seed}", [0, 1])
    message = str(error.value)
    assert message.startswith("error: no run of seed(s) 1 in ") and "\n" not in message
    assert f"compare_methods.py --methods ddpo --seeds 0 1 --runs-dir {tmp_path}" in message


# ---------------------------------------------------------------------------------------------- gpu.py
GPU_RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu_nvidia_h200")
# what gpu.py's reduced runs may change of a preset: sample counts, length, evaluation and outputs, the model
REDUCED = {"samples_per_epoch", "samples_per_update", "epochs", "eval_every", "save_every", "eval_images_per_prompt"}
REDUCED |= {"prompts", "model", "output_dir", "run_name"}


def test_gpu_runs_are_the_presets_with_fewer_samples(tmp_path):
    """Every method run of gpu.py is its preset with a reduced sample count (nothing else of the method changed),
    passes the script's own flag checks, and holds at least one optimiser step."""
    import importlib

    import gpu

    for name, script, preset, flags in gpu.METHOD_RUNS + [gpu.SDXL_RUN]:
        module = importlib.import_module(script)
        _, argv, _ = gpu.method_argv(name, script, preset, flags, str(tmp_path), smoke=False)
        args, preset_args = module.parse_args(argv), module.parse_args(["--preset", preset])
        module.check_args(args, 1)
        changed = {key for key, value in vars(args).items() if getattr(preset_args, key) != value}
        assert changed <= REDUCED, (name, changed - REDUCED)
        assert args.samples_per_epoch >= args.samples_per_update and args.mixed_precision == "fp16"
        assert args.model == ("random:sdxl" if "SDXL" in name else "random:sd15")


def test_gpu_sampling_and_training_step_measure_finite_figures():
    """Parts 1 and 2 at tiny size: both samplers run the same work, FLOPs are counted on the timed call."""
    import gpu

    pipeline = gpu.build_pipeline("tiny", "cpu", torch.float32)
    settings = dict(batch=2, steps=2, resolution=32, cfg=5.0, eta=1.0)
    facts = dict(datasheet_peak_tflops=1.0)
    sampled = gpu.sampling(pipeline, settings, facts, repeats=1)
    assert sampled["diffusers_images_finite"] and sampled["counted_tflop"] > 0 and 0 < sampled["scripts_mfu"] < 1
    assert sampled["time_ratio"] == sampled["scripts_seconds"] / sampled["diffusers_seconds"] > 0
    step = gpu.training_step(pipeline, dict(batch=2, resolution=32), facts, repeats=2)
    assert step["step_counted_tflop"] > 0 and step["step_tflops"] > 0 and step["forward_seconds"] > 0


def test_gpu_method_run_measures_the_epoch_without_its_evaluation(tmp_path):
    """Part 3's in-process runner on a smoke run of ddpo_diffexp.py: the epoch's seconds leave out the evaluation
    before it, the metrics are the script's own, and the module's functions are restored afterwards."""
    import ddpo_diffexp
    import gpu

    flags, argv, run_name = gpu.method_argv("ddpo_diffexp fig4a", "ddpo_diffexp", "diffexp-fig4a", "", str(tmp_path),
                                            smoke=True)  # fmt: skip
    evaluation = ddpo_diffexp.run_evaluation
    with torch.random.fork_rng():  # main() seeds torch's global generator
        gpu.run_script_measured("ddpo_diffexp", argv, str(tmp_path / "result.json"))
    assert ddpo_diffexp.run_evaluation is evaluation
    measured = json.loads((tmp_path / "result.json").read_text())
    (metrics,) = measured["metrics"]
    assert len(measured["evaluation_seconds"]) == 2  # before epoch 0 and after the last
    assert 0 < measured["epoch_seconds"] == pytest.approx(metrics["seconds"] - measured["evaluation_seconds"][0])
    assert metrics["skipped_steps"] == 0 and measured["loss_scaler"] is False  # fp32 on a CPU: no loss scaler


def test_gpu_results_merge_keeps_the_later_figures_and_the_failed_tries():
    """The committed H200 results: three commands merged; the CoCA run that ran out of the first budget is kept
    as an attempt, its rerun is the figure; every method ended in fp16 with finite metrics and a loss scaler."""
    import gpu

    merged = gpu.merge([os.path.join(GPU_RESULTS, f"results_{i}.json") for i in (1, 2, 3)])
    assert [entry["name"] for entry in merged["methods"]] == [run[0] for run in gpu.METHOD_RUNS + [gpu.SDXL_RUN]]
    assert [entry["returncode"] for entry in merged["attempts"]] == ["timeout"]
    assert all(entry["metrics_finite"] and entry["loss_scaler"] for entry in merged["methods"])
    assert set(merged["sampling"]) == set(merged["training_step"]) == {"fp16", "bf16"}
    table = gpu.table(merged)
    assert all(f"| {run[0]} |" in table for run in gpu.METHOD_RUNS + [gpu.SDXL_RUN])


def test_plot_run_reads_a_runs_curve_and_a_benchmarks_band(tmp_path):
    """benchmarks/plot_run.py: the README's command that plots a run (the drawing itself needs matplotlib)."""
    import plot_run

    for seed, rewards in ((0, [0.4, 0.5, 0.6]), (1, [0.5, 0.55, 0.5])):
        (tmp_path / f"run{seed}").mkdir()
        with open(tmp_path / f"run{seed}" / "eval.jsonl", "w") as f:
            for epoch, reward in enumerate(rewards):
                f.write(json.dumps(dict(epoch=epoch, reward_queries=64 * epoch, seen_reward_mean=reward)) + "\n")
    curves = plot_run.read_curves([tmp_path / "run0", tmp_path / "run1"])
    queries, rewards = curves["seen"]
    assert list(queries) == [0, 64, 128] and rewards.tolist() == [[0.4, 0.5, 0.6], [0.5, 0.55, 0.5]]
    assert "unseen" not in curves
    (tmp_path / "results.csv").write_text(
        "method,seed,epoch,reward_queries,seen_exact_reward,unseen_exact_reward\n"
        "ddpo,0,0,0,0.4,0.6\nddpo,0,5,320,0.5,0.7\nddpo,1,0,0,0.45,0.62\nddpo,1,5,320,0.55,0.66\nother,0,0,0,9,9\n"
    )
    band = plot_run.read_band(tmp_path / "results.csv", "ddpo")
    assert band["seen"][1].tolist() == [[0.4, 0.5], [0.45, 0.55]] and list(band["unseen"][0]) == [0, 320]
    with pytest.raises(SystemExit, match="no rows of method 'x'"):
        plot_run.read_band(tmp_path / "results.csv", "x")
