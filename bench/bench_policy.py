"""Policy stages side by side: held-out verdicts of `make compare` over several seeds.

From one pair of finished parents (an SFT and a reward stage), each arm trains a policy
stage (`dpo` by default) with its own arguments, once per seed, and `make compare`
judges it against the SFT parent on the held-out prompts. Printed per arm: the reward
difference over SFT with its 95% interval, the win rate with its interval, KL to SFT,
length change and cap hits (answers cut at max_new_tokens), the verdict, and the
stage's wall time; then the mean and spread over seeds. `--judge stage` reads the stage's
own held-out verdict instead (compare's statistics on the stage's samples; no compare run)
and adds, per arm, the gain pooled over seeds (per prompt, the mean over seeds and samples;
bootstrap over prompts) and how much of the per-prompt differences' variance is sampling
noise (which more samples per prompt remove) rather than a gain that differs from prompt to
prompt (which only more prompts average out). Arms and seeds are
interleaved (seed 1 of every arm, then seed 2, ...), so a machine whose load changes
hits them alike.

    .venv/bin/python bench/bench_policy.py --parents runs/default --seeds 1 2 3 \\
        --arm defaults="" --arm sft-term="--loss_type sigmoid sft --loss_weights 1.0 0.2"

Arms may run different policy stages from the same parents (`NAME@STAGE=ARGS`), the
issue-11 question "DPO, PPO or RLOO?" at a printed sample budget (`sampled`):

    .venv/bin/python bench/bench_policy.py --parents runs/default --seeds 1 2 3 --judge stage \\
        --arm dpo="" --arm ppo@ppo="--updates 24" --arm rloo@rloo="--max_steps 48"

Each run lands in runs/bench-<arm>-s<seed>/ (ALIGN_RUNS moves runs/); --keep leaves them.
Every run draws its own SFT held-out samples (`--eval_reuse_sft false`), so stage times
compare like for like; --reuse-sft lets later runs reuse the first's (~40 s less per run
on a 2-core AMX Xeon; those runs' times are starred).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align import hardware, runs  # noqa: E402


def run(command: list[str], log: Path) -> float:
    """Run a stage process, its output to `log`; returns wall seconds; exits on failure."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ))
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def one(arm: str, extra: str, stage: str, seed: int, parents: Path, logs: Path, judge: str,
        reuse_sft: bool = False) -> dict:
    name = f"bench-{arm}-s{seed}"
    # --force: a benchmark measures a run; an up-to-date output left by `--keep` must not be skipped
    policy_args = [sys.executable, "-m", f"stages.{stage}", "--run", name, "--sft_dir", str(parents / "sft"),
                   "--reward_dir", str(parents / "reward"), "--seed", str(seed), "--force", *shlex.split(extra)]
    if not reuse_sft:  # every run draws its own SFT held-out samples: stage times compare like for like
        policy_args += ["--eval_reuse_sft", "false"]
    stage_s = run(policy_args, logs / f"{name}-{stage}.log")
    sampled = sampled_answers(runs.stage_dir(name, stage), stage)
    reused = json.loads((runs.stage_dir(name, stage) / runs.MANIFEST).read_text())["metrics"].get(
        "heldout_sft_source", "").startswith("reused")
    if judge == "stage":  # the stage's own held-out verdict: compare's statistics on its own samples
        return {"arm": arm, "stage": stage, "seed": seed, "stage_s": stage_s, "sampled": sampled, "sft_reused": reused,
                **stage_verdict(runs.stage_dir(name, stage), stage),
                "rewards": heldout_rewards(runs.stage_dir(name, stage), stage)}
    compare_args = [sys.executable, "-m", "stages.compare", "--run", name, "--checkpoints", str(parents / "sft"),
                    str(runs.stage_dir(name, stage)), "--reward_dir", str(parents / "reward"), "--force"]
    run(compare_args, logs / f"{name}-compare.log")
    report = json.loads((runs.stage_dir(name, "compare") / "report.json").read_text())
    (comparison,) = report["comparisons"]
    models = report["models"]
    baseline, aligned = models[comparison["baseline"]], models[comparison["aligned"]]
    return {
        "arm": arm, "stage": stage, "seed": seed, "stage_s": stage_s, "sampled": sampled, "sft_reused": reused,
        "reward_diff": comparison["reward_difference"]["difference"],
        "reward_low": comparison["reward_difference"]["low"], "reward_high": comparison["reward_difference"]["high"],
        "win_rate": comparison["win_rate"]["rate"], "win_low": comparison["win_rate"]["low"],
        "win_high": comparison["win_rate"]["high"], "kl": (comparison.get("kl") or {}).get("mean"),
        "length_change": comparison["length_change"], "cut_sft": baseline["truncated_share"],
        "cut_policy": aligned["truncated_share"], "verdict": comparison["verdict"],
    }


def sampled_answers(folder: Path, stage: str) -> int | None:
    """Training answers the stage sampled (held-out ones apart): the budget arms are compared at."""
    m = json.loads((folder / runs.MANIFEST).read_text())["metrics"]
    if stage == "rloo":
        return m.get("sampled_responses")
    if stage == "ppo":
        return (m.get("updates") or [{}])[-1].get("episode")
    if stage == "dpo" and m.get("mode") == "on_policy":
        return sum(row.get("fresh_samples", 0) for row in m.get("rounds") or [])
    return None


def stage_verdict(folder: Path, stage: str) -> dict:
    """The same fields from a policy stage's manifest (align.online.heldout_metrics)."""
    m = json.loads((folder / runs.MANIFEST).read_text())["metrics"]
    return {"reward_diff": m["reward_difference"], "reward_low": m["reward_difference_ci95"][0],
            "reward_high": m["reward_difference_ci95"][1], "win_rate": m["win_rate"], "win_low": m["win_rate_ci95"][0],
            "win_high": m["win_rate_ci95"][1], "kl": m["kl"], "length_change": m["length_change"],
            "cut_sft": m["cut_fraction_sft"], "cut_policy": m[f"cut_fraction_{stage}"], "verdict": m["verdict"]}


def heldout_rewards(folder: Path, stage: str) -> dict:
    """{"sft": {prompt_id: [reward, ...]}, "policy": {...}}: the held-out samples' effective rewards."""
    rewards = {}
    for model, name in (("sft", "sft"), ("policy", stage)):
        per_prompt = rewards.setdefault(model, {})
        for line in (folder / "samples" / f"eval_{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            per_prompt.setdefault(row["prompt_id"], []).append(row["reward"])
    return rewards


def noise_split(rewards: dict) -> dict | None:
    """One seed's per-prompt differences (policy mean - SFT mean over n samples each): their
    variance, and the part sampling noise predicts, var_j(policy_j - SFT_j) / n averaged over
    prompts. Sample j of both models shares its seed (align.generation), so the samples are
    paired by index: two independent sample sets would predict more. None below 2 samples
    or 2 prompts."""
    ids = sorted(rewards["sft"])
    pairs = [list(zip(rewards["policy"][i], rewards["sft"][i], strict=True)) for i in ids]
    if len(pairs) < 2 or min(len(p) for p in pairs) < 2:
        return None
    sample_differences = [[a - b for a, b in prompt] for prompt in pairs]
    noise = statistics.fmean(statistics.variance(d) / len(d) for d in sample_differences)
    differences = [statistics.fmean(d) for d in sample_differences]
    return {"variance": statistics.variance(differences), "noise": noise, "samples": len(pairs[0])}


def pooled(mine: list[dict]) -> str:
    """The arm's gain pooled over its seeds, with the noise split: a line, or '' without samples."""
    from align import evaluation

    if not all(r.get("rewards") for r in mine):
        return ""
    ids = sorted(mine[0]["rewards"]["sft"])
    per_seed = [{model: evaluation.prompt_means([r["rewards"][model][i] for i in ids]) for model in ("sft", "policy")}
                for r in mine]
    aligned = sum(s["policy"] for s in per_seed) / len(per_seed)
    baseline = sum(s["sft"] for s in per_seed) / len(per_seed)
    result = evaluation.paired_difference(aligned, baseline)
    shared = all(r["rewards"]["sft"] == mine[0]["rewards"]["sft"] for r in mine)
    splits = [noise_split(r["rewards"]) for r in mine]
    split = "too few samples or prompts for the noise split"
    if all(splits):
        variance, noise = (statistics.fmean(s[k] for s in splits) for k in ("variance", "noise"))
        split = (f"per seed, the per-prompt differences vary {variance:.2f}, sampling noise alone predicts "
                 f"{noise:.2f} at {splits[0]['samples']} samples per prompt")
    if len(mine) == 1:
        return split
    note = " (SFT samples the same in every seed: their noise does not average out)" if shared else ""
    return (f"pooled over {len(mine)} seeds: {result['difference']:+.3f} [{result['low']:+.2f}, {result['high']:+.2f}] "
            f"on {result['prompts']} prompts{note}; {split}")


def show(rows: list[dict]) -> None:
    header = (f"{'arm':<22} {'stage':>5} {'seed':>4} {'reward diff [95% CI]':>24} {'win rate [95% CI]':>20} {'KL':>6} "
              f"{'length':>7} {'cut sft/pol':>11} {'verdict':>12} {'sampled':>7} {'stage s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        kl = "n/a" if r["kl"] is None else f"{r['kl']:.2f}"
        sampled = "n/a" if r.get("sampled") is None else str(r["sampled"])
        print(f"{r['arm']:<22} {r.get('stage', ''):>5} {r['seed']:>4} {r['reward_diff']:+7.3f} [{r['reward_low']:+.2f}, {r['reward_high']:+.2f}] "
              f"{r['win_rate']:6.0%} [{r['win_low']:.0%}, {r['win_high']:.0%}] {kl:>6} {r['length_change']:+7.0%} "
              f"{r['cut_sft']:5.0%}/{r['cut_policy']:<5.0%} {r['verdict']:>12} {sampled:>7} {r['stage_s']:8.0f}"
              f"{'*' if r.get('sft_reused') else ''}")
    if any(r.get("sft_reused") for r in rows):
        print("* reused the SFT held-out samples an earlier run drew (--reuse-sft): its stage time leaves them out")


def summarize(rows: list[dict]) -> None:
    print("\nper arm over seeds (mean, spread = max - min):")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]

        def stat(key):
            values = [r[key] for r in mine if r[key] is not None]
            return (statistics.fmean(values), max(values) - min(values)) if values else (float("nan"), 0.0)

        reward, win, kl, length, wall = (stat(k) for k in ("reward_diff", "win_rate", "kl", "length_change", "stage_s"))
        better = sum(r["verdict"] == "better" for r in mine)
        print(f"  {arm:<22} ({mine[0].get('stage', '?')}) reward {reward[0]:+.3f} (spread {reward[1]:.3f}) | win {win[0]:.0%} (spread {win[1]:.0%}) "
              f"| KL {kl[0]:.2f} | length {length[0]:+.0%} | {better}/{len(mine)} better | stage {wall[0]:.0f} s")
        if line := pooled(mine):
            print(f"  {'':<22} {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parents", type=Path, default=REPO / "runs" / "default",
                        help="a run folder with finished sft/ and reward/ stages")
    parser.add_argument("--stage", default="dpo", help="the policy stage an arm runs unless it names its own")
    parser.add_argument("--arm", action="append", default=[], metavar='NAME[@STAGE]="ARGS"',
                        help='an arm: a name, optionally @ the policy stage it runs (dpo | ppo | rloo), and the stage '
                             'arguments it adds (repeatable); default: defaults=""')
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--judge", choices=("compare", "stage"), default="compare",
                        help="compare: make compare judges each run; stage: the stage's own held-out verdict (faster)")
    parser.add_argument("--keep", action="store_true", help="keep the bench runs (default: removed after)")
    parser.add_argument("--reuse-sft", action="store_true",
                        help="let runs reuse the SFT held-out samples of the first (faster; stage times then differ "
                             "by that work; default: every run draws its own)")
    args = parser.parse_args()
    missing = [stage for stage in ("sft", "reward") if not (args.parents / stage / runs.MANIFEST).is_file()]
    if missing:  # `make bench` on a fresh checkout: say what it needs, skip
        print(f"[bench_policy] skipped: needs finished {', '.join(str(args.parents / s) for s in missing)} "
              f"(make sft reward, or --parents)")
        return
    for stage in ("sft", "reward"):
        runs.read_checkpoint(args.parents / stage)  # finished, or a clear error
    arms = []
    for spec in args.arm or ["defaults="]:
        label, extra = spec.split("=", 1) if "=" in spec else (spec, "")
        name, _, stage = label.partition("@")
        arms.append((name, stage or args.stage, extra))
    logs = REPO / "bench" / "results" / "policy"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[bench_policy] stages {', '.join(dict.fromkeys(stage for _, stage, _ in arms))}, parents {args.parents}, seeds {args.seeds}, "
          f"{len(arms)} arm(s); CPU flags: {hardware.describe_cpu()}; {hardware.machine_key()}", flush=True)
    rows = []
    for seed in args.seeds:
        for name, stage, extra in arms:
            rows.append(one(name, extra, stage, seed, args.parents, logs, args.judge, args.reuse_sft))
            print(f"[bench_policy] {name} seed {seed}: {rows[-1]['verdict']}, reward {rows[-1]['reward_diff']:+.3f}",
                  flush=True)
    (logs / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "rewards"} for r in rows],
                                                  indent=2) + "\n")
    print()
    show(rows)
    summarize(rows)
    if not args.keep:
        for row in rows:
            shutil.rmtree(runs.runs_root() / f"bench-{row['arm']}-s{row['seed']}", ignore_errors=True)


if __name__ == "__main__":
    main()
